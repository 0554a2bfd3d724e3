"""The paper's evaluations of a pipeline on a dataset, in one place: bits/dim of test images (eq. 5), the
rate–distortion curve (§4.3), FID/KID and the Inception Score of samples, progressive generation (Fig. 6) and
interpolation (Fig. 8), written to a folder as results.json and PNG figures. ``ddpm-hf evaluate`` is argument
parsing around :func:`evaluate`; training monitors its EMA model with :func:`quick_bits_per_dim`."""

import copy
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import compiling
from .checkpoints import publish_file
from .data import check_channels, find_image_column, first_images, load_image_dataset, prepare_image
from .data.decoding import decoded_image, image_cell_bytes, undecoded_images
from .errors import first_line, is_out_of_memory
from .images import to_model_range, to_uint8, uint8_grid
from .likelihood import bits_per_dim, plot_rate_distortion
from .processes import DDP_TIMEOUT_S
from .seeds import image_seed

logger = logging.getLogger(__name__)

METRICS = ("bpd", "fid", "kid", "is", "rd", "progressive", "interpolation")


def check_metrics(metrics: Sequence[str]) -> List[str]:
    """``metrics`` as a list, when it names at least one metric and only those of :data:`METRICS`."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown or list(metrics)}; choose from {','.join(METRICS)}")
    return list(metrics)


def data_splits(metrics: Sequence[str], split: str, reference_split: str) -> List[str]:
    """The dataset splits that evaluating ``metrics`` reads: ``split`` for the bound and the interpolation,
    ``reference_split`` for FID/KID."""
    splits = [split] if {"bpd", "rd", "interpolation"} & set(metrics) else []
    splits += [reference_split] if {"fid", "kid"} & set(metrics) else []
    return list(dict.fromkeys(splits))


@dataclass
class DataRead:
    """What the readings of the data met, for results.json: the image column read, and each split's image sizes
    (height, width) as stored: the 10 most common, most common first (a set of photos has thousands), of the images
    read (a reference split whose features are cached is not read again: its check's first images)."""
    image_column: Optional[str] = None
    sizes: Dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def record(self) -> dict:
        return {"image_column": self.image_column,
                "data_resolution": {split: [list(size) for size, _ in sizes.most_common(10)]
                                    for split, sizes in self.sizes.items()}}


def eval_image_chunks(dataset_name, num_images: int, resolution: int, channels: int, split: str = "test",
                      dataset_config_name=None, train_data_dir=None, image_column=None, token=None,
                      chunk_size: int = 256, check_shards: bool = False, revision: Optional[str] = None,
                      cache_dir: Optional[str] = None, read: Optional[DataRead] = None) -> Iterator[torch.Tensor]:
    """The first ``num_images`` images of ``split`` as uint8 (n, C, H, W) chunks of ``chunk_size``, centre-cropped
    to ``resolution``, for a model with ``channels`` input channels, decoded as training decodes them (the same
    channel check, EXIF orientation and 8-bit values; an image column of plain {bytes, path} structs too). In chunks,
    so that 50,000 reference images of 256² (9.8 GB) need not be held at once. ``check_shards``: read every shard's
    footer first (see load_image_dataset), a request per shard on the Hub: evaluate checks each split once, before
    any work, not at each of its reads. ``revision``, ``cache_dir``: a Hub dataset's commit and cache, as training's.
    ``read``: the column read and the (height, width) of each image, as stored, are recorded in it."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    dataset = load_image_dataset(dataset_name, dataset_config_name, train_data_dir, split=split, streaming=True,
                                 token=token, check_shards=check_shards, revision=revision, cache_dir=cache_dir)
    column = find_image_column(dataset.features, image_column)
    if read is not None:
        read.image_column = column
    where = f"{dataset_name or train_data_dir} ({split} split)"
    try:
        check_channels(first_images(dataset, column, token=token), channels,
                       other_model="another pipeline")
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    rng = np.random.default_rng(0)
    images, made = [], 0
    for row_index, row in enumerate(undecoded_images(dataset, column)):
        try:
            image = decoded_image(image_cell_bytes(row[column], token))
        except Exception as err:  # the evaluation's images are not skipped: its figures name their images
            raise ValueError(f"{where}: row {row_index} holds no image that can be read ({type(err).__name__}: "
                             f"{err})") from err
        if read is not None:
            read.sizes[split][image.height, image.width] += 1
        images.append(prepare_image(image, resolution, channels, center_crop=True, flip=False, rng=rng))
        if len(images) == chunk_size or made + len(images) == num_images:
            made += len(images)
            yield torch.from_numpy(np.stack(images))  # a new, writable array: prepare_image may return a PIL view
            images = []
            if made == num_images:
                return
    if images:
        yield torch.from_numpy(np.stack(images))


def load_eval_images(dataset_name, num_images: int, resolution: int, channels: int, split: str = "test",
                     **kwargs) -> torch.Tensor:
    """The images of :func:`eval_image_chunks` as one uint8 (N, C, H, W) tensor."""
    return torch.cat(list(eval_image_chunks(dataset_name, num_images, resolution, channels, split, **kwargs)))


def quick_bits_per_dim(pipe, images: torch.Tensor, num_timesteps: int = 20) -> float:
    """A sampled bits/dim estimate (``num_timesteps`` terms per image) of uint8 ``images``, for monitoring during
    training."""
    return bits_per_dim(pipe.unet, pipe.scheduler, images, num_timesteps=num_timesteps, progress=False).mean


def load_pipeline(pipeline: Union[str, os.PathLike], device: Optional[str] = None, token: Optional[str] = None,
                  revision: Optional[str] = None, allow_pickle: bool = False):
    """A DDPMPipeline from a folder or a Hub repo id (read with ``token``, None: HF_TOKEN or the stored login; at
    ``revision``; pickle weights only with ``allow_pickle``), moved to ``device`` when given."""
    from .pipelines import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(pipeline, token=token, revision=revision, allow_pickle=allow_pickle)
    if device:
        pipe.to(device)
    return pipe


SAMPLING_DTYPES = {"fp32": "float", "bf16": "bfloat16", "fp16": "half"}  # the network's precision → its cast


def check_sampling_dtype(dtype: str) -> None:
    if dtype not in SAMPLING_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(SAMPLING_DTYPES)}.")


def prepare_sampling(pipe, dtype: str = "fp32", compile_options: Optional[dict] = None, batch_size: int = 1,
                     compile_source: str = compiling.COMPILE_FLAG) -> None:
    """Set up ``pipe``'s network for sampling: its weights in ``dtype`` (the reverse chain itself stays float32, see
    ``DDPMPipeline._chain_dtype``) and, with ``compile_options`` (``torch.compile``'s arguments, ``{}`` for its
    defaults, asked by ``compile_source``: see :func:`ddpm_hf.compiling.compile_options`), compiled in place. Each is
    checked by one network call at ``batch_size`` as the pipeline makes it, so that a device without the dtype or a
    compiler failure stops the command before any sampling, and sampling at that batch size reuses the graph
    compiled here."""
    check_sampling_dtype(dtype)
    unet = pipe.unet
    getattr(unet, SAMPLING_DTYPES[dtype])()
    shape = pipe._image_shape(batch_size)

    @torch.no_grad()
    def probe():
        # t as the pipeline passes it, an element of scheduler.timesteps moved to the device: 0-dim (a t of another
        # shape or device would be compiled again at the first real call)
        unet(torch.zeros(shape, device=unet.device, dtype=unet.dtype),
             torch.zeros((), dtype=torch.long, device=unet.device))

    if dtype != "fp32":
        try:
            probe()
        except RuntimeError as err:
            if is_out_of_memory(err):  # the batch does not fit: another dtype is not the fix
                raise
            raise ValueError(f"--dtype {dtype}: the U-Net does not run in {dtype} on {unet.device} "
                             f"({first_line(err)}); use --dtype fp32.") from err
    if compile_options is not None:
        try:
            compiling.compile_checked(unet, probe, compile_options, compile_source, "run")
        except RuntimeError as err:
            if is_out_of_memory(err):
                raise
            raise ValueError(str(err)) from err


def chain_length(pipe, num_inference_steps: Optional[int]) -> int:
    """Steps of the reverse chain: ``num_inference_steps``, or the model's full chain when None; checked against
    the scheduler's settings now, not after the work before the sampling (a ``steps_offset`` can take a chain past
    the last timestep)."""
    total = pipe.scheduler.config.num_train_timesteps
    if num_inference_steps is not None and num_inference_steps > total:
        raise ValueError(f"--num_inference_steps {num_inference_steps} exceeds the model's {total} diffusion steps.")
    steps = num_inference_steps or total
    try:
        pipe.scheduler.set_timesteps(steps)
    except ValueError as err:
        asked = (f"--num_inference_steps {steps}" if num_inference_steps is not None
                 else f"the full chain ({steps} steps; --num_inference_steps not given)")
        raise ValueError(f"{asked} cannot be sampled with this pipeline's scheduler: {err}") from err
    return steps


def save_png(image, path: Path) -> Path:
    """A figure or grid (a PIL image) written whole: a kill leaves no truncated PNG under its name."""
    return publish_file(path, lambda partial: image.save(partial, format="PNG"))


def check_bpd_timesteps(bpd_timesteps: int) -> None:
    """--bpd_timesteps: 0 for the exact bound, or K ≥ 2 sampled terms per image (one gives no standard error); said
    by the command's parser and by :func:`evaluate`, before any work."""
    if bpd_timesteps < 0 or bpd_timesteps == 1:
        raise ValueError(f"--bpd_timesteps {bpd_timesteps}: must be 0 (the exact bound) or at least 2 sampled terms "
                         "(one term gives no standard error).")
