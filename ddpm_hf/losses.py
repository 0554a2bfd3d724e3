"""Training objectives of Ho et al. (2020) §3.4 and improved-diffusion, as small objects: each maps the model output
for a batch of (x_0, t, ε) to one loss per example, so that the script can log it per timestep quartile."""


from typing import Optional

import torch

from .likelihood import LN2, VariationalBound
from .scheduler import LEARNED_VARIANCE_TYPES, DDPMScheduler

LOSSES = ("simple", "vlb", "hybrid")
MIN_SNR_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def min_snr_weights(scheduler: DDPMScheduler, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al. 2023) for t = 0 … T−1, float64: the factor on ‖target − output‖² that makes
    L_simple the x_0-space loss min(SNR(t), γ) · ‖x_0 − x̂_0‖², with SNR(t) = ᾱ_t / (1 − ᾱ_t).

    Derivation, from x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (eq. 4) with x̂_0, ε̂ and v̂ all read off the same output:
    ε − ε̂ = √(ᾱ_t / (1 − ᾱ_t)) (x̂_0 − x_0), so ‖ε − ε̂‖² = SNR · ‖x_0 − x̂_0‖²; and v = √ᾱ_t ε − √(1 − ᾱ_t) x_0
    gives v − v̂ = (x̂_0 − x_0) / √(1 − ᾱ_t), so ‖v − v̂‖² = (SNR + 1) · ‖x_0 − x̂_0‖². The weights on each
    prediction type's own MSE are therefore min(SNR, γ) / SNR for ε, min(SNR, γ) for x_0, min(SNR, γ) / (SNR + 1)
    for v. γ = ∞ weights x_0-space by SNR, i.e. gives the paper's ε-space L_simple (eq. 14) for every type: weight 1
    exactly for ε."""
    kind = scheduler.config.prediction_type
    check_snr_gamma(snr_gamma, kind)
    snr = scheduler.signal_to_noise_ratio(torch.arange(scheduler.config.num_train_timesteps))
    if kind == "epsilon":
        return torch.clamp(snr_gamma / snr, max=1.0)  # = min(SNR, γ) / SNR, and exactly 1 where SNR ≤ γ or γ = ∞
    clamped = torch.clamp(snr, max=snr_gamma)
    return clamped if kind == "sample" else clamped / (snr + 1)


class SimpleLoss:
    """L_simple (eq. 14): ‖target − model(x_t, t)‖² averaged over dimensions, the target being what the scheduler's
    ``prediction_type`` names: ε (the paper's best samples, FID 3.17), x_0, v, or for ``mean`` the posterior mean
    μ̃_t(x_t, x_0) of eq. 7 (Table 2's unweighted ‖μ̃ − μ̃_θ‖², which the paper found unstable). With ``snr_gamma``
    each example's MSE is weighted by Min-SNR-γ (:func:`min_snr_weights`); None is L_simple exactly."""

    def __init__(self, scheduler: DDPMScheduler, snr_gamma: Optional[float] = None):
        self.scheduler = scheduler
        # float32 like the per-example MSE it multiplies, looked up per example by t
        self.snr_weights = None if snr_gamma is None else min_snr_weights(scheduler, snr_gamma).float()

    def target(self, x_start, x_t, t, noise):
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "mean":
            return self.scheduler.q_posterior_mean(x_start.double(), x_t.double(), t)
        return x_start if kind == "sample" else self.scheduler.get_velocity(x_start, noise, t)

    def __call__(self, output, x_start, x_t, t, noise):
        mean_part = output[:, : x_start.shape[1]]
        mse = (mean_part.float() - self.target(x_start, x_t, t, noise).float()).square().mean(dim=(1, 2, 3))
        if self.snr_weights is None:
            return mse
        if self.snr_weights.device != t.device:  # moved once: a copy per step would wait for the device
            self.snr_weights = self.snr_weights.to(t.device)
        return self.snr_weights[t] * mse


class VLBLoss:
    """The true bound L (eq. 5) with uniformly sampled t: T · L_{t−1} per dimension, in nats (the paper's Table 2
    "L, fixed isotropic Σ" row: better NLL, worse FID)."""

    def __init__(self, scheduler: DDPMScheduler):
        self.bound = VariationalBound(None, scheduler, clip_denoised=False)
        self.num_steps = scheduler.config.num_train_timesteps

    def __call__(self, output, x_start, x_t, t, noise):
        term = self.bound.terms_from_output(output, x_start, x_t, t, noise)["term"].float()
        return self.num_steps * term / x_start[0].numel()


class HybridLoss:
    """L_hybrid = L_simple + λ L_vlb (Nichol & Dhariwal 2021) with λ = 0.001 and the mean frozen inside L_vlb, so the
    bound trains only the learned variance (use with ``variance_type="learned_range"`` and 2× output channels).
    ``snr_gamma`` weights the L_simple part only (the bound's terms keep their own weights)."""

    def __init__(self, scheduler: DDPMScheduler, weight: float = 0.001, snr_gamma: Optional[float] = None):
        self.simple = SimpleLoss(scheduler, snr_gamma)
        self.bound = VariationalBound(None, scheduler, clip_denoised=False)
        self.num_steps, self.weight = scheduler.config.num_train_timesteps, weight

    def __call__(self, output, x_start, x_t, t, noise):
        term = self.bound.terms_from_output(output, x_start, x_t, t, noise, freeze_mean=True)["term"].float()
        vlb_bits_per_dim = self.num_steps * term / (x_start[0].numel() * LN2)
        return self.simple(output, x_start, x_t, t, noise) + self.weight * vlb_bits_per_dim


def check_loss_supports_variance(loss: str, variance_type: str) -> None:
    """Raise ValueError when ``loss`` cannot train ``variance_type``: a learned variance (LEARNED_VARIANCE_TYPES) gets
    its gradient from the bound alone, so it needs the vlb or hybrid loss, not L_simple; the hybrid loss's bound
    trains only a learned variance (None: the preset's, checked again once known)."""
    if variance_type in LEARNED_VARIANCE_TYPES and loss == "simple":
        raise ValueError(f"--variance_type {variance_type} gets no gradient from --loss simple: "
                         "use --loss hybrid or --loss vlb")
    if loss == "hybrid" and variance_type is not None and variance_type not in LEARNED_VARIANCE_TYPES:
        raise ValueError(f"--loss hybrid adds the bound to L_simple to train a learned variance (the mean is frozen "
                         f"in the bound's terms): with --variance_type {variance_type} it trains what --loss simple "
                         "does, at more cost. Use --variance_type learned_range with it, or --loss simple")


def check_snr_gamma(snr_gamma: Optional[float], prediction_type: str, loss: Optional[str] = None) -> None:
    """Raise ValueError when Min-SNR-γ cannot weight ``loss``: γ must be positive (NaN is not), the weights are
    derived for ε, x_0 and v prediction only, and the bound (--loss vlb) is refused: its terms already carry the
    weights that make it the bound; Min-SNR-γ reweights L_simple (with --loss hybrid, its L_simple part)."""
    if snr_gamma is None:
        return
    if not snr_gamma > 0:
        raise ValueError(f"--snr_gamma must be positive, got {snr_gamma} (Hang et al. 2023 recommend 5)")
    if loss == "vlb":
        raise ValueError("--snr_gamma reweights L_simple, but --loss vlb is the variational bound, whose terms "
                         "already carry their own weights: use --loss simple or hybrid, or drop --snr_gamma")
    if prediction_type not in MIN_SNR_PREDICTION_TYPES:
        raise ValueError(f"--snr_gamma is defined for --prediction_type {' / '.join(MIN_SNR_PREDICTION_TYPES)}, "
                         f"not {prediction_type!r}: drop --snr_gamma or choose one of those")


def make_loss(name: str, scheduler: DDPMScheduler, out_channels: int, in_channels: int,
              snr_gamma: Optional[float] = None):
    """The loss object ``name`` after checking it fits the model: learned variances need 2× output channels and a
    loss that trains them (vlb or hybrid); ``snr_gamma`` (Min-SNR-γ) weights the simple or hybrid loss."""
    if name not in LOSSES:
        raise ValueError(f"--loss {name!r}; choose one of {LOSSES}.")
    variance_type = scheduler.config.variance_type
    learned = variance_type in LEARNED_VARIANCE_TYPES
    if learned != (out_channels == 2 * in_channels):
        raise ValueError(f"variance_type={variance_type!r} needs out_channels = "
                         f"{2 * in_channels if learned else in_channels} (model has {out_channels}).")
    check_loss_supports_variance(name, variance_type)
    check_snr_gamma(snr_gamma, scheduler.config.prediction_type, name)
    if name == "vlb":
        return VLBLoss(scheduler)
    return (SimpleLoss if name == "simple" else HybridLoss)(scheduler, snr_gamma=snr_gamma)
