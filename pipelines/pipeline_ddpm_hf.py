# Copyright 2026 The ddpm_hf authors. Apache-2.0.
"""The DDPM sampling pipeline (Ho, Jain & Abbeel 2020): ancestral sampling (Algorithm 2), progressive generation
(Fig. 6) and interpolation through the latent x_t (Fig. 8), plus the checkpoint format and Hub publishing.

Self-contained: imports torch, numpy, PIL, huggingface_hub and diffusers only (ddpm_hf's own loader is imported
lazily by :meth:`DDPMPipeline.from_pretrained`), so this file can travel into a Hub repo as remote pipeline code.

Checkpoint format (``save_pretrained``):

* when diffusers computes the same thing from the same config (every configuration of the paper), a plain diffusers
  folder: ``model_index.json`` names ``DDPMPipeline``, ``["diffusers", "UNet2DModel"]`` and
  ``["diffusers", "DDPMScheduler"]``; weights in safetensors. Anyone loads it with
  ``diffusers.DiffusionPipeline.from_pretrained`` and gets the same samples;
* otherwise (a scheduler whose ``variance_type`` diffusers gets wrong), the folder names this pipeline and the
  scheduler as remote code and carries their module files; it loads with
  ``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`` without ddpm_hf installed.
"""

import inspect
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import __version__ as diffusers_version
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import BaseOutput
from diffusers.utils import logging as diffusers_logging
from PIL import Image

logger = diffusers_logging.get_logger(__name__)
GeneratorArg = Optional[Union[torch.Generator, List[torch.Generator]]]
OUTPUT_TYPES = ("pil", "np", "pt")
NUMPY_ALIASES = (None, "numpy")  # what diffusers' DDPMPipeline also answers with NumPy arrays
PIPELINE_FILE = "pipeline_ddpm_hf.py"
SCHEDULER_FILE = "scheduling_ddpm_hf.py"
# What an upload removes from the repo unless it carries it again: the files ddpm_hf writes that another layout has
# not (a remote-code layout's modules, other weight files) and an earlier grid (another model's samples). The user's
# own files (a handler.py, notes beside the weights) stay.
STALE_AFTER_UPLOAD = [PIPELINE_FILE, f"scheduler/{SCHEDULER_FILE}", "unet/diffusion_pytorch_model*", "samples.png"]


@dataclass
class ProgressiveOutput(BaseOutput):
    """x̂_0 along the reverse chain (Fig. 6). ``snapshots[k]`` holds the predictions at ``timesteps[k]`` for every
    sample; ``images`` are the final samples; ``grid`` has one row per sample and one column per snapshot."""

    images: Union[List[Image.Image], np.ndarray, torch.Tensor]
    snapshots: List[Union[List[Image.Image], np.ndarray, torch.Tensor]]
    timesteps: List[int]
    grid: Image.Image


@dataclass
class InterpolationOutput(BaseOutput):
    """Decoded interpolations (Fig. 8) for each λ; ``grid`` shows the two sources at the ends of the row."""

    images: Union[List[Image.Image], np.ndarray, torch.Tensor]
    lambdas: List[float]
    grid: Image.Image


def image_grid(images: Sequence[Image.Image], rows: Optional[int] = None, cols: Optional[int] = None,
               pad: int = 2) -> Image.Image:
    """Tile equally sized PIL images row by row with a ``pad``-pixel white border; without ``rows``/``cols`` the grid
    is as square as possible and blank tiles fill the last row."""
    if cols is None:
        cols = math.ceil(math.sqrt(len(images))) if rows is None else math.ceil(len(images) / rows)
    rows = rows or math.ceil(len(images) / cols)
    if len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a {rows} × {cols} grid.")
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), color=255)
    for i, img in enumerate(images):
        grid.paste(img, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return grid


def _to_pil(images: torch.Tensor) -> List[Image.Image]:
    """[−1, 1] tensors (B, C, H, W) → PIL images, quantised to uint8 like the original code's evaluation."""
    array = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a) for a in array]