# What `evaluate` writes besides results.json and the samples' folder: an earlier evaluation's are removed when it
# starts (results.json is started again then), so that --out holds this evaluation's outputs only.
EVALUATE_FILES = ("rate_distortion.json", "rate_distortion.png", "samples.png", "progressive.png", "interpolation.png")


SAMPLES_KEY_FILE = "samples.json"
SAMPLES_FORMAT = "ddpm_hf samples 2"  # marks a key file as ours (2: each image's seed hashed, see image_seed)
SAMPLES_FORMATS = re.compile(r"^ddpm_hf samples \d+$")  # ours, of any version: another version's key is another key
SAMPLE_NAME = re.compile(r"^(\d{5,})\.png$")  # 00000.png, 00001.png, ...


def samples_key(pipe, steps: int, seed: int, dtype: str = "fp32", compile_options: Optional[dict] = None) -> dict:
    """What a folder of samples is made with: a digest of the network's weights, its config and the scheduler's,
    the chain's length, the seed, the network's precision and compilation, and what computes it (the device's
    kind and model, its TF32 settings, torch's version: other kernels give other floats). Samples made under the
    same key are the same images."""
    unet = pipe.unet
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    device = unet.device
    computed_by = {"device": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        computed_by.update(device_name=torch.cuda.get_device_name(device),
                           tf32=[torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32])
    key = {"format": SAMPLES_FORMAT, "weights_sha256": digest.hexdigest(),
           "unet": {k: v for k, v in unet.config.items() if not k.startswith("_")},
           "scheduler": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
           "num_inference_steps": steps, "seed": seed, "dtype": dtype, "compile": compile_options, **computed_by}
    return json.loads(json.dumps(key, default=str))  # as read back from the folder


def sample_files(folder: Path) -> Dict[int, Path]:
    """The samples in ``folder`` by index."""
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): path for path in folder.iterdir() if (m := SAMPLE_NAME.match(path.name))}


