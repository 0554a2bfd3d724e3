# Copyright 2026 The ddpm_hf authors. Apache-2.0.
"""The DDPM noise scheduler of Ho, Jain & Abbeel (2020), arXiv:2006.11239.

Self-contained: this file depends on torch, numpy and diffusers' base classes only, so it can be shipped as is into a
Hub repository as remote code.

The configuration (names, defaults, meanings) is that of ``diffusers.DDPMScheduler``, so a ``scheduler_config.json``
moves between the two classes unchanged and ``from_config`` swaps this scheduler with DDIM, DPM-Solver and the other
Karras-compatible schedulers. The outputs of :meth:`DDPMScheduler.step`, :meth:`DDPMScheduler.add_noise` and
:meth:`DDPMScheduler.get_velocity` equal diffusers' for every option, with two deliberate exceptions where diffusers
is wrong:

* ``variance_type="fixed_large_log"``: diffusers takes the square root of log β_t, which is negative, and returns NaN
  samples (diffusers#14569). Here the log-variance is exponentiated, so the samples equal ``fixed_large``'s.
* ``prediction_type="mean"`` (not in diffusers): the network outputs the reverse mean μ_θ(x_t, t) itself, the
  paper's "μ̃ prediction" (Table 2; the original code's ``xprev``). diffusers has no such type and raises on it.
* ``variance_type="learned"``: diffusers reads the model's extra output channels as a *variance* and takes its square
  root (NaN as soon as the network outputs a negative number). Here, as in improved-diffusion (Nichol & Dhariwal 2021)
  and the paper's "learned diagonal Σ_θ" ablation, they are a *log-variance*: σ_t = exp(v / 2).

Notation in the docstrings: ᾱ_t = Π_{s≤t} (1 − β_s), β̃_t the posterior variance, "eq. N" the paper's equation N.
Timesteps are 0-based as in diffusers: index t here is the paper's step t + 1.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
# The variance types read σ_t from the model's extra output channels (2C channels for C image channels).
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# What diffusers' DDPMScheduler knows, and "mean": the network outputs μ_θ(x_t, t) (the paper's μ̃ prediction).
DIFFUSERS_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
PREDICTION_TYPES = DIFFUSERS_PREDICTION_TYPES + ("mean",)
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers computes these variance types differently (and wrongly): a pipeline using them cannot be saved as a plain
# diffusers folder, since diffusers would sample something else from the same config.
VARIANCE_TYPES_DIFFUSERS_GETS_WRONG = ("fixed_large_log", "learned")
# Floor of β̃ before taking its log: the posterior variance is exactly 0 at the first step.
_MIN_VARIANCE = 1e-20

Timesteps = Union[int, torch.Tensor]


@dataclass
class DDPMSchedulerOutput(BaseOutput):
    """Output of :meth:`DDPMScheduler.step`.

    Args:
        prev_sample: x_{t−1}, the next sample of the reverse chain (Algorithm 2).
        pred_original_sample: x̂_0, the model's prediction of the clean sample (after clipping/thresholding).
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}.")