def _onto(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from the host to a CUDA device through pinned memory, without making the host wait: a
    copy from pageable memory waits for every kernel queued before it."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class DDPMPipeline(DiffusionPipeline):
    """Unconditional image generation with a DDPM ε-predictor and the DDPM scheduler.

    Components: ``unet`` (``ddpm_hf.DDPMUNet`` or ``diffusers.UNet2DModel``) and ``scheduler`` (``ddpm_hf.DDPMScheduler``
    or any diffusers scheduler with the same interface). Same samples as ``diffusers.DDPMPipeline`` for the same
    float32 weights, config and generator. With the network in bf16/fp16 the chain stays float32 (diffusers' rounds
    x_t to the network's dtype at every step).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["sample", "pred_original_sample"]

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    # ------------------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------------------

    def _image_shape(self, batch_size: int):
        size = self.unet.config.sample_size
        if size is None:
            raise ValueError("unet.config.sample_size is not set; set it to the training resolution.")
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, *size)

    def _chain_dtype(self) -> torch.dtype:
        """The dtype of x_t along the reverse chain: float32 under a half-precision network, else the network's own.
        A bf16 x_t keeps 8 bits of mantissa, so the chain's late updates, a few thousandths on values near 1, would
        round away; diffusers' pipeline runs its chain in the network's dtype and loses them."""
        dtype = self.unet.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def _initial_noise(self, batch_size: int, generator: GeneratorArg) -> torch.Tensor:
        """x_T ~ N(0, I), drawn on the generator's device (the same numbers on any execution device)."""
        shape = self._image_shape(batch_size)
        device, dtype = self._execution_device, self._chain_dtype()
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"Got {len(generator)} generators for batch_size={batch_size}; pass one per sample.")
            if len(generator) > 1:
                draws = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
                return _onto(torch.cat(draws), device)
            generator = generator[0]
        noise_device = generator.device if generator is not None else device
        if device.type == "mps":
            noise_device = torch.device("cpu")
        return _onto(torch.randn(shape, generator=generator, device=noise_device, dtype=dtype), device)

    def _reverse_chain(
        self,
        sample: torch.Tensor,
        generator: GeneratorArg,
        on_step: Optional[Callable[[int, torch.Tensor, Any], Optional[torch.Tensor]]] = None,
    ) -> torch.Tensor:
        """Run the scheduler's timesteps from ``sample``: x_{t−1} = step(ε_θ(x_t, t), t, x_t). ``on_step(i, t, out)``
        sees every step's output and may return a replacement sample. The network runs in its own dtype, the chain in
        :meth:`_chain_dtype`."""
        network_dtype = self.unet.dtype
        # The network's t on the sample's device, copied once: a host t would be copied at every call, each copy
        # waiting for the device (and a compiled network's CUDA graphs are not used with an input on the host).
        # The scheduler keeps its host t.
        network_timesteps = _onto(self.scheduler.timesteps, sample.device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(sample, t)
            # (a copy: a network compiled with CUDA graphs overwrites its output at the next call, and the step's
            # outputs, handed to callbacks, may be that output itself)
            model_output = self.unet(model_input.to(network_dtype), network_timesteps[i]).sample.to(sample.dtype,
                                                                                                   copy=True)
            out = self.scheduler.step(model_output, t, sample, generator=generator)
            sample = out.prev_sample
            if on_step is not None:
                replaced = on_step(i, t, out)
                sample = sample if replaced is None else replaced.to(sample.dtype)
        return sample

    def _postprocess(self, images: torch.Tensor, output_type: str):
        if output_type == "pil":
            return _to_pil(images)
        images = (images / 2 + 0.5).clamp(0, 1)
        return images if output_type == "pt" else images.cpu().permute(0, 2, 3, 1).float().numpy()

    def _set_timesteps(self, num_inference_steps: Optional[int], timesteps: Optional[List[int]]) -> None:
        """``timesteps``, else ``num_inference_steps`` evenly spread, else the full chain."""
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=list(timesteps))
        elif num_inference_steps is None:
            self.scheduler.set_timesteps(self.scheduler.config.num_train_timesteps)
        else:
            self.scheduler.set_timesteps(num_inference_steps)

    @staticmethod
    def _check_common(batch_size: int, output_type: Optional[str]) -> str:
        """The output type to make (``None`` and ``"numpy"`` are ``"np"``, as for diffusers' pipeline)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if output_type in NUMPY_ALIASES:
            return "np"
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; choose one of {OUTPUT_TYPES}.")
        return output_type

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: GeneratorArg = None,
        num_inference_steps: Optional[int] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        *,
        timesteps: Optional[List[int]] = None,
        callback_on_step_end: Optional[Callable[["DDPMPipeline", int, torch.Tensor, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("sample",),
    ):
        """Sample ``batch_size`` images by ancestral sampling (Algorithm 2). The first five arguments are diffusers'
        DDPMPipeline's, in its order; the others are passed by name.

        Args:
            batch_size: number of images.
            generator: a ``torch.Generator`` or one per image (each image then depends on its own seed only).
            num_inference_steps: steps of the reverse chain, by default the full chain (the model's
                ``num_train_timesteps``: the paper's 1000); fewer steps use the scheduler's ``timestep_spacing``.
                Ignored when ``timesteps`` is given.
            timesteps: explicit strictly descending timesteps.
            output_type: ``"pil"`` (uint8 images), ``"np"`` (float in [0, 1], NHWC; also ``"numpy"`` or None) or
                ``"pt"`` (float in [0, 1], NCHW).
            callback_on_step_end: ``fn(pipe, i, t, callback_kwargs) -> dict`` after every step; ``callback_kwargs``
                holds the tensors named in ``callback_on_step_end_tensor_inputs`` and a returned ``"sample"``
                replaces the current sample.
        """
        output_type = self._check_common(batch_size, output_type)
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} unknown; choose from {self._callback_tensor_inputs}.")
        self._set_timesteps(num_inference_steps, timesteps)
        sample = self._initial_noise(batch_size, generator)

        on_step = None
        if callback_on_step_end is not None:
            def on_step(i, t, out):
                tensors = {"sample": out.prev_sample, "pred_original_sample": out.pred_original_sample}
                result = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                return (result or {}).get("sample")

        sample = self._reverse_chain(sample, generator, on_step)
        images = self._postprocess(sample, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @torch.no_grad()
    def progressive(
        self,
        batch_size: int = 4,
        generator: GeneratorArg = None,
        num_inference_steps: Optional[int] = None,
        num_snapshots: int = 10,
        snapshot_timesteps: Optional[Sequence[int]] = None,
        output_type: str = "pil",
    ) -> ProgressiveOutput:
        """Progressive generation (§4.4, Fig. 6): the predicted x̂_0 at ``num_snapshots`` evenly spaced points of the
        reverse chain (or at ``snapshot_timesteps``), ending with the final sample. Large-scale features appear
        first and details last."""
        output_type = self._check_common(batch_size, output_type)
        self._set_timesteps(num_inference_steps, None)
        chain = [int(t) for t in self.scheduler.timesteps]
        if snapshot_timesteps is None:
            if not 1 <= num_snapshots <= len(chain):
                raise ValueError(f"num_snapshots must be in [1, {len(chain)}], got {num_snapshots}.")
            picks = np.linspace(0, len(chain) - 1, num_snapshots).round().astype(int)
            wanted = [chain[i] for i in picks]
        else:
            wanted = [int(t) for t in snapshot_timesteps]
            missing = sorted(set(wanted) - set(chain))
            if missing:
                raise ValueError(f"snapshot_timesteps {missing} are not steps of the chain ({chain[0]}..{chain[-1]}).")
        kept: Dict[int, torch.Tensor] = {}

        def on_step(i, t, out):
            if int(t) in wanted:
                kept[int(t)] = out.pred_original_sample.clone()

        sample = self._reverse_chain(self._initial_noise(batch_size, generator), generator, on_step)
        order = sorted(kept, reverse=True)
        tiles = [_to_pil(kept[t]) for t in order]
        grid = image_grid([tiles[k][b] for b in range(batch_size) for k in range(len(order))], batch_size, len(order))
        return ProgressiveOutput(images=self._postprocess(sample, output_type),
                                 snapshots=[self._postprocess(kept[t], output_type) for t in order],
                                 timesteps=order, grid=grid)

    def _as_model_input(self, image, name: str) -> torch.Tensor:
        if isinstance(image, Image.Image):
            channels = self.unet.config.in_channels
            # 16-bit grey: v / 65535 (convert() would clip it at 255); ddpm_hf.data.decoding's own scaling is not
            # imported: this file also runs as a folder's remote code, where ddpm_hf is not installed
            if image.mode in ("I;16", "I;16B", "I;16L"):
                array = np.asarray(image, dtype=np.float32)[..., None].repeat(channels, -1) / 32767.5 - 1
            else:
                array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 127.5 - 1
            image = torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)
        if not torch.is_tensor(image):
            raise ValueError(f"{name} must be a PIL image or a tensor in [-1, 1], got {type(image).__name__}.")
        if image.dtype == torch.uint8:  # pixels as ddpm_hf's data and the bound take them
            image = image.float() / 127.5 - 1
        elif not image.is_floating_point():
            raise ValueError(f"{name} must be uint8 pixels or float in [-1, 1], got dtype {image.dtype}.")
        elif image.numel() and (image.min() < -1 - 1e-3 or image.max() > 1 + 1e-3):
            raise ValueError(f"{name} has values in [{float(image.min()):g}, {float(image.max()):g}]: the model takes "
                             "[-1, 1] (pixels p as p / 127.5 - 1); pass uint8 pixels or scale them.")
        image = image[None] if image.ndim == 3 else image
        expected = self._image_shape(1)[1:]
        if image.ndim != 4 or image.shape[0] != 1 or tuple(image.shape[1:]) != expected:
            raise ValueError(f"{name} must have shape {expected} (or 1×{expected}), got {tuple(image.shape)}.")
        return image.to(self._execution_device, self._chain_dtype())

    @torch.no_grad()
    def interpolate(
        self,
        image_a,
        image_b,
        lambdas: Union[int, Sequence[float]] = 8,
        t: int = 500,
        seed: int = 0,
        output_type: str = "pil",
    ) -> InterpolationOutput:
        """Interpolation through the diffusion latent (§4.3, Fig. 8): encode both images once with the stochastic
        encoder, x_t, x'_t ~ q(x_t | x_0); decode x̄_t = (1 − λ) x_t + λ x'_t with the reverse chain from t. The
        encoding noise and the reverse-chain noise are the same for every λ (``seed``), so only λ varies.

        Args:
            image_a, image_b: PIL images, uint8 tensors (pixels) or float tensors in [-1, 1], of the model's shape.
            lambdas: the λ values, or their number (evenly spaced in [0, 1]).
            t: the diffusion step of the latent (the paper uses 500 of 1000).
        """
        output_type = self._check_common(1, output_type)
        num_train = self.scheduler.config.num_train_timesteps
        if not isinstance(t, int) or not 0 <= t < num_train:
            raise ValueError(f"t must be an integer in [0, {num_train - 1}], got {t!r}.")
        lambdas = list(np.linspace(0, 1, lambdas)) if isinstance(lambdas, int) else [float(x) for x in lambdas]
        if not lambdas:
            raise ValueError("lambdas is empty; pass the λ values or how many to use.")
        x_a, x_b = self._as_model_input(image_a, "image_a"), self._as_model_input(image_b, "image_b")
        encoder = torch.Generator().manual_seed(seed)
        noise_a = torch.randn(x_a.shape, generator=encoder).to(x_a)
        noise_b = torch.randn(x_b.shape, generator=encoder).to(x_b)
        step = torch.tensor([t])
        latent_a = self.scheduler.add_noise(x_a, noise_a, step)
        latent_b = self.scheduler.add_noise(x_b, noise_b, step)
        weights = torch.tensor(lambdas, dtype=x_a.dtype, device=x_a.device).view(-1, 1, 1, 1)
        latents = (1 - weights) * latent_a + weights * latent_b
        self.scheduler.set_timesteps(timesteps=list(range(t, -1, -1)))
        generators = [torch.Generator().manual_seed(seed + 1) for _ in lambdas]  # same reverse noise for every λ
        decoded = self._reverse_chain(latents, generators)
        tiles = _to_pil(x_a) + _to_pil(decoded) + _to_pil(x_b)
        return InterpolationOutput(images=self._postprocess(decoded, output_type), lambdas=lambdas,
                                   grid=image_grid(tiles, 1, len(tiles)))

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoint format
    # ------------------------------------------------------------------------------------------------------------

    def diffusers_can_load(self) -> bool:
        """True when plain diffusers computes the same samples from this pipeline's saved configs."""
        check = getattr(self.scheduler, "is_diffusers_equivalent", None)
        return True if check is None else bool(check())

    def save_pretrained(self, save_directory: Union[str, os.PathLike], safe_serialization: bool = True,
                        variant: Optional[str] = None, max_shard_size=None, push_to_hub: bool = False,
                        use_flashpack: bool = False, **kwargs) -> None:
        """Write the pipeline folder: a plain diffusers folder when diffusers computes the same thing, else a
        remote-code folder (see the module docstring). diffusers' arguments that would write a folder ddpm_hf does
        not load (a weight ``variant``, weights in shards) are refused, as ``from_pretrained`` refuses them; the
        others are named: none is ignored. ``push_to_hub`` is a separate method here."""
        if push_to_hub:
            raise ValueError("use pipe.push_to_hub(repo_id) to publish; save_pretrained only writes the folder.")
        if variant is not None:
            raise ValueError(f"variant={variant!r}: ddpm_hf saves one float32 file, no variants (from_pretrained "
                             "reads no other); leave it out, and load with torch_dtype for another precision.")
        if use_flashpack:
            raise ValueError("use_flashpack=True: ddpm_hf saves safetensors only (from_pretrained reads no other); "
                             "leave it out.")
        if max_shard_size is not None:
            raise ValueError(f"max_shard_size={max_shard_size!r}: ddpm_hf saves the U-Net's weights as one file "
                             "(from_pretrained reads no shards); leave it out.")
        if kwargs:
            raise TypeError(f"save_pretrained() got arguments it does not take: {sorted(kwargs)}.")
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=safe_serialization)
        self.scheduler.save_pretrained(folder / "scheduler")
        _set_class_name(folder / "unet" / "config.json", "UNet2DModel")
        # a diffusers scheduler swapped in (pipe.scheduler = DDIMScheduler.from_config(...)) is saved as what it is
        theirs = type(self.scheduler).__module__.startswith("diffusers.")
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers_version, "unet": ["diffusers", "UNet2DModel"],
                 "scheduler": ["diffusers", type(self.scheduler).__name__ if theirs else "DDPMScheduler"]}
        stale = [folder / PIPELINE_FILE, folder / "scheduler" / SCHEDULER_FILE]
        if theirs or self.diffusers_can_load():
            if not theirs:
                _set_class_name(folder / "scheduler" / "scheduler_config.json", "DDPMScheduler")
            for path in stale:
                path.unlink(missing_ok=True)
        else:
            shutil.copyfile(inspect.getsourcefile(type(self)), folder / PIPELINE_FILE)
            shutil.copyfile(inspect.getsourcefile(type(self.scheduler)), folder / "scheduler" / SCHEDULER_FILE)
            index["_class_name"] = [PIPELINE_FILE[:-3], type(self).__name__]
            index["scheduler"] = [SCHEDULER_FILE[:-3], type(self.scheduler).__name__]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "DDPMPipeline":
        """Load a pipeline folder or Hub repo (ddpm_hf's layouts or a diffusers DDPM folder such as
        google/ddpm-cifar10-32) into ddpm_hf's own classes. Keyword arguments: ``revision``, ``token``,
        ``cache_dir``, ``local_files_only``, ``force_download``, ``dtype`` (or ``torch_dtype``), ``allow_pickle``
        (default False: safetensors only), and diffusers' other loading arguments where they apply (see
        :func:`ddpm_hf.hub.load_components`); ``unet=`` or ``scheduler=`` replace the folder's, as in diffusers
        (``scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler")``). Without ddpm_hf installed, use
        ``diffusers.DiffusionPipeline.from_pretrained`` instead."""
        import importlib

        try:  # (by name: diffusers' check of remote code would take an import statement for a requirement)
            load_components = importlib.import_module("ddpm_hf.hub").load_components
        except ModuleNotFoundError as err:  # (ddpm_hf's own ImportError, a dependency too old, is its own message)
            if err.name not in ("ddpm_hf", "ddpm_hf.hub"):
                raise
            raise ImportError("DDPMPipeline.from_pretrained needs the ddpm_hf package (pip install ddpm-hf); without "
                              "it use diffusers.DiffusionPipeline.from_pretrained(path, trust_remote_code=True).") from err
        return cls(**load_components(pretrained_model_name_or_path, **kwargs))

    # ------------------------------------------------------------------------------------------------------------
    # Hub
    # ------------------------------------------------------------------------------------------------------------

    def push_to_hub(
        self,
        repo_id: str,
        private: Optional[bool] = None,
        token: Optional[Union[str, bool]] = None,
        commit_message: Optional[str] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        license: Optional[str] = "apache-2.0",
        datasets: Optional[Sequence[str]] = None,
        training_config: Optional[Dict[str, Any]] = None,
        evaluation: Optional[Dict[str, Any]] = None,
        sample_grid: Union[Image.Image, None, bool] = None,
        grid_seed: int = 0,
        grid_size: int = 4,
        grid_inference_steps: Optional[int] = None,
        parent_commit: Optional[str] = None,
        base_model: Optional[str] = None,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
    ):
        """Upload the pipeline folder (weights, configs, module files when needed) with a generated model card and a
        sample grid, and nothing else. An unchanged re-push makes no new commit. The token is never printed.

        ``sample_grid`` defaults to a ``grid_size`` × ``grid_size`` grid sampled with seed ``grid_seed`` (False: no
        grid, none sampled); ``training_config`` and ``evaluation`` (e.g. ``{"bits/dim": 3.75}``) go into the card
        when given. ``parent_commit``: the commit is refused (HTTP 412) unless ``revision`` is still at it.
        ``base_model``: the Hub model it was fine-tuned from, in the card's metadata. ``license`` None: none in the
        card. ``safe_serialization`` and ``variant`` as in :meth:`save_pretrained` (diffusers' arguments).
        Returns huggingface_hub's ``CommitInfo`` (or None when nothing changed)."""
        from huggingface_hub import HfApi
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo_id)  # before any request
        api = HfApi(token=token)
        if sample_grid is None:  # a token that cannot write there fails before the grid's sampling, not after it
            self._check_push_rights(api, repo_id, create_pr)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, variant=variant)  # (refuses first too)
            # as the Hub names it: "name" is the token's account's "account/name"
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
            if sample_grid is None:
                steps = grid_inference_steps or self.scheduler.config.num_train_timesteps
                images = self(batch_size=grid_size**2, generator=torch.Generator().manual_seed(grid_seed),
                              num_inference_steps=steps).images
                sample_grid = image_grid(images, grid_size, grid_size)
            if sample_grid is not False:
                sample_grid.save(Path(tmp) / "samples.png")
            if _a_card_of_its_own(api, repo_id, revision):  # kept, as diffusers' push_to_hub keeps a repo's card
                logger.warning("%s has a README.md that ddpm_hf did not write: it is kept (remove it, or add the tag "
                               "ddpm_hf to its metadata, for ddpm_hf's card)", repo_id)
            else:
                card = model_card(repo_id, self, license=license, datasets=datasets, training_config=training_config,
                                  evaluation=evaluation, grid=sample_grid is not False, base_model=base_model)
                (Path(tmp) / "README.md").write_text(card, encoding="utf-8")
            # files of an earlier upload that this one has not go in the same commit (see STALE_AFTER_UPLOAD)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or "Upload DDPM pipeline with ddpm_hf",
                                     delete_patterns=STALE_AFTER_UPLOAD, parent_commit=parent_commit)

    @staticmethod
    def _check_push_rights(api, repo_id: str, create_pr: bool) -> None:
        """Raise PermissionError when the token's account cannot write in ``repo_id``'s namespace: creating the repo
        does not tell (an existing repo of another account is "created" all the same). A pull request needs no right
        on the repo."""
        me = api.whoami()
        role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
        namespace = repo_id.rpartition("/")[0] or me["name"]
        if role == "read" or (role != "fineGrained" and not create_pr and namespace not in writable_namespaces(me)):
            raise PermissionError(f"push_to_hub({repo_id!r}): the token's account, {me['name']}, cannot write there ("
                                  + ("the token only reads" if role == "read" else
                                     f"it writes in {', '.join(sorted(writable_namespaces(me)))}") +
                                  "): pass token= with write access there, another repo_id, or create_pr=True.")