def check_sample_folder(folder: Path) -> Optional[dict]:
    """The key of the samples in ``folder`` (None: there are none); refuses a folder whose numbered PNGs or
    samples.json no ddpm-hf command wrote. Reads only: every process calls it before any work."""
    key_file = folder / SAMPLES_KEY_FILE
    try:
        previous = json.loads(key_file.read_text())
    except FileNotFoundError:
        previous = None
    except (OSError, ValueError):
        previous = "unreadable"
    ours = isinstance(previous, dict) and bool(SAMPLES_FORMATS.match(str(previous.get("format"))))
    if previous is not None and not ours:
        raise ValueError(f"{key_file} is not the samples key ddpm-hf writes: write the samples to another folder "
                         "(--out) or remove that file.")
    found = sample_files(folder)
    if previous is None and found:
        raise ValueError(f"{folder} holds numbered PNG files ({found[min(found)].name}, ...) without the "
                         f"{SAMPLES_KEY_FILE} that would say how they were made: write the samples to another folder "
                         "(--out) or remove those files.")
    return previous


def open_sample_folder(folder: Path, key: dict, num_images: int) -> None:
    """Make ``folder`` hold samples made under ``key`` (one process does this): those an interrupted command left
    there under the same key stay (they are the images it would make again); those made under another key, and
    those past ``num_images``, are removed (the command that made them wrote its key first), and so is the grid.png
    that earlier versions of ``ddpm-hf sample`` wrote among its samples (see :func:`grid_path`). See
    :func:`check_sample_folder` for what is refused."""
    previous = check_sample_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if previous is not None:
        (folder / "grid.png").unlink(missing_ok=True)
    stale = [path for i, path in sorted(sample_files(folder).items()) if previous != key or i >= num_images]
    if stale:
        logger.warning("%s: %d samples of another pipeline, setting or count removed", folder, len(stale))
    for path in stale:
        path.unlink()
    if previous != key:  # after the removal: a kill in between leaves the old key, whose samples go next time
        publish_file(folder / SAMPLES_KEY_FILE, lambda partial: partial.write_text(json.dumps(key, indent=2)))


