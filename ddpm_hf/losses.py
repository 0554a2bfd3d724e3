"""Training objectives of Ho et al. (2020) §3.4 and improved-diffusion, as small objects: each maps the model output
for a batch of (x_0, t, ε) to one loss per example, so that the script can log it per timestep quartile."""


from .likelihood import LN2, VariationalBound
from .scheduler import LEARNED_VARIANCE_TYPES, DDPMScheduler

LOSSES = ("simple", "vlb", "hybrid")


class SimpleLoss:
    """L_simple (eq. 14): ‖target − model(x_t, t)‖² averaged over dimensions, the target being what the scheduler's
    ``prediction_type`` names: ε (the paper's best samples, FID 3.17), x_0, v, or for ``mean`` the posterior mean
    μ̃_t(x_t, x_0) of eq. 7 (Table 2's unweighted ‖μ̃ − μ̃_θ‖², which the paper found unstable)."""

    def __init__(self, scheduler: DDPMScheduler):
        self.scheduler = scheduler

    def target(self, x_start, x_t, t, noise):
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "mean":
            return self.scheduler.q_posterior_mean(x_start.double(), x_t.double(), t)
        return x_start if kind == "sample" else self.scheduler.get_velocity(x_start, noise, t)

    def __call__(self, output, x_start, x_t, t, noise):
        mean_part = output[:, : x_start.shape[1]]
        return (mean_part.float() - self.target(x_start, x_t, t, noise).float()).square().mean(dim=(1, 2, 3))


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
    bound trains only the learned variance (use with ``variance_type="learned_range"`` and 2× output channels)."""

    def __init__(self, scheduler: DDPMScheduler, weight: float = 0.001):
        self.simple = SimpleLoss(scheduler)
        self.bound = VariationalBound(None, scheduler, clip_denoised=False)
        self.num_steps, self.weight = scheduler.config.num_train_timesteps, weight

    def __call__(self, output, x_start, x_t, t, noise):
        term = self.bound.terms_from_output(output, x_start, x_t, t, noise, freeze_mean=True)["term"].float()
        vlb_bits_per_dim = self.num_steps * term / (x_start[0].numel() * LN2)
        return self.simple(output, x_start, x_t, t, noise) + self.weight * vlb_bits_per_dim


def check_loss_supports_variance(loss: str, variance_type: str) -> None:
    """Raise ValueError when ``loss`` cannot train ``variance_type``: a learned variance (LEARNED_VARIANCE_TYPES) gets
    its gradient from the bound alone, so it needs the vlb or hybrid loss, not L_simple."""
    if variance_type in LEARNED_VARIANCE_TYPES and loss == "simple":
        raise ValueError(f"--variance_type {variance_type} gets no gradient from --loss simple: "
                         "use --loss hybrid or --loss vlb")


def make_loss(name: str, scheduler: DDPMScheduler, out_channels: int, in_channels: int):
    """The loss object ``name`` after checking it fits the model: learned variances need 2× output channels and a
    loss that trains them (vlb or hybrid)."""
    if name not in LOSSES:
        raise ValueError(f"--loss {name!r}; choose one of {LOSSES}.")
    variance_type = scheduler.config.variance_type
    learned = variance_type in LEARNED_VARIANCE_TYPES
    if learned != (out_channels == 2 * in_channels):
        raise ValueError(f"variance_type={variance_type!r} needs out_channels = "
                         f"{2 * in_channels if learned else in_channels} (model has {out_channels}).")
    check_loss_supports_variance(name, variance_type)
    return {"simple": SimpleLoss, "vlb": VLBLoss, "hybrid": HybridLoss}[name](scheduler)
