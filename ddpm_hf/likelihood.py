"""The variational bound of Ho et al. (2020), eq. 5, in bits per dimension, and the rate–distortion curve of §4.3.

L = L_T + Σ_{t>1} L_{t−1} + L_0 with L_T = KL(q(x_T|x_0) ‖ N(0, I)), L_{t−1} = KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t))
and L_0 = −log p_θ(x_0|x_1) under the discretised Gaussian decoder of §3.3. Works with any ε-model returning
``.sample`` (ddpm_hf.DDPMUNet, diffusers.UNet2DModel) and either DDPM scheduler (ours or diffusers'). Timesteps are
0-based, as in the schedulers: index t here is the paper's t + 1, so index 0 is the decoder term L_0.
"""

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch
from tqdm.auto import tqdm

from .images import to_model_range
from .scheduler import DDPMScheduler
from .seeds import image_seed

logger = logging.getLogger(__name__)

LN2 = math.log(2.0)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats: the closed form behind L_{t−1} and L_T."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) for x on the 256-level grid of [−1, 1] under N(mean, e^{2 log_scale}) integrated over the pixel's bin
    [x − 1/255, x + 1/255], the outermost bins extended to ±∞ (§3.3, eq. 13). Elementwise, in nats.

    Uses log Φ for the tails and subtracts Φ on the side of the smaller tail, so the probability of a bin far from
    the mean keeps its digits (floor 1e-12, as the original code)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + 1.0 / 255)
    lower = inv_std * (centered - 1.0 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X ≤ x + 1/255): the lowest bin
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X ≥ x − 1/255): the highest bin
    mass = torch.where(lower > 0, torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
                       torch.special.ndtr(upper) - torch.special.ndtr(lower))
    log_mass = torch.log(mass.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mass))


def checked_model_range(images: torch.Tensor) -> torch.Tensor:
    """The bound's input in [−1, 1]: uint8 images converted (images.to_model_range); float images must already lie
    on that 256-level grid."""
    if images.dtype == torch.uint8:
        return to_model_range(images)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [-1, 1], got dtype {images.dtype}.")
    grid = (images + 1) * 127.5
    if images.min() < -1 - 1e-6 or images.max() > 1 + 1e-6 or (grid - grid.round()).abs().max() > 1e-3:
        raise ValueError("float images must be uint8 values scaled as x / 127.5 - 1 (the bound's decoder is discrete); "
                         "pass the uint8 images instead.")
    return images.float()


def _as_ddpm_scheduler(scheduler) -> DDPMScheduler:
    return scheduler if isinstance(scheduler, DDPMScheduler) else DDPMScheduler.from_config(scheduler.config)