def sample_path(folder: Path, index: int) -> Path:
    """Where image ``index`` is written: 00000.png, 00001.png, ..."""
    return folder / f"{index:05d}.png"


def grid_path(folder: Path) -> Path:
    """Where ``ddpm-hf sample`` writes the grid of its first images: beside ``folder`` (samples/ → samples_grid.png),
    not in it, where the FID tools that read a folder's images (clean-fid its subfolders too) would score it as a
    sample."""
    folder = folder.resolve()
    return folder.parent / f"{folder.name}_grid.png"


def _read_sample(path: Path) -> Optional[torch.Tensor]:
    """A sample written by :func:`sample_batches`, as uint8 (C, H, W); None when absent or unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except (OSError, ValueError):
        return None
    return torch.from_numpy(np.array(array[None] if array.ndim == 2 else array.transpose(2, 0, 1)))  # a copy


def sample_batches(pipe, num_images: int, batch_size: int, steps: int, seed: int, desc: str = "sampling",
                   process_index: int = 0, num_processes: int = 1, folder: Optional[Path] = None,
                   fixed_batch_size: bool = False) -> Iterator[Tuple[List[int], torch.Tensor]]:
    """This process's uint8 samples, a batch at a time: (rows, (B, C, H, W) images), ``rows`` the images' places in
    the process's share (process p makes images p, p + P, ...: row r is image p + r P). Image i uses its own
    generator, seeded ``image_seed(seed, i)``: the set does not depend on the batch size or on how many processes
    share the work. Nothing is kept: 50,000 samples of 256² would take 9.8 GB.

    With ``folder`` (prepared by :func:`open_sample_folder`), each image is written there as a PNG as soon as its
    batch is made, and the images already there are read (and yielded first) instead of made again: a command that
    was stopped goes on where it was. With ``fixed_batch_size`` (a network compiled by :func:`prepare_sampling` at
    ``min(batch_size, this process's share)``), every batch has that size: a short last one is filled up with copies
    of its last image, dropped after, because a compiled network would be compiled again for the new shape (with
    CUDA graphs, also recorded again: tens of seconds)."""
    from tqdm.auto import tqdm

    from .images import to_pil

    mine = list(range(process_index, num_images, num_processes))
    shape = pipe._image_shape(1)[1:]
    found = sample_files(folder) if folder is not None else {}
    todo = []  # (row, image index) of the images to make
    read_rows, read_images = [], []
    for row, i in enumerate(mine):
        image = _read_sample(found[i]) if i in found else None
        if image is not None and image.shape == shape:
            read_rows.append(row)
            read_images.append(image)
            if len(read_rows) == batch_size:
                yield read_rows, torch.stack(read_images)
                read_rows, read_images = [], []
        else:
            todo.append((row, i))
    if read_rows:
        yield read_rows, torch.stack(read_images)
    made_before = len(mine) - len(todo)
    batches = range(0, len(todo), batch_size)
    bar = tqdm(total=len(batches) * steps, unit="step", disable=process_index != 0,
               desc=f"{desc}: {len(todo)} images in {len(batches)} batch(es) of {steps} steps"
                    + (f" ({made_before} of {len(mine)} already in {folder})" if made_before else ""))

    def one_step(pipeline, i, t, tensors) -> dict:  # the bar moves with the chain's steps, not its batches: a
        bar.update(1)                                # single batch of 1000 steps takes minutes
        return {}

    compiled_for = min(batch_size, len(mine))
    progress = dict(getattr(pipe, "_progress_bar_config", {}))  # the caller's, given back below
    pipe.set_progress_bar_config(disable=True)  # (one bar for the whole set, not one per batch)
    try:
        for start in batches:
            batch = todo[start:start + batch_size]
            seeds = [image_seed(seed, i) for _, i in batch]
            if fixed_batch_size:
                seeds += seeds[-1:] * (compiled_for - len(batch))  # each its own generator: the rows stay independent
            out = pipe(batch_size=len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
                       num_inference_steps=steps, output_type="pt", callback_on_step_end=one_step).images[:len(batch)]
            # "pt" images are p = (x / 2 + 0.5) clamped to [0, 1]; to_uint8(2p − 1) gives the levels of the
            # pipeline's own PIL output (but for a value exactly on a level's boundary, which the two roundings can
            # put on either side: none of 20 M random values was)
            made = to_uint8(out * 2 - 1).cpu()
            for (_, i), pil in zip(batch, to_pil(made) if folder is not None else []):
                publish_file(sample_path(folder, i), lambda partial: pil.save(partial, format="PNG"))
            yield [row for row, _ in batch], made
    finally:
        bar.close()
        pipe._progress_bar_config = progress


def generate_uint8(pipe, num_images: int, batch_size: int, steps: int, seed: int, desc: str = "sampling",
                   process_index: int = 0, num_processes: int = 1, folder: Optional[Path] = None,
                   fixed_batch_size: bool = False) -> torch.Tensor:
    """All of :func:`sample_batches` (same arguments) as one uint8 (N, C, H, W) tensor, in row order."""
    images = torch.empty((len(range(process_index, num_images, num_processes)), *pipe._image_shape(1)[1:]),
                         dtype=torch.uint8)
    for rows, batch in sample_batches(pipe, num_images, batch_size, steps, seed, desc, process_index, num_processes,
                                      folder, fixed_batch_size):
        images[rows] = batch
    return images


def put_rows(part: Optional[torch.Tensor], length: int, rows: List[int], values: torch.Tensor) -> torch.Tensor:
    """``values`` written into rows ``rows`` of ``part``, a tensor of ``length`` rows made at the first call."""
    if part is None:
        part = torch.empty((length, *values.shape[1:]), dtype=values.dtype)
    part[rows] = values
    return part


def put_first_rows(part: Optional[torch.Tensor], count: int, rows: List[int], images: torch.Tensor):
    """:func:`put_rows` for the images among ``rows`` that are among the first ``count`` (a grid's): ``part``
    unchanged when none is, the others not kept."""
    shown = [k for k, row in enumerate(rows) if row < count]
    return put_rows(part, count, [rows[k] for k in shown], images[shown]) if shown else part


def _or_empty(part: Optional[torch.Tensor]) -> torch.Tensor:
    return part if part is not None else torch.zeros(0)


def gather_to_main(parts: list, state) -> Optional[list]:
    """Every process's ``parts``, in process order, on the main process (None on the others): an all-gather would
    send each process the whole (50,000 Inception features are 0.8 GB)."""
    if state.num_processes == 1:
        return list(parts)
    import torch.distributed as dist

    gathered = [None] * state.num_processes if state.is_main_process else None
    dist.gather_object(parts, gathered, dst=0)
    return [part for process in gathered for part in process] if gathered is not None else None


def _in_image_order(parts: List[torch.Tensor], total: int) -> torch.Tensor:
    """The rows of each process p's part, images p, p + P, ..., put back in image order (``total`` rows)."""
    ordered = torch.empty((total, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for p, part in enumerate(parts):
        if len(part):  # a process with no image of its own
            ordered[p::len(parts)] = part
    return ordered


def evaluate(pipeline: str, out_dir: Union[str, os.PathLike], *, data: str = "embedded:fashion_mnist",
             data_config: Optional[str] = None, split: str = "test", reference_split: str = "train",
             metrics: Sequence[str] = ("bpd", "fid", "kid"), num_samples: int = 1000, num_reference: int = 5000,
             num_bpd_images: int = 64, bpd_timesteps: int = 0, features: str = "fmnist", is_splits: int = 10,
             num_inference_steps: Optional[int] = None, batch_size: int = 64, seed: int = 0,
             device: Optional[str] = None, dtype: str = "fp32", compile: bool = False,
             ddp_timeout: float = DDP_TIMEOUT_S, token: Optional[str] = None, revision: Optional[str] = None,
             allow_pickle: bool = False, image_column: Optional[str] = None) -> Optional[dict]:
    """Evaluate the pipeline folder or Hub repo id ``pipeline`` on the dataset ``data`` (name or folder) and write
    results.json and the figures to ``out_dir``; returns the results on the main process, None on the others.

    ``metrics`` picks among :data:`METRICS`: ``bpd`` the bound on ``num_bpd_images`` images of ``split``
    (``bpd_timesteps`` 0: all T terms, exact; K: K sampled terms per image), ``rd`` its rate–distortion curve (exact
    bound only), ``fid``/``kid`` on ``num_samples`` samples against ``num_reference`` images of ``reference_split``
    through the ``features`` network ("fmnist" or "inception"), ``is`` the Inception Score of the same samples over
    ``is_splits`` splits (IS-FMNIST on "fmnist"), ``progressive`` and ``interpolation`` figures. Sampling runs the
    network in ``dtype`` ("fp32", "bf16", "fp16"; the reverse chain stays float32) and ``torch.compile``'d with
    ``compile`` or accelerate's dynamo settings (e.g. ``accelerate launch --dynamo_backend inductor --dynamo_mode
    reduce-overhead``), on a copy: the bound always evaluates the float32 network.
    Under ``accelerate launch`` every process computes its share of the bound's terms and samples its share for
    FID/KID/IS (the bound is then the same as with one process: see :func:`bits_per_dim`); everything else runs on
    the main one. ``bpd.terms_per_process`` in results.json says how the bound's terms were shared. A process waits
    ``ddp_timeout`` seconds for the others at their meetings (torch's default for NCCL is 10 minutes: a GPU slower by
    a few % over hours of sampling would end the evaluation). ``token`` reads a private pipeline or dataset on the Hub
    (None: HF_TOKEN or the stored login); ``revision`` and ``allow_pickle`` are the pipeline's (see load_pipeline).
    ``image_column``: the data's column of images (None: its first Image column), at every reading of the data.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .metrics import MIN_FID_KID_IMAGES, check_features, check_inception_score

    # --- bad flags, the processes, the pipeline and the data: refused before any work ---------------------------------
    check_metrics(metrics)
    check_sampling_dtype(dtype)
    compile_kwargs, compile_source = compiling.compile_options(compile)
    if "is" in metrics:
        check_inception_score(features, num_samples, is_splits)
    if {"fid", "kid"} & set(metrics):
        check_features(features, num_samples, num_reference)  # said now, not after the bound and the sampling
    check_bpd_timesteps(bpd_timesteps)
    if "rd" in metrics and bpd_timesteps:
        raise ValueError("the rate-distortion curve (rd) needs the exact bound: use --bpd_timesteps 0.")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timedelta(seconds=ddp_timeout))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes != launched:
        raise ValueError(f"{launched} processes were launched but accelerate set up {state.num_processes}: each would "
                         "sample everything. On CPU launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu`.")
    pipe = load_pipeline(pipeline, device or str(state.device), token, revision, allow_pickle)
    if bpd_timesteps >= pipe.scheduler.config.num_train_timesteps:
        raise ValueError(f"--bpd_timesteps {bpd_timesteps} is not fewer than the model's "
                         f"{pipe.scheduler.config.num_train_timesteps} diffusion steps: use 0 for the exact bound.")
    unet = pipe.unet
    channels, size = unet.config.in_channels, unet.config.sample_size
    if not isinstance(size, int):  # (height, width), as diffusers' UNet2DModel also takes it
        if len(set(size)) == 1:
            size = size[0]
        elif data_splits(metrics, split, reference_split):
            raise ValueError(f"the model's sample_size is {list(size)} (height, width): not square, and evaluate reads "
                             "the data centre-cropped to a square resolution. Of --metrics, only progressive runs on "
                             "such a model (ddpm-hf sample makes its images).")
    if features == "fmnist" and {"fid", "kid", "is"} & set(metrics) and channels != 1:  # (any size: resized to 28)
        logger.warning("FID, KID and IS on --features fmnist compare the features of a Fashion-MNIST classifier (grey "
                       "images), which say little of this model's colour images: pass --features inception for the "
                       "standard scores (see the README).")
    data_read = DataRead()  # what every reading of the data met: its column, the sizes of the images it read
    reading = dict(dataset_config_name=data_config, image_column=image_column, token=token, read=data_read)
    for data_split in data_splits(metrics, split, reference_split):
        # One image of each split (the interpolation's two, FID's and KID's few), on every process: images of the
        # wrong kind, or too few of them, fail now, everywhere, before any work.
        interpolated = data_split == split and "interpolation" in metrics
        compared = data_split == reference_split and {"fid", "kid"} & set(metrics)
        needed = max(2 if interpolated else 1, MIN_FID_KID_IMAGES if compared else 1)
        got = len(load_eval_images(data, needed, size, channels, split=data_split, check_shards=True, **reading))
        sizes = data_read.sizes[data_split]
        if set(sizes) - {(size, size)} and state.is_main_process:  # said (once), and recorded in results.json: the
            # model sees other pixels than stored
            logger.warning("--data %s (split %s): its images are %s, resized to the model's %d×%d (the shorter side "
                           "to %d, then centre-cropped)", data, data_split, ", ".join(f"{h}×{w}" for h, w in sizes),
                           size, size, size)
        if interpolated and got < 2:
            raise ValueError(f"the interpolation (Fig. 8) mixes two images of --split {split}, and {data} has {got} "
                             "there: pass a split with two images or more, or leave interpolation out of --metrics.")
        if compared and got < MIN_FID_KID_IMAGES:
            raise ValueError(f"FID and KID compare the spread of two sets of images, and {data} has {got} in "
                             f"--reference_split {reference_split}: pass a split with {MIN_FID_KID_IMAGES} images or "
                             "more.")
    # --- results.json, the samples' folder and the sampler (in its dtype, compiled) -----------------------------------
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = chain_length(pipe, num_inference_steps)
    results = {"pipeline": pipeline, "data": data, "num_inference_steps": steps, "num_processes": state.num_processes}
    if data_read.sizes:  # (height, width): the model's
        results["resolution"] = [size, size]

    def save_results() -> None:
        """results.json as far as it goes, after each stage (the bound, the sample quality, the figures): a failure
        or a kill in a later one keeps what the earlier ones computed ("seconds" is written once all are done).
        Replaced whole, never half written. With it, what the data's readings so far met (see DataRead)."""
        if data_read.sizes:
            results.update(data_read.record())
        partial = out / "results.json.partial"
        partial.write_text(json.dumps(results, indent=2))
        os.replace(partial, out / "results.json")

    if state.is_main_process:  # at once: an earlier evaluation's results.json and files in --out are not taken
        save_results()           # for this one's
        for name in EVALUATE_FILES:
            (out / name).unlink(missing_ok=True)
    started = time.time()
    sample_quality = bool({"fid", "kid", "is"} & set(metrics))  # every process samples its share
    figures = bool({"progressive", "interpolation"} & set(metrics))  # the main process samples them
    samples_folder = out / "samples"  # every sample as a PNG, written as it is made: a stopped command goes on
    if sample_quality:
        check_sample_folder(samples_folder)  # on every process: a refusal stops all of them, none waits below
        key = samples_key(pipe, steps, seed + 10**6, dtype, compile_kwargs)  # opened below, once all else is checked
    sampler = pipe  # what samples: a copy in its dtype or compiled, prepared (and so checked) before any work
    if sample_quality or figures:
        # Only the samples are compiled: the figures (4 and 8 images) would compile the network again for their
        # shapes, which costs more than it saves; they are drawn uncompiled, in the same dtype.
        compiled = compile_kwargs if sample_quality else None
        results.update(sampling_dtype=dtype, sampling_compiled=compiled is not None)
        if compiled is not None:
            results["sampling_compile_options"] = compiled  # {} for torch's defaults
        if (dtype != "fp32" or compiled is not None) and (sample_quality or state.is_main_process):
            sampler = type(pipe)(unet=copy.deepcopy(pipe.unet), scheduler=pipe.scheduler)
            share = len(range(state.process_index, num_samples, state.num_processes)) if sample_quality else 4
            prepare_sampling(sampler, dtype, compiled, max(1, min(batch_size, share)), compile_source)

    # --- the bound (eq. 5) on every process, each its share of the terms; rate-distortion (Fig. 5) --------------------
    bound = None
    if {"bpd", "rd"} & set(metrics):  # on every process: each computes its share of the terms
        images = load_eval_images(data, num_bpd_images, size, channels, split=split, **reading)
        if len(images) < num_bpd_images and state.is_main_process:
            logger.warning("--split %s holds %d images, fewer than --num_bpd_images %d: the bound is of those %d.",
                           split, len(images), num_bpd_images, len(images))
        bound = bits_per_dim(unet, pipe.scheduler, images, num_timesteps=bpd_timesteps or None, batch_size=batch_size,
                             seed=seed, progress=state.is_main_process, state=state)
    if bound is not None and state.is_main_process:
        # stderr: of the sampled timesteps (0 for the exact bound: all T terms, one ε each); stderr_over_images: of
        # the mean over these images, what a comparison with another model's or the paper's figure must allow for
        results["bpd"] = {"bits_per_dim": bound.mean, "stderr": bound.stderr,
                          "stderr_over_images": bound.stderr_over_images, "exact": bound.exact,
                          "num_images": len(bound.per_image), "split": split, "prior_bpd": float(bound.prior.mean()),
                          "terms_per_process": bound.terms_per_process}
        if bound.exact:
            results["bpd"]["decoder_L0_bpd"] = float(bound.terms[0])
            results["bpd"]["rate_bpd"] = float(bound.mean - bound.terms[0])
        if "rd" in metrics:
            curve = bound.rate_distortion()
            publish_file(out / "rate_distortion.json", lambda partial: partial.write_text(json.dumps(curve)))
            publish_file(out / "rate_distortion.png",
                         lambda partial: plot_rate_distortion(bound, partial, title=f"{pipeline} on {data}"))
            results["rate_distortion"] = {"final_rate_bpd": curve["rate_bpd"][-1],
                                          "final_rmse": curve["distortion_rmse"][-1], "plot": "rate_distortion.png"}
        save_results()

    # --- samples for FID, KID and IS: every process its share, their features gathered on the main one ----------------
    sampled = None
    if sample_quality:  # one set of samples for FID, KID and IS
        from .metrics import (cached_features, class_probabilities, extract_features, feature_extractor, fid_kid,
                              inception_score)

        # Both fail now, before any sampling, if unavailable. They run where the sampling ran on a GPU, else on the
        # host (MPS has no float64 for the probabilities).
        device = unet.device if unet.device.type == "cuda" else torch.device("cpu")
        extractor = feature_extractor(features).to(device) if {"fid", "kid"} & set(metrics) else None
        classifier = class_probabilities(features).to(device) if "is" in metrics else None
        # Only now, with the sampler, the bound and the feature networks ready: a failure before leaves an earlier
        # command's samples where they are.
        if state.is_main_process:
            open_sample_folder(samples_folder, key, num_samples)
        state.wait_for_everyone()
        # Each process extracts the features of its samples a batch at a time, keeping only those and the images
        # the grid shows, and sends them to the main process.
        grid_rows = len(range(state.process_index, min(64, num_samples), state.num_processes))
        share = len(range(state.process_index, num_samples, state.num_processes))
        grid = feature_part = probability_part = None
        for rows, images in sample_batches(sampler, num_samples, batch_size, steps, seed + 10**6,
                                           "sampling for sample quality", state.process_index, state.num_processes,
                                           samples_folder, fixed_batch_size=compiled is not None):
            grid = put_first_rows(grid, grid_rows, rows, images)
            if extractor is not None:
                feature_part = put_rows(feature_part, share, rows, extract_features(extractor, images, batch_size))
            if classifier is not None:
                probability_part = put_rows(probability_part, share, rows,
                                            extract_features(classifier, images, batch_size))
        parts = gather_to_main([(_or_empty(grid), _or_empty(feature_part), _or_empty(probability_part))], state)
        if parts is not None:
            grids, feature_parts, probability_parts = zip(*parts)
            sampled = (_in_image_order(grids, min(64, num_samples)),
                       _in_image_order(feature_parts, num_samples) if extractor is not None else None,
                       _in_image_order(probability_parts, num_samples) if classifier is not None else None)

    # --- the scores and the figures (Fig. 6, Fig. 8): the main process alone ------------------------------------------
    # The processes' last meeting: from here the main process works alone and the others are done (waiting for it
    # at a barrier, they could time out during a long extraction of reference features).
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    if sampled is not None:
        grid, sample_features, probabilities = sampled
        fmnist = features == "fmnist"
        quality = results["sample_quality"] = {"features": features, "num_samples": num_samples}
        if sample_features is not None:
            real = cached_features(features, extractor, lambda: eval_image_chunks(
                data, num_reference, size, channels, split=reference_split, chunk_size=batch_size, **reading),
                expected=num_reference)
            if len(real) < num_reference:
                logger.warning("--reference_split %s holds %d images, fewer than --num_reference %d: the scores "
                               "compare the samples with those %d.", reference_split, len(real), num_reference,
                               len(real))
            scores = fid_kid(real, sample_features)
            quality.update({"label": "FID-FMNIST" if fmnist else "FID", "num_reference": len(real),
                            "reference_split": reference_split,
                            **{k: v for k, v in scores.items() if k[:3] in metrics}})
        if probabilities is not None:
            mean, std = inception_score(probabilities, is_splits)
            quality.update({"inception_score_label": "IS-FMNIST" if fmnist else "IS", "inception_score": mean,
                            "inception_score_std": std, "is_splits": is_splits})
        save_png(uint8_grid(grid), out / "samples.png")
        save_results()
    with compiling.uncompiled(sampler.unet):  # (see above)
        if "progressive" in metrics:
            save_png(sampler.progressive(batch_size=4, generator=torch.Generator().manual_seed(seed),
                                         num_inference_steps=steps, num_snapshots=min(10, steps)).grid,
                     out / "progressive.png")  # Fig. 6's snapshots, fewer for a shorter chain
        if "interpolation" in metrics:
            pair = to_model_range(load_eval_images(data, 2, size, channels, split=split, **reading))
            t = pipe.scheduler.config.num_train_timesteps // 2  # the paper's t = 500 of 1000
            save_png(sampler.interpolate(pair[0], pair[1], lambdas=8, t=t, seed=seed).grid, out / "interpolation.png")
    results["seconds"] = round(time.time() - started, 1)
    save_results()
    return results