def _alpha_bar_betas(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = 1 − ᾱ(t+1)/ᾱ(t) for a continuous ᾱ on [0, 1], capped at ``max_beta`` (Nichol & Dhariwal 2021, eq. 17)."""
    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(t: float) -> float:
    log_snr = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(log_snr)
    return math.sqrt(snr / (1 + snr))


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """The forward-process variances β_1..β_T (float32). The paper's schedule is ``linear`` from 1e-4 to 0.02 (§4)."""
    if trained_betas is not None:
        return torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # latent-diffusion's schedule: linear in √β
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _alpha_bar_betas(num_train_timesteps, _cosine_alpha_bar)
    if beta_schedule == "laplace":
        return _alpha_bar_betas(num_train_timesteps, _laplace_alpha_bar)
    return torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start


def rescale_to_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ_t so that ᾱ_T = 0 while ᾱ_1 is kept (Lin et al. 2023, Algorithm 1)."""
    sqrt_alpha_bars = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bars[0].clone(), sqrt_alpha_bars[-1].clone()
    sqrt_alpha_bars = (sqrt_alpha_bars - last) * (first / (first - last))
    alpha_bars = sqrt_alpha_bars**2
    alphas = torch.cat([alpha_bars[0:1], alpha_bars[1:] / alpha_bars[:-1]])
    return 1 - alphas


# Device types where timesteps stay on the device: the ᾱ table is looked up there and t is checked by a device-side
# assertion (torch._assert_async has kernels for CUDA; meta runs the same code without values, for the tests).
DEVICE_LOOKUP = ("cuda", "meta")


def _lookup(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """table[t] shaped like t; a 0-dim t indexes as a 1-element vector (a 0-dim index is read on the host)."""
    return table[t.reshape(-1)].reshape(t.shape)


def randn_like_batch(
    shape: Sequence[int],
    generator: Optional[Union[torch.Generator, List[torch.Generator]]],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise of ``shape``; a list of generators seeds each batch element on its own.

    The noise is drawn on the generator's device and then moved, so that a CPU generator gives the same numbers
    whatever device the model runs on (the convention of diffusers' pipelines). Host noise for a CUDA device is drawn
    into pinned memory and copied without blocking: a copy from pageable memory makes the host wait for every kernel
    queued before it, so at each step of a chain the GPU would idle while the host queues the next network call.
    (A list mixing generators of several devices draws each sample on its own and copies it plainly; a None in the
    list draws from the global generator.)
    """
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if isinstance(generator, (list, tuple)) and len(generators) != shape[0]:
        raise ValueError(f"Got {len(generators)} generators for a batch of {shape[0]}; pass one per sample.")
    device = torch.device(device)
    draw_devices = {device if g is None else g.device for g in generators}
    if len(draw_devices) > 1:  # generators on several devices: each sample drawn on its own
        draws = [torch.randn((1, *shape[1:]), generator=g, device=device if g is None else g.device, dtype=dtype)
                 for g in generators]
        return torch.cat([d.to(device) for d in draws])
    draw_device = draw_devices.pop()
    pinned = draw_device.type == "cpu" and device.type == "cuda"
    noise = torch.empty(tuple(shape), dtype=dtype, device=draw_device, pin_memory=pinned)
    if len(generators) == 1:
        noise.normal_(generator=generators[0])  # the numbers of torch.randn(shape, generator=g)
    else:
        _draw_rows(noise.split(1), generators)
    return noise.to(device, non_blocking=pinned)  # (non-blocking only into the device: a host copy would be unready)


_ROWS_PER_THREAD = 32  # below this many rows per thread, a thread costs more than it saves
_row_threads: dict = {}  # thread count -> pool, made on first use
if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_row_threads.clear)  # a forked child has none of the pools' threads


