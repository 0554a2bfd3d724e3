"""The variational bound against closed forms: Gaussian KLs, the discretised decoder's normalisation, and data from a
known Gaussian, where the optimal ε-predictor and the true reverse variances are analytic."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from ddpm_hf.likelihood import bits_per_dim, discretized_gaussian_log_likelihood, normal_kl
from ddpm_hf.scheduler import DDPMScheduler

MEAN, STD = 0.1, 0.3


def test_normal_kl_closed_forms():
    m, lv = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(50, dtype=torch.float64), atol=1e-12)
    # KL(N(μ1, σ1²) ‖ N(μ2, σ2²)) = log σ2/σ1 + (σ1² + (μ1 − μ2)²) / (2σ2²) − 1/2
    mu1, s1, mu2, s2 = 0.3, 0.5, -1.2, 2.0
    expected = math.log(s2 / s1) + (s1**2 + (mu1 - mu2) ** 2) / (2 * s2**2) - 0.5
    got = normal_kl(torch.tensor(mu1), torch.tensor(2 * math.log(s1)), torch.tensor(mu2), torch.tensor(2 * math.log(s2)))
    assert abs(float(got) - expected) < 1e-6


@pytest.mark.parametrize("mean,std", [(0.0, 0.01), (0.37, 0.2), (-0.999, 0.05), (0.9, 3.0), (0.0, 1e-4)])
def test_discretised_decoder_sums_to_one_over_the_256_bins(mean, std):
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    log_p = discretized_gaussian_log_likelihood(grid, torch.tensor(mean, dtype=torch.float64),
                                                torch.tensor(math.log(std), dtype=torch.float64))
    assert abs(float(log_p.exp().sum()) - 1) < 1e-6
    # and each bin is the Gaussian's mass over it (scipy as the oracle)
    k = int(round((mean + 1) * 127.5))
    lo, hi = (grid[k] - 1 / 255).item(), (grid[k] + 1 / 255).item()
    lo, hi = (-np.inf if k == 0 else lo), (np.inf if k == 255 else hi)
    expected = stats.norm.cdf(hi, mean, std) - stats.norm.cdf(lo, mean, std)
    assert abs(float(log_p[k].exp()) - expected) < 1e-7


class GaussianDataOptimum(torch.nn.Module):
    """For x_0 ~ N(m, s²) per pixel: E[ε | x_t] and, for learned variances, log Var(x_{t−1} | x_t)."""

    def __init__(self, scheduler, with_variance, mean=MEAN, std=STD):
        super().__init__()
        self.alpha_bars = torch.cumprod(1 - scheduler.betas.double(), dim=0)  # ᾱ_t, float64
        self.with_variance, self.mean, self.std = with_variance, mean, std

    def forward(self, x, t):
        a = self.alpha_bars[t].to(x).view(-1, 1, 1, 1)
        a_prev = torch.where(t == 0, torch.ones_like(t, dtype=torch.float64), self.alpha_bars[(t - 1).clamp(min=0)])
        a_prev = a_prev.to(x).view(-1, 1, 1, 1)
        v_t, v_prev = a * self.std**2 + 1 - a, a_prev * self.std**2 + 1 - a_prev
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mean) / v_t
        if not self.with_variance:
            return SimpleNamespace(sample=eps)
        log_var = torch.log(v_prev - (a / a_prev) * v_prev**2 / v_t).expand_as(x)
        return SimpleNamespace(sample=torch.cat([eps, log_var], 1))


def _gaussian_images(n=512, seed=0):
    x = (MEAN + STD * torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)
    images = ((x + 1) * 127.5).round().to(torch.uint8)
    x0 = images.double() / 127.5 - 1
    nll = -discretized_gaussian_log_likelihood(x0, torch.tensor(MEAN, dtype=torch.float64),
                                               torch.tensor(math.log(STD), dtype=torch.float64)).sum((1, 2, 3))
    return images, nll / (4 * math.log(2))  # the exact NLL of each discretised image, bits/dim


@pytest.mark.parametrize("variance_type,max_gap", [("learned", 0.02), ("fixed_large", 0.3), ("fixed_small", 1.5)])
def test_bound_with_the_optimal_predictor_is_at_or_above_the_exact_nll(variance_type, max_gap):
    scheduler = DDPMScheduler(variance_type=variance_type)
    images, nll = _gaussian_images()
    model = GaussianDataOptimum(scheduler, variance_type == "learned")
    result = bits_per_dim(model, scheduler, images, timesteps_per_batch=100, batch_size=512, progress=False)
    assert result.exact and result.terms.shape == (1000,)
    gap = result.per_image.double() - nll
    stderr = float(gap.std() / math.sqrt(len(gap)))
    assert float(gap.mean()) > -3 * stderr  # the bound is never below the NLL (up to Monte-Carlo noise)
    assert float(gap.mean()) < max_gap
    assert float(result.prior.max()) < 1e-4  # q(x_T | x_0) is almost N(0, I)


def test_sampled_estimate_is_unbiased_within_three_standard_errors():
    scheduler = DDPMScheduler(variance_type="learned")
    images, _ = _gaussian_images(n=256, seed=1)
    model = GaussianDataOptimum(scheduler, True)
    exact = bits_per_dim(model, scheduler, images, timesteps_per_batch=100, batch_size=256, progress=False)
    estimate = bits_per_dim(model, scheduler, images, num_timesteps=50, timesteps_per_batch=50, batch_size=256,
                            seed=7, progress=False)
    assert not estimate.exact and estimate.stderr > 0
    assert abs(estimate.mean - exact.mean) < 3 * estimate.stderr
    # L_0 is computed, not drawn: the spread left is that of the other T − 1 terms. From the exact terms (mean
    # over these alike images), 50 uniform draws of all T terms would give a standard error of T·std(L_t)/√(50·256)
    # (≈ 0.71 here), those of t ≥ 1 (T − 1)·std(L_{t≥1})/√(50·256) (≈ 0.25).
    T, draws = scheduler.config.num_train_timesteps, 50 * len(images)
    uniform = T * float(exact.terms.std()) / math.sqrt(draws)
    without_decoder = (T - 1) * float(exact.terms[1:].std()) / math.sqrt(draws)
    assert 0.8 * without_decoder < estimate.stderr < 1.25 * without_decoder < 0.5 * uniform


def test_the_sampled_estimate_weighs_its_terms_by_T_minus_1_and_keeps_the_prior_at_a_short_chain():
    """The sampled bound is L_T + L_0 + (T − 1)·mean of the drawn L_{t≥1}. At T = 1000 a weight of T instead of
    T − 1 moves it by 0.1 % and L_T is about 1e-5 bits/dim, both far inside the test above's three standard errors;
    at T = 10 they are 0.5 and 1.1 bits/dim. Oracle: the exact bound, all 10 terms, over the same images."""
    scheduler = DDPMScheduler(num_train_timesteps=10, variance_type="learned")
    images, _ = _gaussian_images(n=256, seed=1)
    model = GaussianDataOptimum(scheduler, True)
    exact = bits_per_dim(model, scheduler, images, progress=False)
    estimate = bits_per_dim(model, scheduler, images, num_timesteps=100, seed=7, progress=False)
    assert float(exact.prior.mean()) > 0.3  # L_T is not negligible here: the test can see it dropped
    # (each ran its own ε: the exact bound's mean moves by its standard error over images too)
    assert abs(estimate.mean - exact.mean) < 3 * math.hypot(estimate.stderr, exact.stderr_over_images)


def test_the_sampled_estimates_standard_error_is_the_spread_of_its_estimates():
    """The reported stderr of a sampled bound against the spread of the estimate itself over 300 draws of its
    timesteps (the brute-force oracle): with 2 draws per image the unbiased variance is twice the biased one, so a
    biased variance, or a missing (T − 1) or √K, shows as a ratio far from 1. (L_0 is computed, with its own ε, so
    the spread is a little above the timesteps' alone: about 1.08 here.)"""
    scheduler = DDPMScheduler(num_train_timesteps=10, variance_type="learned")
    images, _ = _gaussian_images(n=4, seed=2)
    model = GaussianDataOptimum(scheduler, True)
    runs = [bits_per_dim(model, scheduler, images, num_timesteps=2, seed=seed, progress=False) for seed in range(300)]
    means, stderrs = np.array([run.mean for run in runs]), np.array([run.stderr for run in runs])
    ratio = means.std(ddof=1) / math.sqrt((stderrs**2).mean())
    assert 0.85 < ratio < 1.2, ratio  # (a biased variance: about 1.5)


def test_the_x0_rmse_of_each_step_is_the_closed_form_for_gaussian_data():
    """Fig. 5's distortion: the RMSE of x̂_0 from x_t, in pixels of [0, 255]. For x_0 ~ N(m, s²) per pixel and the
    optimal ε-predictor, x̂_0 = E[x_0 | x_t] and its error has variance s²(1 − ᾱ_t) / (ᾱ_t s² + 1 − ᾱ_t), so
    RMSE_t = 127.5 · √that. Mean ratio over the 100 steps within 2 % (the clip to [−1, 1] and the pixel grid leave
    about 0.8 %), each step within 10 % (512 images: about 1.6 % of Monte-Carlo noise a step). A scale of 255, or a
    mean of each image's root (the root of the mean is asked for), land at 2.0 and 0.945."""
    scheduler = DDPMScheduler(num_train_timesteps=100, variance_type="fixed_large")
    images, _ = _gaussian_images(n=512)
    result = bits_per_dim(GaussianDataOptimum(scheduler, False), scheduler, images, progress=False)
    alpha_bars = np.cumprod(1 - scheduler.betas.double().numpy())
    closed = 127.5 * np.sqrt(STD**2 * (1 - alpha_bars) / (alpha_bars * STD**2 + 1 - alpha_bars))
    ratio = result.x0_rmse.double().numpy() / closed
    assert abs(ratio.mean() - 1) < 0.02 and np.abs(ratio - 1).max() < 0.1, (ratio.mean(), np.abs(ratio - 1).max())


def test_rate_distortion_bookkeeping():
    """§4.3: the receiver of x_t has been sent L_T + L_{T−1} + ... + L_t and reconstructs x̂_0 from that same x_t;
    the pairs, written out from the per-timestep terms and RMSEs (T = 100). The curve paired each rate with the
    x̂_0 of one step earlier, so its last two rates were equal and its first point (L_T alone, x̂_0 from x_T) was
    missing."""
    scheduler = DDPMScheduler(num_train_timesteps=100, variance_type="fixed_large")
    images, _ = _gaussian_images(n=64)
    result = bits_per_dim(GaussianDataOptimum(scheduler, False), scheduler, images, progress=False)
    curve = result.rate_distortion()
    T, prior = 100, float(result.prior.mean())
    assert curve["reverse_step"] == list(range(T))
    for step, rate, rmse in zip(curve["reverse_step"], curve["rate_bpd"], curve["distortion_rmse"]):
        t = T - step  # the receiver holds x_t (1-based): sent L_T, then L_{T−1} .. L_t (terms index L_0 .. L_{T−1})
        assert rate == pytest.approx(prior + float(result.terms[t:].sum()), abs=1e-9)
        assert rmse == pytest.approx(float(result.x0_rmse[t - 1]), abs=1e-12)  # x0_rmse index t − 1: from x_t
    # all bits except the decoder's are sent when x_1 is; every term is positive, so the rate rises at every step
    assert curve["rate_bpd"][-1] + float(result.terms[0]) == pytest.approx(result.mean, abs=1e-9)
    assert all(b > a for a, b in zip(curve["rate_bpd"], curve["rate_bpd"][1:]))
    assert curve["distortion_rmse"][-1] < curve["distortion_rmse"][0]


def test_the_standard_error_over_images_is_that_of_the_mean():
    """The exact bound's stderr is 0 (no timesteps are sampled), yet its mean over a few images moves with the
    images and their ε: the standard error over images, std/√N, is reported beside it, and a mean over another
    draw of ε lies within a few of it."""
    scheduler = DDPMScheduler(num_train_timesteps=50, variance_type="fixed_large")
    images, _ = _gaussian_images(n=16)
    model = GaussianDataOptimum(scheduler, False)
    first, second = (bits_per_dim(model, scheduler, images, seed=seed, progress=False) for seed in (0, 1))
    assert first.stderr == 0 and first.mean != second.mean
    assert first.stderr_over_images == pytest.approx(float(first.per_image.std()) / 4, rel=1e-12)
    assert abs(first.mean - second.mean) < 4 * math.hypot(first.stderr_over_images, second.stderr_over_images)
    assert bits_per_dim(model, scheduler, images[:1], progress=False).stderr_over_images is None  # (JSON: null)


def test_float_input_must_lie_on_the_pixel_grid():
    scheduler = DDPMScheduler(num_train_timesteps=10)
    model = GaussianDataOptimum(scheduler, False)
    with pytest.raises(ValueError, match="uint8"):
        bits_per_dim(model, scheduler, torch.rand(2, 1, 2, 2) * 2 - 1, progress=False)
    with pytest.raises(ValueError, match="num_timesteps"):
        bits_per_dim(model, scheduler, torch.zeros(2, 1, 2, 2, dtype=torch.uint8), num_timesteps=1, progress=False)


def test_a_gpus_network_call_holds_the_pixels_of_512_images_of_32_squared():
    """On a GPU the bound's network calls hold 512 images of 32² (timesteps × images), or as many pixels of larger
    images: 512 images of 256² would not fit in an 80 GB GPU, and --batch_size, which the out-of-memory error
    tells the user to lower, would not lower them. On the CPU, 64 images of any size, as bench/bpd.py measured."""
    from ddpm_hf.likelihood import default_timesteps_per_call

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects need no GPU
    assert [default_timesteps_per_call(n, (32, 32), cuda) for n in (1, 64, 512, 1024)] == [512, 8, 1, 1]
    assert [default_timesteps_per_call(n, (256, 256), cuda) for n in (1, 8, 16, 64)] == [8, 1, 1, 1]
    assert default_timesteps_per_call(2, (64, 64), cuda) * 2 * 64 * 64 == 512 * 32 * 32
    assert [default_timesteps_per_call(n, size, cpu) for n, size in ((1, (256, 256)), (8, (28, 28)))] == [64, 8]


def test_the_bound_builds_no_autograd_graph():
    """A network with trainable weights (as evaluate and training load it) is called without autograd: a graph kept
    for each of the bound's calls until the end would fill a GPU's memory."""
    scheduler = DDPMScheduler()
    images, _ = _gaussian_images(n=8)
    optimum = GaussianDataOptimum(scheduler, False)
    weight = torch.nn.Parameter(torch.ones(()))
    grad_enabled = []

    def model(x, t):
        grad_enabled.append(torch.is_grad_enabled())
        return SimpleNamespace(sample=optimum(x, t).sample * weight)

    result = bits_per_dim(model, scheduler, images, num_timesteps=4, progress=False)
    assert grad_enabled and not any(grad_enabled)
    assert not result.per_image.requires_grad


def test_a_half_precision_network_is_warned_about(caplog):
    """The bound of a bf16 network rounds x_t (and L_0's x_0) to bf16 on its way in: a different figure from the
    paper's float32 one, said; a float32 network is not warned about."""
    from helpers import tiny_pipeline

    pipe = tiny_pipeline(num_train_timesteps=10)
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    with caplog.at_level("WARNING", logger="ddpm_hf.likelihood"):
        full = bits_per_dim(pipe.unet, pipe.scheduler, images, progress=False)
        bits_per_dim(tiny_pipeline(num_train_timesteps=10).unet.double(), pipe.scheduler, images, progress=False)
        assert not caplog.records  # (float32 and float64: no rounding to speak of)
        half = bits_per_dim(pipe.unet.to(torch.bfloat16), pipe.scheduler, images, progress=False)
    assert "the network's weights are torch.bfloat16" in caplog.text
    assert half.mean != full.mean  # (what the warning is about)