def _a_card_of_its_own(api, repo_id: str, revision: Optional[str]) -> bool:
    """Whether the repo has a README.md that is not a card ddpm_hf wrote (whose metadata tags name ddpm_hf): a card
    its owner wrote, or edited taking the tag out, which a push keeps."""
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
    from huggingface_hub.repocard import metadata_load

    try:
        path = api.hf_hub_download(repo_id, "README.md", revision=revision)
    except (EntryNotFoundError, RevisionNotFoundError):  # a new repo, or a branch the push creates
        return False
    return "ddpm_hf" not in ((metadata_load(path) or {}).get("tags") or [])


def writable_namespaces(me: dict) -> set:
    """The namespaces the account of huggingface_hub's ``whoami()`` answer ``me`` writes in: its own, and its
    organisations' where its role is more than read."""
    return {me["name"]} | {org["name"] for org in me.get("orgs") or [] if org.get("roleInOrg") != "read"}


def _set_class_name(config_path: Path, class_name: str) -> None:
    config = json.loads(config_path.read_text())
    config["_class_name"] = class_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


PREDICTS = {"epsilon": "ε", "sample": "x₀", "v_prediction": "v", "mean": "μ"}  # what the network predicts


def model_card(repo_id: str, pipe: DDPMPipeline, license: Optional[str] = "apache-2.0",
               datasets: Optional[Sequence[str]] = None,
               training_config: Optional[Dict[str, Any]] = None, evaluation: Optional[Dict[str, Any]] = None,
               grid: bool = True, base_model: Optional[str] = None) -> str:
    """The README.md of a published pipeline: YAML metadata, the sample grid (samples.png, where ``grid``),
    configuration, numbers, usage."""
    meta = ["---", "library_name: diffusers", "pipeline_tag: unconditional-image-generation",
            *([f"license: {license}"] if license else []),
            "tags:", "- ddpm", "- ddpm_hf", "- diffusers", "- unconditional-image-generation"]
    if datasets:
        meta += ["datasets:"] + [f"- {json.dumps(d)}" for d in datasets]  # quoted: a repo named "null" stays a name
    if base_model:
        meta.append(f"base_model: {json.dumps(base_model)}")
    meta.append("---")
    unet, sched = pipe.unet.config, pipe.scheduler.config
    params = sum(p.numel() for p in pipe.unet.parameters())
    size = unet.sample_size
    lines = [
        f"# {repo_id.split('/')[-1]}", "",
        "A denoising diffusion probabilistic model (Ho, Jain & Abbeel 2020, arXiv:2006.11239) trained with "
        "[ddpm_hf](https://github.com/ddpm-hf/ddpm_hf).", "",
        *(["![samples](samples.png)", ""] if grid else []),
        "## Model", "",
        f"- U-Net {PREDICTS.get(sched.prediction_type, sched.prediction_type)}-predictor, {params:,} parameters, "
        f"{unet.in_channels} channel(s), {size}×{size} pixels, "
        f"block_out_channels {list(unet.block_out_channels)}, {unet.layers_per_block} residual blocks per level",
        f"- {sched.num_train_timesteps} diffusion steps, {sched.beta_schedule} β schedule "
        f"({sched.beta_start} → {sched.beta_end}), variance {sched.get('variance_type', 'none (deterministic)')}, "
        f"prediction {sched.prediction_type}" + ("" if type(pipe.scheduler).__name__ == "DDPMScheduler" else
                                                 f", sampled with {type(pipe.scheduler).__name__}"),
    ]
    if training_config:
        lines += ["", "## Training configuration", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(training_config.items())]
    if evaluation:
        lines += ["", "## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(evaluation.items())]
    plain = pipe.diffusers_can_load()  # else diffusers loads this file's pipeline as remote code
    loader = ("DiffusionPipeline.from_pretrained(repo_id)" if plain
              else "DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)")
    lines += [
        "", "## Usage", "", "With plain diffusers:", "", "```python",
        "from diffusers import DiffusionPipeline", "", f'repo_id = "{repo_id}"', f"pipe = {loader}",
        f"image = pipe(num_inference_steps={sched.num_train_timesteps}).images[0]  # the full chain", "```", "",
    ]
    if plain:  # diffusers' own DDPMPipeline samples it
        lines += ["Keep that pipeline in float32: in `torch_dtype=torch.bfloat16` diffusers' pipeline rounds its whole "
                  "chain to bf16, which loses the late steps. ddpm_hf's pipeline runs the network in bf16 and keeps "
                  "the chain in float32.", ""]
    lines += [
        "With ddpm_hf (adds bits/dim, progressive generation, interpolation and bf16 sampling):", "", "```python",
        "from ddpm_hf import DDPMPipeline", "", f'pipe = DDPMPipeline.from_pretrained("{repo_id}")',
        "images = pipe(batch_size=16).images", "",
        "pipe.unet.bfloat16()  # the network in bf16, the chain in float32",
        "images = pipe(batch_size=16).images", "```", "",
    ]
    return "\n".join(meta + lines)