def _draw_rows(rows: Sequence[torch.Tensor], generators: Sequence[Optional[torch.Generator]]) -> None:
    """Row i filled from generators[i]. Host rows are drawn by up to torch.get_num_threads() threads (normal_ runs
    without the interpreter lock): ``ddpm-hf evaluate`` draws each image's noise from its own host generator at every
    step, 9 ms per step for 256 images of 32² on one thread here, host time that must stay below the network's GPU
    time per step. Each row comes from its own generator, so the numbers do not depend on the thread count; a
    generator listed twice (or None, the global one) is drawn from in row order, on one thread."""
    workers = min(torch.get_num_threads(), 8, len(rows) // _ROWS_PER_THREAD)
    distinct = None not in generators and len({id(g) for g in generators}) == len(generators)
    if workers < 2 or rows[0].device.type != "cpu" or not distinct:
        for row, g in zip(rows, generators):
            row.normal_(generator=g)
        return
    pool = _row_threads.get(workers) or _row_threads.setdefault(
        workers, ThreadPoolExecutor(workers, thread_name_prefix="ddpm_hf-noise"))

    def draw(first: int) -> None:
        for i in range(first, len(rows), workers):
            rows[i].normal_(generator=generators[i])

    list(pool.map(draw, range(workers)))


class DDPMScheduler(SchedulerMixin, ConfigMixin):
    """Denoising diffusion probabilistic model scheduler: the forward process q and the ancestral sampler of
    Algorithm 2, plus the closed-form Gaussian quantities the variational bound needs.

    Args (same names, defaults and meanings as ``diffusers.DDPMScheduler``):
        num_train_timesteps: T, the length of the forward chain.
        beta_start, beta_end: first and last β of the ``linear``, ``scaled_linear`` and ``sigmoid`` schedules.
        beta_schedule: ``linear`` (the paper's), ``scaled_linear``, ``squaredcos_cap_v2`` (cosine), ``sigmoid``,
            ``laplace``.
        trained_betas: explicit β_1..β_T; overrides the schedule.
        variance_type: σ_t² of p_θ(x_{t−1}|x_t): ``fixed_small`` (β̃_t), ``fixed_large`` (β_t), their ``_log`` forms
            (same samples, computed through the log), ``learned`` (the model's extra channels are log σ_t²; see the
            module docstring for how this differs from diffusers) or ``learned_range`` (they interpolate between
            log β̃_t and log β_t, improved-diffusion eq. 15).
        clip_sample, clip_sample_range: clip x̂_0 to [−range, range] before computing μ̃_t.
        prediction_type: what the model predicts: ``epsilon`` (ε, the paper's choice), ``sample`` (x_0),
            ``v_prediction`` (v = √ᾱ_t ε − √(1−ᾱ_t) x_0) or ``mean`` (μ_θ(x_t, t), the mean of x_{t−1}: the paper's
            μ̃ prediction of Table 2; ddpm_hf only).
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding of x̂_0.
        timestep_spacing, steps_offset: how :meth:`set_timesteps` picks fewer inference steps.
        rescale_betas_zero_snr: rescale β so that ᾱ_T = 0 (Lin et al. 2023).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        for name, value in (("clip_sample_range", clip_sample_range), ("sample_max_value", sample_max_value),
                            ("dynamic_thresholding_ratio", dynamic_thresholding_ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative integer, got {steps_offset!r}.")
        if trained_betas is None and (not isinstance(num_train_timesteps, int) or num_train_timesteps < 1):
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}.")
        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if trained_betas is not None and len(betas) != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {len(betas)} values but num_train_timesteps={num_train_timesteps}; "
                "pass num_train_timesteps=len(trained_betas)."
            )
        if rescale_betas_zero_snr:
            betas = rescale_to_zero_terminal_snr(betas)
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("every β_t must lie in (0, 1]; check beta_start/beta_end or trained_betas.")

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.variance_type = variance_type

    # ------------------------------------------------------------------------------------------------------------
    # Inference timesteps
    # ------------------------------------------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        """DDPM feeds x_t to the model unscaled; kept for interchangeability with schedulers that scale."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[List[int]] = None,
    ) -> None:
        """Choose the timesteps of the reverse chain: ``num_inference_steps`` spaced by ``timestep_spacing``, or an
        explicit strictly descending list ``timesteps``. Skipping steps uses the respaced
        β'_t = 1 − ᾱ_t / ᾱ_{t'} between consecutive chosen steps (as improved-diffusion's respacing)."""
        num_train = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of `num_inference_steps` or `timesteps` to set_timesteps.")
        if timesteps is not None:
            chosen = np.asarray([int(t) for t in timesteps], dtype=np.int64)
            if chosen.size == 0:
                raise ValueError("`timesteps` is empty; pass at least one timestep.")
            if (np.diff(chosen) >= 0).any():
                raise ValueError(f"`timesteps` must be strictly descending, got {chosen.tolist()}.")
            if chosen[0] >= num_train or chosen[-1] < 0:
                raise ValueError(
                    f"`timesteps` must lie in [0, {num_train - 1}] (num_train_timesteps={num_train}), "
                    f"got {chosen[0]}..{chosen[-1]}."
                )
            self.custom_timesteps = True
            self.num_inference_steps = len(chosen)
        else:
            if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= num_train:
                raise ValueError(
                    f"num_inference_steps must be an integer in [1, {num_train}] (num_train_timesteps), "
                    f"got {num_inference_steps!r}."
                )
            self.custom_timesteps = False
            self.num_inference_steps = int(num_inference_steps)
            chosen = self._spaced_timesteps(int(num_inference_steps))
            if chosen.max() >= num_train:  # diffusers accepts this and fails later with an IndexError
                raise ValueError(
                    f"steps_offset={self.config.steps_offset} with {num_inference_steps} 'leading' steps reaches "
                    f"timestep {chosen.max()} >= num_train_timesteps={num_train}; use fewer steps or steps_offset=0."
                )
        self.timesteps = torch.from_numpy(chosen).to(device)

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        num_train = self.config.num_train_timesteps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            return np.linspace(0, num_train - 1, n).round()[::-1].copy().astype(np.int64)
        if spacing == "leading":  # never visits T−1 when n < T (Lin et al. 2023); kept for compatibility
            return (np.arange(0, n) * (num_train // n)).round()[::-1].astype(np.int64) + self.config.steps_offset
        return np.round(np.arange(num_train, 0, -num_train / n)).astype(np.int64) - 1  # trailing

    def previous_timestep(self, timestep: Timesteps) -> Timesteps:
        """The timestep that follows ``timestep`` in the reverse chain (−1 after the last one)."""
        if self.custom_timesteps or self.num_inference_steps:
            matches = (self.timesteps == timestep).nonzero(as_tuple=True)[0]
            if len(matches) == 0:
                raise ValueError(
                    f"timestep {int(timestep)} is not one of the timesteps set by set_timesteps "
                    f"({self.timesteps[0].item()}..{self.timesteps[-1].item()}, {len(self.timesteps)} steps)."
                )
            index = matches[0]
            return torch.tensor(-1) if index == len(self.timesteps) - 1 else self.timesteps[index + 1]
        return timestep - 1

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def is_diffusers_equivalent(self) -> bool:
        """True when ``diffusers.DDPMScheduler`` with this config samples exactly as this scheduler does; False for
        the variance types diffusers computes wrongly and the prediction type it lacks (see the module docstring)."""
        return (self.config.variance_type not in VARIANCE_TYPES_DIFFUSERS_GETS_WRONG
                and self.config.prediction_type in DIFFUSERS_PREDICTION_TYPES)

    # ------------------------------------------------------------------------------------------------------------
    # The paper's quantities, each defined once: step, add_noise, the bound and the losses all call these. `t` is an
    # int, a 0-dim tensor or one timestep per batch element; `prev_t` defaults to t − 1 (the full chain) and is the
    # next chosen step when sampling with fewer steps, where β_t = 1 − ᾱ_t / ᾱ_{prev} (the respaced β).
    # ------------------------------------------------------------------------------------------------------------

    def _check_timesteps(self, t: Timesteps) -> torch.Tensor:
        """``t`` as an integer tensor, checked (integers in [0, T − 1]), where ᾱ is looked up for it: on its CUDA
        device, else on the CPU (MPS has no float64). On CUDA a device-side assertion checks them, since reading them
        back would stall the GPU at every training step; a failure surfaces at the device's next synchronisation and,
        as any device-side assertion, leaves the process's CUDA context unusable (an out-of-range t would otherwise
        index ᾱ silently from the end). On the host a ValueError names them."""
        t = torch.as_tensor(t)
        if t.device.type in DEVICE_LOOKUP:
            return self._assert_timesteps(t)
        t = t.cpu()
        num_train = self.config.num_train_timesteps
        if t.ndim == 0 and not t.dtype.is_floating_point:  # the sampling chain's t: one host read, not two
            if not 0 <= int(t) < num_train:
                raise ValueError(f"timesteps must lie in [0, {num_train - 1}] (num_train_timesteps={num_train}), "
                                 f"got {int(t)}.")
            return t
        if t.dtype.is_floating_point:
            if not bool((t == t.round()).all()):
                raise ValueError(f"timesteps must be integers, got {t.tolist()}.")
            t = t.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_train):
            shown = t.tolist() if t.numel() < 8 else f"{int(t.min())}..{int(t.max())}"
            raise ValueError(f"timesteps must lie in [0, {num_train - 1}] (num_train_timesteps={num_train}), got {shown}.")
        return t

    def _assert_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The checks of :meth:`_check_timesteps` as assertions computed on t's own device, without a host read."""
        num_train = self.config.num_train_timesteps
        if t.dtype.is_floating_point:
            torch._assert_async((t == t.round()).all(), "timesteps must be integers")
            t = t.long()
        torch._assert_async(((t >= 0) & (t < num_train)).all(),
                            f"timesteps must lie in [0, {num_train - 1}] (num_train_timesteps={num_train})")
        return t

    def _alpha_bars(
        self, t: Timesteps, prev_t: Optional[Timesteps] = None, dtype: torch.dtype = torch.float64
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ_t, ᾱ_{prev}) shaped like t, with ᾱ_{−1} = 1, on t's device if that is CUDA, else on the CPU.

        The one precision switch: float64 data (the bound) get ᾱ accumulated in float64, since in float32
        1 − ᾱ_t keeps only about four digits at small t; any other dtype gets diffusers' float32 ``alphas_cumprod``,
        so that step and add_noise reproduce diffusers' numbers. On a CUDA device the table is looked up there (a
        copy kept per device), so that training's per-example t never travels to the host and back; other devices
        look it up on the CPU (see :meth:`_check_timesteps`)."""
        t = self._check_timesteps(t)
        table = self._alpha_bar_table(torch.float64 if dtype == torch.float64 else torch.float32, t.device)
        one_prev = prev_t is None or isinstance(prev_t, (int, np.integer)) or getattr(prev_t, "ndim", None) == 0
        if t.ndim == 0 and t.device.type == "cpu" and one_prev:  # the sampling chain's t:
            prev = int(t) - 1 if prev_t is None else int(prev_t)  # indexed on the host, as diffusers does
            return table[int(t)], table[prev] if prev >= 0 else table.new_ones(())
        prev_t = t - 1 if prev_t is None else torch.as_tensor(prev_t).to(t.device)
        alpha_bar_prev = torch.where(prev_t >= 0, _lookup(table, prev_t.clamp(min=0)), table.new_ones(()))
        return _lookup(table, t), alpha_bar_prev

    def _alpha_bar_table(self, precision: torch.dtype, device: torch.device) -> torch.Tensor:
        """ᾱ_0 … ᾱ_{T−1}: diffusers' float32 ``alphas_cumprod``, or accumulated in float64; read afresh on the CPU,
        and copied once to a CUDA device (copying it at every step would wait for the device), again whenever the
        tensor it is computed from is replaced or changed in place."""
        source = self.betas if precision == torch.float64 else self.alphas_cumprod

        def table():
            return torch.cumprod(1 - source.double(), dim=0) if precision == torch.float64 else source

        if device.type == "cpu":
            return table()
        tables = self.__dict__.setdefault("_alpha_bar_tables", {})  # made on first use (also after unpickling)
        version = None if source.is_inference() else source._version  # (inference tensors keep no version)
        cached = tables.get((precision, str(device)))
        if cached is None or cached[0] is not source or cached[1] != version:
            cached = tables[(precision, str(device))] = (source, version, table().to(device))
        return cached[2]

    @staticmethod
    def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-sample values as (B, 1, …, 1) in ``like``'s dtype and device. One value for the whole batch (0-dim)
        stays a scalar in the schedule's precision (diffusers' step multiplies by float32 scalars, also in fp16), on
        the CPU unless t was on ``like``'s device."""
        if values.ndim == 0:
            return values if values.device.type == "cpu" or values.device == like.device else values.cpu()
        return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def signal_to_noise_ratio(self, t: Timesteps) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t) of q(x_t | x_0) (eq. 4), in float64 (1 − ᾱ_t loses digits in float32)."""
        alpha_bar = self._alpha_bars(t, dtype=torch.float64)[0]
        return alpha_bar / (1 - alpha_bar)

    def q_mean_variance(self, x_start: torch.Tensor, t: Timesteps) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean √ᾱ_t x_0 and variance 1 − ᾱ_t of q(x_t | x_0) (eq. 4)."""
        alpha_bar = self._expand(self._alpha_bars(t, dtype=x_start.dtype)[0], x_start)
        return alpha_bar**0.5 * x_start, 1 - alpha_bar

    def posterior_mean_coefficients(
        self, t: Timesteps, prev_t: Optional[Timesteps] = None, dtype: torch.dtype = torch.float64
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The coefficients of x_0 and x_t in μ̃_t(x_t, x_0) (eq. 7): √ᾱ_{t−1} β_t / (1 − ᾱ_t) and
        √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t), with α_t = ᾱ_t / ᾱ_{t−1} (in diffusers' operation order, for parity)."""
        alpha_bar, alpha_bar_prev = self._alpha_bars(t, prev_t, dtype)
        alpha = alpha_bar / alpha_bar_prev
        beta = 1 - alpha
        return (alpha_bar_prev**0.5 * beta) / (1 - alpha_bar), alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)

    def q_posterior_mean(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: Timesteps, prev_t: Optional[Timesteps] = None
    ) -> torch.Tensor:
        """μ̃_t(x_t, x_0), the mean of q(x_{t−1} | x_t, x_0) (eq. 7)."""
        coef_x0, coef_xt = (self._expand(c, x_t) for c in self.posterior_mean_coefficients(t, prev_t, x_t.dtype))
        return coef_x0 * x_start + coef_xt * x_t

    def posterior_variance(
        self, t: Timesteps, prev_t: Optional[Timesteps] = None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t, the variance of q(x_{t−1} | x_t, x_0) (eq. 7).

        Exactly 0 at the first step (t = 0 here, t = 1 in the paper)."""
        alpha_bar, alpha_bar_prev = self._alpha_bars(t, prev_t, dtype)
        return (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)

    def _posterior_variance_clipped(self, t: Timesteps, prev_t: Optional[Timesteps], dtype: torch.dtype):
        """β̃_t, with the first step's 0 replaced by β̃ of the second step (the original code and improved-diffusion
        do this, for the decoder of L_0) and floored at 1e-20 (a chain that skips steps also ends on β̃ = 0)."""
        t = self._check_timesteps(t)
        second = self.posterior_variance(torch.ones_like(t), dtype=dtype)
        return torch.where(t == 0, second, self.posterior_variance(t, prev_t, dtype).clamp(min=_MIN_VARIANCE))

    def posterior_log_variance_clipped(self, t: Timesteps, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """log β̃_t (eq. 7) with β̃ at the first step, where it is 0, replaced by β̃ at the second (§3.3's decoder)."""
        return torch.log(self._posterior_variance_clipped(t, None, dtype))

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: Timesteps
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean μ̃_t, variance β̃_t and clipped log-variance of q(x_{t−1} | x_t, x_0) (eqs. 6–7)."""
        variance = self._expand(self.posterior_variance(t, dtype=x_t.dtype), x_t)
        log_variance = self._expand(self.posterior_log_variance_clipped(t, x_t.dtype), x_t)
        return self.q_posterior_mean(x_start, x_t, t), variance, log_variance

    def predict_start_from_noise(self, x_t: torch.Tensor, t: Timesteps, noise: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, eq. 4 solved for x_0 (the x̂_0 of eq. 15)."""
        alpha_bar = self._expand(self._alpha_bars(t, dtype=x_t.dtype)[0], x_t)
        return (x_t - (1 - alpha_bar) ** 0.5 * noise) / alpha_bar**0.5

    def predict_noise_from_start(self, x_t: torch.Tensor, t: Timesteps, x_start: torch.Tensor) -> torch.Tensor:
        """ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t), eq. 4 solved for ε."""
        alpha_bar = self._expand(self._alpha_bars(t, dtype=x_t.dtype)[0], x_t)
        return (x_t - alpha_bar**0.5 * x_start) / (1 - alpha_bar) ** 0.5

    def predict_start(self, model_output: torch.Tensor, x_t: torch.Tensor, t: Timesteps) -> torch.Tensor:
        """x̂_0 from the model's output, by ``prediction_type``: from ε as eq. 15 (:meth:`predict_start_from_noise`),
        x_0 itself, from v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022): x̂_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v, or from
        the mean μ_θ of x_{t−1}: eq. 7 solved for x_0 (:meth:`predict_start_from_mean`)."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return self.predict_start_from_noise(x_t, t, model_output)
        if kind == "sample":
            return model_output
        if kind == "mean":
            return self.predict_start_from_mean(x_t, t, model_output)
        alpha_bar = self._expand(self._alpha_bars(t, dtype=x_t.dtype)[0], x_t)
        return alpha_bar**0.5 * x_t - (1 - alpha_bar) ** 0.5 * model_output

    def predict_start_from_mean(self, x_t: torch.Tensor, t: Timesteps, mean: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (μ − c_t x_t) / c_0: eq. 7, μ̃_t = c_0 x_0 + c_t x_t, solved for x_0, with the one-step
        coefficients of :meth:`posterior_mean_coefficients` (c_0 = 1, c_t = 0 at the first step: μ̃_1 = x_0)."""
        coef_x0, coef_xt = (self._expand(c, x_t) for c in self.posterior_mean_coefficients(t, dtype=x_t.dtype))
        return (mean - coef_xt * x_t) / coef_x0

    def p_mean(self, model_output: torch.Tensor, x_t: torch.Tensor, t: Timesteps, x0_pred: torch.Tensor,
               prev_t: Optional[Timesteps] = None) -> torch.Tensor:
        """μ_θ(x_t, t), the mean of p_θ(x_{t−1} | x_t) (§3.2): μ̃_t(x_t, x̂_0) of eq. 7 at the (clipped) x̂_0, which for
        ε-prediction without clipping is eq. 11. For ``mean`` prediction on the full chain it is the network's output
        itself, as in the original code (clipping changes only the reported x̂_0); a chain that skips steps
        (``prev_t`` ≠ t − 1) goes through x̂_0 as the other types do, since the network's mean is that of one step."""
        if self.config.prediction_type == "mean":
            one_step = prev_t is None or bool((torch.as_tensor(prev_t).cpu() == self._check_timesteps(t).cpu() - 1).all())
            if one_step:
                return model_output
        return self.q_posterior_mean(x0_pred, x_t, t, prev_t)

    def p_variance(
        self,
        x_t: torch.Tensor,
        t: Timesteps,
        prev_t: Optional[Timesteps] = None,
        model_variance: Optional[torch.Tensor] = None,
        variance_type: Optional[str] = None,
        first_step_decoder: bool = True,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """σ_t² and log σ_t² of p_θ(x_{t−1} | x_t) (§3.2) for ``variance_type`` (default: the configured one), to
        broadcast against x_t.

        ``fixed_small``: β̃_t (eq. 7); ``fixed_large``: β_t (their ``_log`` forms give the same numbers);
        ``learned``: the model's extra channels ``model_variance`` are log σ_t²; ``learned_range``: they interpolate,
        v log β_t + (1 − v) log β̃_t with v = (output + 1) / 2 (improved-diffusion eq. 15). At the first step (t = 0
        here, the paper's t = 1) β̃ = 0, and by default both fixed types use β̃ of the second step, as the original
        code and improved-diffusion do for the decoder L_0; sampling adds no noise at that step, so only the bound
        sees it. ``first_step_decoder=False`` keeps the sampling chain's values there instead (β̃ floored at 1e-20,
        and β_t), as diffusers does."""
        kind = self.config.variance_type if variance_type is None else variance_type
        _check_choice("variance_type", kind, VARIANCE_TYPES)
        t = self._check_timesteps(t)
        alpha_bar, alpha_bar_prev = self._alpha_bars(t, prev_t, x_t.dtype)
        beta = 1 - alpha_bar / alpha_bar_prev
        if first_step_decoder:
            small = self._posterior_variance_clipped(t, prev_t, x_t.dtype)
            large = torch.where(t == 0, small, beta)
        else:
            small = self.posterior_variance(t, prev_t, x_t.dtype).clamp(min=_MIN_VARIANCE)
            large = beta
        if kind in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"):
            variance = self._expand(small if kind.startswith("fixed_small") else large, x_t)
            return variance, torch.log(variance)
        if model_variance is None:
            raise ValueError(f"variance_type={kind!r} needs the model's variance channels (2× output channels).")
        if kind == "learned":
            log_variance = model_variance
        else:
            frac = (model_variance + 1) / 2
            log_variance = frac * self._expand(torch.log(beta), x_t) + (1 - frac) * self._expand(torch.log(small), x_t)
        return torch.exp(log_variance), log_variance

    def _get_variance(
        self, t: Timesteps, predicted_variance: Optional[torch.Tensor] = None, variance_type: Optional[str] = None
    ) -> torch.Tensor:
        """``diffusers.DDPMScheduler._get_variance``: same signature, same values. diffusers' own code calls it on
        whatever DDPM scheduler a pipeline holds (the value-guided sampling pipeline, for one); here it reads
        :meth:`p_variance` at the chain's previous timestep.

        As in diffusers, what it returns depends on ``variance_type`` (default: the configured one): σ_t² for
        ``fixed_small`` and ``fixed_large``, σ_t itself for ``fixed_small_log``, log σ_t² for ``fixed_large_log`` and
        ``learned_range``, and ``predicted_variance`` unchanged for ``learned`` (a log-variance here, a variance to
        diffusers: the values agree, their meaning is the module docstring's difference).

        At t = 0 it gives the sampling chain's values, as diffusers does (β̃_1 = 0 floored at 1e-20, and β_1 for
        ``fixed_large``), not the decoder variance (β̃ of the second step) that :meth:`p_variance` gives the bound:
        diffusers' callers scale sampling noise by it, and the floor is what keeps their last step noiseless."""
        kind = self.config.variance_type if variance_type is None else variance_type
        # diffusers computes in the float32 schedule whatever the dtype of predicted_variance.
        float32_scalar = torch.zeros((), dtype=torch.float32)
        variance, log_variance = self.p_variance(
            float32_scalar, t, self.previous_timestep(t), predicted_variance, kind, first_step_decoder=False
        )
        if kind in ("fixed_small", "fixed_large"):
            return variance
        if kind == "fixed_small_log":
            return torch.exp(0.5 * log_variance)
        return log_variance

    # ------------------------------------------------------------------------------------------------------------
    # Sampling (Algorithm 2) and the forward process
    # ------------------------------------------------------------------------------------------------------------

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Imagen's dynamic thresholding: clip x̂_0 to the per-sample ``dynamic_thresholding_ratio`` quantile s of
        |x̂_0| (s clamped to [1, sample_max_value]) and divide by s."""
        dtype = sample.dtype
        flat = sample.float().reshape(sample.shape[0], -1)
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(s, min=1, max=self.config.sample_max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(sample.shape).to(dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Timesteps,
        sample: torch.Tensor,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        return_dict: bool = True,
    ) -> Union[DDPMSchedulerOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """One step of ancestral sampling (Algorithm 2): x_{t−1} = μ̃_t(x_t, x̂_0) + σ_t z, z = 0 at the last step.

        x̂_0 comes from the model output according to ``prediction_type`` and is clipped or thresholded; the mean is
        the posterior mean μ̃_t of eq. 7 at x̂_0, which for ε-prediction without clipping equals μ_θ of eq. 11.
        With ``learned``/``learned_range`` variances the model outputs 2C channels; the second half sets σ_t.
        """
        if model_output.shape[0] != sample.shape[0] or model_output.shape[2:] != sample.shape[2:]:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample has {tuple(sample.shape)}; "
                "they must agree in batch and spatial size."
            )
        t = timestep
        self._check_timesteps(t)
        prev_t = self.previous_timestep(t)
        channels = sample.shape[1]
        predicted_variance = None
        if model_output.shape[1] == 2 * channels and self.variance_type in LEARNED_VARIANCE_TYPES:
            model_output, predicted_variance = torch.split(model_output, channels, dim=1)
        elif model_output.shape[1] != channels:
            raise ValueError(
                f"model_output has {model_output.shape[1]} channels for a sample with {channels}; expected {channels}"
                f" (or {2 * channels} with variance_type 'learned'/'learned_range')."
            )

        # 1. x̂_0 from the model output (eq. 15 for ε), clipped or thresholded.
        pred_original_sample = self.predict_start(model_output, sample, t)
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            limit = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-limit, limit)

        # 2. The mean of p_θ: μ̃_t(x_t, x̂_0), eq. 7 (for mean prediction, the network's μ_θ on the full chain).
        prev_sample = self.p_mean(model_output, sample, t, pred_original_sample, prev_t)

        # 3. Add σ_t z, except at the last step.
        if int(t) > 0:
            noise = randn_like_batch(model_output.shape, generator, model_output.device, model_output.dtype)
            # (t > 0: the sampling chain's σ_t², which differ from the bound's only at t = 0)
            variance, log_variance = self.p_variance(sample, t, prev_t, predicted_variance, first_step_decoder=False)
            # √σ² where diffusers takes the root, exp(½ log σ²) where it goes through the log: the same samples.
            rooted = self.variance_type in ("fixed_small", "fixed_large")
            std = variance**0.5 if rooted else torch.exp(0.5 * log_variance)
            prev_sample = prev_sample + std * noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """Sample q(x_t | x_0): x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (eq. 4), one timestep per batch element."""
        mean, variance = self.q_mean_variance(original_samples, torch.as_tensor(timesteps).reshape(-1))
        return mean + variance**0.5 * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-prediction target v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022)."""
        alpha_bar, _ = self._alpha_bars(torch.as_tensor(timesteps).reshape(-1), dtype=sample.dtype)
        alpha_bar = self._expand(alpha_bar, sample)
        return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * sample