class VariationalBound:
    """The terms of the bound (eq. 5) for one model and DDPM scheduler, each a few lines on the scheduler's
    definitions of eqs. 4, 7, 11 and 15. Computed in float64 (the scheduler's ᾱ then keeps its digits at small t).

    ``clip_denoised`` clips x̂_0 to [−1, 1] before forming the reverse mean, as the original evaluation does.
    """

    def __init__(self, model: Callable, scheduler, clip_denoised: bool = True):
        self.model = model
        self.scheduler = _as_ddpm_scheduler(scheduler)
        self.clip_denoised = clip_denoised

    def terms(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Run the model on x_t ~ q(x_t | x_0) (eq. 4) and return :meth:`terms_from_output`."""
        x_t = self.scheduler.add_noise(x_start.double(), noise.double(), t).to(x_start.dtype)
        return self.terms_from_output(self.model(x_t, t).sample, x_start, x_t, t, noise)

    def terms_from_output(self, output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                          noise: torch.Tensor, freeze_mean: bool = False) -> Dict[str, torch.Tensor]:
        """For each batch element: the bound term at its timestep t in nats summed over dimensions (``"term"``:
        L_{t−1} for t > 0, L_0 for t = 0), the MSE of x̂_0 (``"x0_mse"``) and of ε (``"eps_mse"``), all float64.
        ``freeze_mean`` stops the gradient through the mean, so that the term trains only the variance
        (improved-diffusion's hybrid objective)."""
        s = self.scheduler
        output, x_start, x_t, noise = (v.double() for v in (output, x_start, x_t, noise))
        channels = x_start.shape[1]
        model_variance = None
        if output.shape[1] == 2 * channels:
            output, model_variance = output[:, :channels], output[:, channels:]
        if freeze_mean:
            output = output.detach()
        x0_pred = s.predict_start(output, x_t, t)
        if self.clip_denoised:
            x0_pred = x0_pred.clamp(-1, 1)
        # p_θ(x_{t−1} | x_t) = N(μ_θ, σ_t²): μ̃_t of eq. 7 at x̂_0 (for ε, eq. 11), or the network's own mean.
        model_mean = s.p_mean(output, x_t, t, x0_pred)
        _, model_log_var = s.p_variance(x_t, t, model_variance=model_variance)
        dims = tuple(range(1, x_start.ndim))
        # L_{t−1} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) for t > 1 ...
        true_mean, _, true_log_var = s.q_posterior_mean_variance(x_start, x_t, t)
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).sum(dims)
        # ... and L_0 = −log p_θ(x_0 | x_1) under the discretised decoder at t = 1 (§3.3).
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_var).sum(dims)
        eps_pred = s.predict_noise_from_start(x_t, t, x0_pred)
        return {"term": torch.where(t == 0, decoder_nll, kl), "x0_mse": (x0_pred - x_start).square().mean(dims),
                "eps_mse": (eps_pred - noise).square().mean(dims)}

    def prior(self, x_start: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in nats, summed over dimensions (no parameters: close to 0)."""
        mean, variance = self.scheduler.q_mean_variance(x_start.double(), self.scheduler.config.num_train_timesteps - 1)
        zero = torch.zeros_like(mean)
        return normal_kl(mean, torch.log(variance), zero, zero).sum(tuple(range(1, x_start.ndim)))


@dataclass
class BitsPerDim:
    """Result of :func:`bits_per_dim`, all in bits per dimension.

    ``per_image``: the bound for each image; ``mean``: its average; ``stderr``: the standard error of ``mean`` from
    the timestep sampling (0 when exact); ``prior``: L_T per image; ``terms``: the mean of each L_t over images
    (index t, length T; exact mode only); ``x0_rmse``: RMSE of x̂_0 from x_t on the [0, 255] scale per t (exact
    mode only); ``exact``: whether all T terms were computed; ``terms_per_process``: how many of the bound's terms
    (image, t) each process computed, counted from what it sent (one entry when the work was not spread)."""

    per_image: torch.Tensor
    mean: float
    stderr: float
    prior: torch.Tensor
    terms: Optional[torch.Tensor]
    x0_rmse: Optional[torch.Tensor]
    exact: bool
    terms_per_process: List[int]

    @property
    def stderr_over_images(self) -> Optional[float]:
        """The standard error of ``mean`` over the images, ``std(per_image) / √N``: how far the bound of the data the
        images were drawn from may lie from ``mean``. It holds the noise of each image's draws (ε, and t when
        sampled) as well as the choice of images, so it is not 0 for the exact bound, whose T terms take one ε
        each. None for one image (results.json: null)."""
        return float(self.per_image.std() / math.sqrt(len(self.per_image))) if len(self.per_image) > 1 else None

    def rate_distortion(self) -> Dict[str, List[float]]:
        """§4.3, Fig. 5 and Table 4, the progressive lossy code: a receiver holding x_t (reverse step T − t,
        t = T .. 1) has been sent L_T + L_{T−1} + ... + L_t bits (x_T, then each x_{s−1} given x_s; the decoder's L_0
        is never sent), and reconstructs x̂_0 from x_t, with the RMSE (0–255) of ``x0_rmse`` at t."""
        if self.terms is None:
            raise ValueError("rate_distortion needs the exact bound (bits_per_dim(..., num_timesteps=None)).")
        terms = self.terms.double()  # index k: L_k (L_0 the decoder's); x0_rmse index k: x̂_0 from x_{k+1}
        num_steps = len(terms)
        # received x_{k+1}: sent L_{k+1} .. L_{T−1} after L_T, for k = T − 1 down to 0
        sent_after = torch.cat([torch.zeros(1, dtype=terms.dtype), torch.cumsum(terms.flip(0), 0)[:-1]])
        rate = float(self.prior.mean()) + sent_after
        return {"reverse_step": list(range(num_steps)), "rate_bpd": rate.tolist(),
                "distortion_rmse": self.x0_rmse.double().flip(0).tolist()}


class _ImageNoise:
    """The timesteps and ε of one batch of images: image i draws from its own generator, on the model's device,
    seeded from (seed, i): first its sampled timesteps, then the ε of each network call in turn. A process that
    starts inside the images' draws first replays the draws of the earlier calls (same shapes, so the generators
    reach the same state whatever their internals): an image's noise does not depend on which process evaluates
    which calls."""

    def __init__(self, seed: int, first_image: int, images: torch.Tensor, num_train: int,
                 num_timesteps: Optional[int], device: torch.device, earlier_calls: List[int]):
        self.shape = tuple(images.shape[1:])
        self.generators = [torch.Generator(device).manual_seed(image_seed(seed, i))
                           for i in range(first_image, first_image + len(images))]
        if num_timesteps is None:  # exact: every image runs through t = T−1 … 0
            self.schedule = torch.arange(num_train - 1, -1, -1, device=device).repeat(len(images), 1)
        else:  # the decoder term L_0 (t = 0) first, then K draws of t from 1 … T−1
            first = torch.zeros(1, dtype=torch.long, device=device)
            self.schedule = torch.stack([torch.cat([first, torch.randint(1, num_train, (num_timesteps,), generator=g,
                                                                         device=device)])
                                         for g in self.generators])
        for num_draws in earlier_calls:  # made by another process: drawn again and dropped
            self.noise(num_draws)

    def noise(self, num_draws: int) -> torch.Tensor:
        """The next ``num_draws`` ε of every image, image-major: (images × num_draws, C, H, W)."""
        return torch.cat([torch.randn((num_draws, *self.shape), generator=g, device=g.device)
                          for g in self.generators])


def default_timesteps_per_call(images: int, size, device: torch.device) -> int:
    """Timesteps per network call for ``images`` images of ``size`` (H, W): as many as fill a network batch of 64
    images on a CPU (larger batches run no faster there: bench/bpd.py), or on a GPU 512 images of 32² or as many
    pixels of larger ones (a 256² network's activations for 512 images would not fit), and at least one. A batch of
    ``images`` too large for the device is then lowered by the caller's batch size."""
    if device.type != "cuda":
        return max(1, 64 // images)
    height, width = size
    return max(1, 512 * 32 * 32 // (images * height * width))


@torch.no_grad()
def bits_per_dim(
    model: Callable,
    scheduler,
    images: torch.Tensor,
    num_timesteps: Optional[int] = None,
    timesteps_per_batch: Optional[int] = None,
    batch_size: int = 64,
    seed: int = 0,
    clip_denoised: bool = True,
    progress: bool = True,
    state=None,
) -> BitsPerDim:
    """NLL upper bound in bits/dim of ``images`` (uint8 (N, C, H, W), or floats already scaled to [−1, 1]).

    ``num_timesteps=None`` computes all T terms (exact); an integer K computes the decoder term L_0 and draws K of
    the other T − 1 timesteps per image uniformly with replacement, and returns the unbiased estimate
    L_T + L_0 + (T − 1) · mean_k L_{t_k} with its standard error. L_0 alone is about 40 % of a model's bits/dim in
    one of T terms: drawn at random like the others, it would make almost all of the estimate's variance. Each network
    call evaluates ``timesteps_per_batch`` timesteps of up to ``batch_size`` images at once; by default
    :func:`default_timesteps_per_call`.
    Image i's timesteps and ε come from its own generator seeded from (``seed``, i), on the model's device, drawn
    network call by network call: they depend on the seed, i, the batching and the device, not on the processes.

    ``state``, an accelerate ``PartialState`` that every process passes: the network calls are split over the
    processes in contiguous blocks and every process receives the whole result. The calls are the same ones, on the
    same inputs, as one process makes, so the result is identical to one process's on the same kind of device
    (merely regrouping images would not be: a network's float32 output for an image depends on its batch).
    """
    x_all = checked_model_range(images)
    if x_all.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}.")
    if num_timesteps is not None and num_timesteps < 2:
        raise ValueError("num_timesteps must be at least 2 (for a standard error) or None for the exact bound.")
    if seed < 0:
        raise ValueError(f"seed must be 0 or a positive integer, got {seed}.")
    bound = VariationalBound(model, scheduler, clip_denoised)
    num_train = bound.scheduler.config.num_train_timesteps
    first = next(model.parameters(), None) if hasattr(model, "parameters") else None
    device, dtype = (first.device, first.dtype) if first is not None else (x_all.device, torch.float32)
    # x_t, and L_0's x_0, rounded to a half-precision network's dtype move the bound (~+0.006 bits/dim for the
    # quickstart's model in bf16)
    if dtype.is_floating_point and torch.finfo(dtype).bits < 32:
        logger.warning(
            "bits_per_dim: the network's weights are %s, so the bound is computed from its %s predictions on x_t "
            "rounded to %s; load it in float32 (torch_dtype=torch.float32) for the paper's figure, as ddpm-hf "
            "evaluate does.", dtype, dtype, dtype)
    exact = num_timesteps is None
    draws = num_train if exact else num_timesteps + 1  # sampled: L_0, then K draws
    calls = []  # (first image, first draw, images, draws) of every network call, in order
    for start in range(0, len(x_all), batch_size):
        n = min(batch_size, len(x_all) - start)
        per_call = timesteps_per_batch or default_timesteps_per_call(n, x_all.shape[-2:], device)
        calls += [(start, k, n, min(per_call, draws - k)) for k in range(0, draws, per_call)]
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    mine = range(rank * len(calls) // world, (rank + 1) * len(calls) // world)  # a contiguous block of calls
    blocks, streams = [], {}
    bar = tqdm(total=sum(calls[i][2] * calls[i][3] for i in mine), desc="bits/dim", unit="term",
               disable=not progress or rank != 0)
    for index in mine:
        start, k, n, m = calls[index]
        x0 = x_all[start:start + n]
        if start not in streams:  # this process's first call on these images
            earlier = [draws for other_start, _, _, draws in calls[:index] if other_start == start]
            streams = {start: _ImageNoise(seed, start, x0, num_train, num_timesteps, device, earlier)}
        noise = streams[start]
        t = noise.schedule[:, k:k + m].reshape(-1)
        out = bound.terms(x0.to(device, dtype).repeat_interleave(m, 0), t, noise.noise(m).to(dtype))
        blocks.append((start, k, out["term"].double().cpu().view(n, m), out["x0_mse"].double().cpu().view(n, m)))
        bar.update(n * m)
    bar.close()
    if world > 1:
        from accelerate.utils import gather_object

        shares = gather_object([blocks])  # every process receives every process's blocks
    else:
        shares = [blocks]
    # Each term is computed once, by one process: the assembled tables are the same whoever computed what.
    values = torch.zeros(len(x_all), draws, dtype=torch.float64)  # column k: draw k (exact: t = T − 1 − k)
    mse = torch.zeros(len(x_all), draws, dtype=torch.float64)
    for start, k, term, x0_mse in (block for share in shares for block in share):
        values[start:start + len(term), k:k + term.shape[1]] = term
        mse[start:start + len(term), k:k + term.shape[1]] = x0_mse
    prior = torch.cat([bound.prior(x_all[s:s + batch_size].to(device, dtype)).double().cpu()
                       for s in range(0, len(x_all), batch_size)])
    if exact:
        per_image, variance = prior + values.sum(1), torch.zeros(len(x_all), dtype=torch.float64)
    else:
        sampled = values[:, 1:]  # column 0 is L_0
        per_image = prior + values[:, 0] + (num_train - 1) * sampled.mean(1)
        variance = (num_train - 1) ** 2 * sampled.var(1) / num_timesteps
    scale = 1.0 / (x_all[0].numel() * LN2)
    per_image_bpd = per_image * scale
    return BitsPerDim(
        per_image=per_image_bpd, mean=float(per_image_bpd.mean()),
        stderr=float(variance.sum().sqrt() / len(x_all) * scale), prior=prior * scale,
        terms=values.flip(1).mean(0) * scale if exact else None,
        x0_rmse=mse.flip(1).mean(0).sqrt() * 127.5 if exact else None, exact=exact,
        terms_per_process=[sum(term.numel() for _, _, term, _ in share) for share in shares])


def plot_rate_distortion(result: BitsPerDim, path: Union[str, os.PathLike], title: str = "") -> None:
    """A PNG like the paper's Fig. 5: distortion and rate against reverse steps, and distortion against rate. Drawn
    on a figure of its own, without pyplot: the caller's matplotlib backend and figures are left as they are."""
    from matplotlib.figure import Figure

    curve = result.rate_distortion()
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    axes[0].plot(curve["reverse_step"], curve["distortion_rmse"])
    axes[0].set(xlabel="reverse process steps (T − t)", ylabel="distortion (RMSE [0, 255])")
    axes[1].plot(curve["reverse_step"], curve["rate_bpd"])
    axes[1].set(xlabel="reverse process steps (T − t)", ylabel="rate (bits/dim)")
    axes[2].plot(curve["rate_bpd"], curve["distortion_rmse"])
    axes[2].set(xlabel="rate (bits/dim)", ylabel="distortion (RMSE [0, 255])")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
