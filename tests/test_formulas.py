"""The bound's terms and the training losses against the paper's formulas, written out here in numpy float64.

Nothing in this file's reference calls the library: β_t is read from the scheduler (it is the configuration's data),
everything else (ᾱ_t, the posterior of eqs. 6–7, x̂_0 from ε / x_0 / v, the Gaussian KL, the discretised decoder of
§3.3 with variance β̃_2 at t = 1, L_T) is computed below from the equations. The tolerances (≈1e-6 relative) are far
below the effects of the formula errors they guard against: fixed_small using β_t instead of β̃_t (≈0.6 bits/dim)
or the decoder variance at t = 1 set to β_1 instead of β̃_2 (≈0.09 bits/dim). Timesteps are 0-based as in the
library: index k is the paper's t = k + 1, index 0 is the decoder term L_0.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.special import log_ndtr, ndtr

from ddpm_hf.likelihood import VariationalBound
from ddpm_hf.losses import LOSSES, check_loss_supports_variance, check_snr_gamma, make_loss, min_snr_weights
from ddpm_hf.scheduler import LEARNED_VARIANCE_TYPES, VARIANCE_TYPES, DDPMScheduler

T = 1000
# Gaussian data x_0 ~ N(M, S²) per dimension: the optimal predictor is known in closed form.
M, S = 0.1, 0.3


# --- the paper, in numpy -------------------------------------------------------------------------------------------


def paper_schedule(scheduler):
    """β_t (the paper's linear schedule, §4), ᾱ_t = Π_{s≤t} (1 − β_s) and ᾱ_{t−1} with ᾱ_0 = 1, all float64."""
    betas = scheduler.betas.double().numpy()
    np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, len(betas)), rtol=1e-6)
    alpha_bars = np.cumprod(1 - betas)
    return SimpleNamespace(betas=betas, alpha_bars=alpha_bars, alpha_bars_prev=np.append(1.0, alpha_bars[:-1]))


def per_sample(values, k):
    """values[k] shaped (B, 1, 1, 1) to broadcast against images."""
    return values[np.asarray(k)].reshape(-1, 1, 1, 1)


def posterior(p, x0, x_t, k):
    """Mean μ̃_t and variance β̃_t of q(x_{t−1} | x_t, x_0), eq. 7."""
    ab, ab_prev, beta = per_sample(p.alpha_bars, k), per_sample(p.alpha_bars_prev, k), per_sample(p.betas, k)
    mean = np.sqrt(ab_prev) * beta / (1 - ab) * x0 + np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * x_t
    return mean, (1 - ab_prev) / (1 - ab) * beta


def posterior_variance_at(p, k):
    """β̃ at index k (the paper's β̃_{k+1}); 0 at index 0."""
    return (1 - p.alpha_bars_prev[k]) / (1 - p.alpha_bars[k]) * p.betas[k]


def reverse_log_variance(p, variance_type, k, variance_output=None):
    """log σ_t² of p_θ(x_{t−1} | x_t). At t = 1 (index 0) β̃_1 = 0: the decoder uses β̃_2 for both fixed types (the
    original code's and improved-diffusion's rule); learned_range interpolates log β_t and that clipped log β̃_t."""
    k = np.asarray(k)
    small = np.where(k == 0, posterior_variance_at(p, 1), posterior_variance_at(p, k))
    if variance_type == "fixed_small":
        return per_sample(np.log(small), np.arange(len(k)))
    if variance_type == "fixed_large":
        return per_sample(np.log(np.where(k == 0, posterior_variance_at(p, 1), p.betas[k])), np.arange(len(k)))
    assert variance_type == "learned_range"  # improved-diffusion eq. 15
    frac = (variance_output + 1) / 2
    return frac * per_sample(np.log(p.betas[k]), np.arange(len(k))) + (1 - frac) * per_sample(np.log(small),
                                                                                                np.arange(len(k)))


def start_from_output(p, prediction_type, output, x_t, k):
    """x̂_0 from the model output: eq. 4 solved for x_0 (ε, the x̂_0 of eq. 15), x_0 itself, from
    v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (which gives x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v), or from the mean μ of x_{t−1}:
    eq. 7 is linear in x_0, μ̃ = μ̃(x_t, 0) + (μ̃(x_t, 1) − μ̃(x_t, 0)) x_0, so x_0 = (μ − μ̃(x_t, 0)) / its slope."""
    ab = per_sample(p.alpha_bars, k)
    if prediction_type == "epsilon":
        return (x_t - np.sqrt(1 - ab) * output) / np.sqrt(ab)
    if prediction_type == "sample":
        return output
    if prediction_type == "mean":
        at_zero = posterior(p, np.zeros_like(x_t), x_t, k)[0]
        return (output - at_zero) / (posterior(p, np.ones_like(x_t), x_t, k)[0] - at_zero)
    return np.sqrt(ab) * x_t - np.sqrt(1 - ab) * output


def gaussian_kl(mean1, var1, mean2, log_var2):
    """KL(N(mean1, var1) ‖ N(mean2, e^log_var2)) per element, nats."""
    var2 = np.exp(log_var2)
    return 0.5 * (log_var2 - np.log(var1) + var1 / var2 + (mean1 - mean2) ** 2 / var2 - 1)


def decoder_log_likelihood(x0, mean, log_var):
    """log ∫ N(x; mean, σ²) over the pixel's bin [x0 − 1/255, x0 + 1/255], the outer bins reaching ±∞ (§3.3)."""
    std = np.exp(0.5 * log_var)
    upper, lower = (x0 + 1 / 255 - mean) / std, (x0 - 1 / 255 - mean) / std
    inner = np.log(np.maximum(ndtr(upper) - ndtr(lower), 1e-300))
    return np.where(x0 < -0.999, log_ndtr(upper), np.where(x0 > 0.999, log_ndtr(-lower), inner))


def bound_term(p, x0, x_t, x0_pred, k, log_var):
    """L_{t−1} = KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)) for t > 1, L_0 = −log p_θ(x_0|x_1) at t = 1 (eq. 5),
    in nats summed over dimensions; p_θ's mean is μ̃_t at x̂_0 (eq. 7, which equals eq. 11 for ε)."""
    true_mean, true_var = posterior(p, x0, x_t, k)
    model_mean, _ = posterior(p, x0_pred, x_t, k)
    log_var = np.broadcast_to(log_var, x0.shape)
    kl = gaussian_kl(true_mean, np.where(true_var > 0, true_var, 1.0), model_mean, log_var).sum((1, 2, 3))
    nll = -decoder_log_likelihood(x0, model_mean, log_var).sum((1, 2, 3))
    return np.where(np.asarray(k) == 0, nll, kl)


def prior_term(p, x0):
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) = KL(N(√ᾱ_T x_0, 1 − ᾱ_T) ‖ N(0, 1)) summed over dimensions."""
    ab = p.alpha_bars[-1]
    return (0.5 * (-np.log(1 - ab) + (1 - ab) + ab * x0**2 - 1)).sum((1, 2, 3))


def optimal_prediction(p, prediction_type, x_t, k):
    """For x_0 ~ N(M, S²): E[x_0 | x_t] = M + √ᾱ S² (x_t − √ᾱ M) / (ᾱ S² + 1 − ᾱ) and
    E[ε | x_t] = √(1 − ᾱ) (x_t − √ᾱ M) / (ᾱ S² + 1 − ᾱ); E[v | x_t] follows by linearity."""
    ab = per_sample(p.alpha_bars, k)
    residual = (x_t - np.sqrt(ab) * M) / (ab * S**2 + 1 - ab)
    x0, eps = M + np.sqrt(ab) * S**2 * residual, np.sqrt(1 - ab) * residual
    if prediction_type == "mean":  # E[μ̃_t(x_t, x_0) | x_t] = μ̃_t(x_t, E[x_0 | x_t]): eq. 7 is linear in x_0
        return posterior(p, x0, x_t, k)[0]
    return {"epsilon": eps, "sample": x0, "v_prediction": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0}[prediction_type]


class OptimalPredictor:
    """The model: the analytic optimum for Gaussian data, evaluated on whatever x_t the bound hands it."""

    def __init__(self, p, prediction_type):
        self.p, self.prediction_type = p, prediction_type

    def __call__(self, x_t, t):
        out = optimal_prediction(self.p, self.prediction_type, x_t.double().numpy(), t.numpy())
        return SimpleNamespace(sample=torch.from_numpy(out).to(x_t.dtype))


# Fixed pixels on the 256-level grid, both edges included (their bins extend to ±∞).
PIXELS = np.array([[0, 37, 127, 128], [255, 200, 64, 250]], dtype=np.float64).reshape(2, 1, 2, 2) / 127.5 - 1


# --- the bound -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_every_bound_term_matches_the_closed_form_for_gaussian_data(variance_type, prediction_type):
    scheduler = DDPMScheduler(variance_type=variance_type, prediction_type=prediction_type)
    p = paper_schedule(scheduler)
    k = np.repeat(np.arange(T), len(PIXELS))  # every timestep for every image
    x0 = np.tile(PIXELS, (T, 1, 1, 1))
    noise = np.random.default_rng(0).standard_normal(x0.shape)
    bound = VariationalBound(OptimalPredictor(p, prediction_type), scheduler)  # clips x̂_0 to [−1, 1]
    got = bound.terms(torch.from_numpy(x0), torch.from_numpy(k), torch.from_numpy(noise))["term"].numpy()

    x_t = np.sqrt(per_sample(p.alpha_bars, k)) * x0 + np.sqrt(1 - per_sample(p.alpha_bars, k)) * noise  # eq. 4
    x0_pred = np.clip(start_from_output(p, prediction_type, optimal_prediction(p, prediction_type, x_t, k), x_t, k),
                      -1, 1)
    expected = bound_term(p, x0, x_t, x0_pred, k, reverse_log_variance(p, variance_type, k))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(bound.prior(torch.from_numpy(PIXELS)).numpy(), prior_term(p, PIXELS), rtol=1e-6,
                               atol=1e-12)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_the_optimal_mean_predictor_has_the_bound_of_the_optimal_noise_predictor(variance_type):
    """μ̃ prediction (Table 2): the network's output is p_θ's mean itself. For Gaussian data the optimal μ̃-predictor
    and the optimal ε-predictor define the same p_θ, so every term of the bound agrees, and agrees with eq. 5 written
    out in numpy (without clipping: the original code clips only the reported x̂_0 of a mean predictor)."""
    k = np.repeat(np.arange(T), len(PIXELS))
    x0 = np.tile(PIXELS, (T, 1, 1, 1))
    noise = np.random.default_rng(0).standard_normal(x0.shape)
    terms = {}
    for prediction_type in ("mean", "epsilon"):
        scheduler = DDPMScheduler(variance_type=variance_type, prediction_type=prediction_type)
        p = paper_schedule(scheduler)
        bound = VariationalBound(OptimalPredictor(p, prediction_type), scheduler, clip_denoised=False)
        terms[prediction_type] = bound.terms(torch.from_numpy(x0), torch.from_numpy(k), torch.from_numpy(noise))
    x_t = np.sqrt(per_sample(p.alpha_bars, k)) * x0 + np.sqrt(1 - per_sample(p.alpha_bars, k)) * noise  # eq. 4
    x0_optimal = optimal_prediction(p, "sample", x_t, k)
    expected = bound_term(p, x0, x_t, x0_optimal, k, reverse_log_variance(p, variance_type, k))
    np.testing.assert_allclose(terms["mean"]["term"].numpy(), expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(terms["mean"]["term"].numpy(), terms["epsilon"]["term"].numpy(), rtol=1e-6, atol=1e-9)
    # x̂_0 recovered from the mean (eq. 7 solved for x_0) is E[x_0 | x_t], hence the same x̂_0 error
    np.testing.assert_allclose(terms["mean"]["x0_mse"].numpy(), terms["epsilon"]["x0_mse"].numpy(), rtol=1e-5,
                               atol=1e-9)


@pytest.mark.parametrize("num_inference_steps", [None, 50])
def test_a_mean_predictor_samples_as_the_noise_predictor_it_was_converted_from(num_inference_steps):
    """Algorithm 2 with μ̃ prediction: a network whose mean is computed from a given ε (eq. 11 = eq. 7 at the x̂_0 of
    eq. 15) takes the same steps as that ε-network, on the full chain (the mean is used as is) and on a chain that
    skips steps (the mean's x̂_0 feeds the respaced posterior)."""
    by_type = {kind: DDPMScheduler(prediction_type=kind, clip_sample=False) for kind in ("epsilon", "mean")}
    for scheduler in by_type.values():
        if num_inference_steps:
            scheduler.set_timesteps(num_inference_steps)
    p = paper_schedule(by_type["mean"])
    rng = np.random.default_rng(3)
    timesteps = by_type["mean"].timesteps[[0, 1, len(by_type["mean"].timesteps) // 2, -2, -1]]
    for t in timesteps.tolist():
        x_t = rng.standard_normal((2, 1, 4, 4))
        eps = rng.standard_normal(x_t.shape)
        mean = posterior(p, start_from_output(p, "epsilon", eps, x_t, [t]), x_t, [t])[0]  # one step, eq. 7 at eq. 15
        outputs = {"epsilon": eps, "mean": mean}
        steps = {kind: by_type[kind].step(torch.from_numpy(outputs[kind]).float(), t, torch.from_numpy(x_t).float(),
                                          generator=torch.Generator().manual_seed(t)) for kind in by_type}
        # float32 steps; x̂_0 from a mean divides by √ᾱ_{t−1} β_t / (1 − ᾱ_t), as small as 1e-4 at t = T
        np.testing.assert_allclose(steps["mean"].prev_sample, steps["epsilon"].prev_sample, rtol=0, atol=2e-4)
        np.testing.assert_allclose(steps["mean"].pred_original_sample, steps["epsilon"].pred_original_sample,
                                   rtol=1e-3, atol=2e-2)


def test_a_clipped_mean_predictor_steps_from_its_own_mean_on_the_full_chain():
    """Algorithm 2 with μ̃ prediction on the full chain, as the original code samples it: x_{t−1} = μ_θ + √β̃_t z
    with the network's mean as is, even where its x̂_0 lies outside [−1, 1] and is clipped (the clip changes the
    reported x̂_0 only). Closed form in float64 from the paper's schedule; float32 chain, so 1e-5."""
    scheduler = DDPMScheduler(prediction_type="mean", clip_sample=True)
    p = paper_schedule(scheduler)
    g = torch.Generator().manual_seed(0)
    x_t, mean = torch.randn(2, 1, 8, 8, generator=g), 3 * torch.randn(2, 1, 8, 8, generator=g)
    t = 500
    out = scheduler.step(mean, t, x_t, generator=torch.Generator().manual_seed(1))
    assert np.abs(start_from_output(p, "mean", mean.double().numpy(), x_t.double().numpy(), [t])).max() > 1  # clipped
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1)).double()
    expected = mean.double() + np.sqrt(posterior_variance_at(p, t)) * z
    np.testing.assert_allclose(out.prev_sample.double().numpy(), expected.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_the_decoder_variance_at_t1_is_the_posterior_variance_of_t2(variance_type):
    """L_0 for one pixel and a mean half a bin off: −log of the N(mean, β̃_2) mass of the bin, whatever the fixed
    variance type (β̃_1 = 0 is no variance and β_1 is fixed_large's sampling choice, not the bound's)."""
    scheduler = DDPMScheduler(variance_type=variance_type, prediction_type="sample", clip_sample=False)
    p = paper_schedule(scheduler)
    beta_tilde_2 = (1 - p.alpha_bars[0]) / (1 - p.alpha_bars[1]) * p.betas[1]
    beta_2 = 0.0001 + 0.0199 / 999
    np.testing.assert_allclose(beta_tilde_2, 0.0001 * beta_2 / (1 - 0.9999 * (1 - beta_2)), rtol=1e-6)  # ≈ 5.45e-5
    x0 = torch.full((1, 1, 1, 1), 1 / 255, dtype=torch.float64)  # pixel 128: its bin is [0, 2/255]
    mean = x0 + 1 / 255  # the output is x̂_0 = μ̃_1 (ᾱ_0 = 1 in eq. 7), at the bin's upper edge
    bound = VariationalBound(None, scheduler, clip_denoised=False)
    got = float(bound.terms_from_output(mean, x0, x0, torch.tensor([0]), torch.zeros_like(x0))["term"])
    std = math.sqrt(beta_tilde_2)
    expected = -math.log(ndtr(0.0) - ndtr(-2 / 255 / std))
    assert abs(got - expected) < 1e-9
    # The scheduler's reverse variance says the same, and sampling never uses it (no noise is added at t = 0).
    _, log_var = scheduler.p_variance(x0, torch.tensor([0]))
    assert abs(float(log_var) - math.log(beta_tilde_2)) < 1e-9
    std_beta_1 = math.sqrt(p.betas[0])  # what the bound would be with β_1: clearly different
    assert abs(got + math.log(ndtr(0.0) - ndtr(-2 / 255 / std_beta_1))) > 0.05


# --- the losses ----------------------------------------------------------------------------------------------------

LOSS_CASES = [("simple", "fixed_small"), ("vlb", "fixed_small"), ("vlb", "fixed_large"), ("vlb", "learned_range"),
              ("hybrid", "learned_range")]


def hand_made_batch(p, prediction_type, learned):
    """Four images at t = 1, 2, 500 and 1000 (indices 0, 1, 499, 999) and a model output near the true target,
    so that the decoder's bins keep their mass."""
    rng = np.random.default_rng(1)
    k = np.array([0, 1, 499, 999])
    x0 = np.array([[0, 255, 128, 5], [30, 127, 129, 250], [255, 0, 100, 180], [60, 61, 62, 63]],
                  dtype=np.float64).reshape(4, 1, 2, 2) / 127.5 - 1
    noise = rng.standard_normal(x0.shape)
    ab = per_sample(p.alpha_bars, k)
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    target = {"epsilon": noise, "sample": x0, "v_prediction": np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0,
              "mean": posterior(p, x0, x_t, k)[0]}
    output = target[prediction_type] + 0.01 * rng.standard_normal(x0.shape)
    if learned:
        output = np.concatenate([output, rng.uniform(-1, 1, x0.shape)], axis=1)
    return k, x0, noise, x_t, target[prediction_type], output


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction", "mean"])
@pytest.mark.parametrize("loss_name,variance_type", LOSS_CASES)
def test_each_loss_matches_its_formula(loss_name, variance_type, prediction_type, snr_gamma):
    """With --snr_gamma the simple loss, and the simple part of the hybrid loss, is each example's MSE times its
    Min-SNR-γ weight (t = 1, 2 have SNR > 5, t = 500, 1000 SNR < 5); the bound refuses it."""
    scheduler = DDPMScheduler(variance_type=variance_type, prediction_type=prediction_type)
    p = paper_schedule(scheduler)
    learned = variance_type == "learned_range"
    k, x0, noise, x_t, target, output = hand_made_batch(p, prediction_type, learned)
    if loss_name == "vlb" and snr_gamma is not None:
        with pytest.raises(ValueError, match="--loss vlb is the variational bound, whose terms already carry"):
            make_loss(loss_name, scheduler, out_channels=2 if learned else 1, in_channels=1, snr_gamma=snr_gamma)
        return
    if prediction_type == "mean" and snr_gamma is not None:  # no Min-SNR weights are derived for μ̃ prediction
        with pytest.raises(ValueError, match="--snr_gamma is defined for --prediction_type epsilon / sample / v_pre"):
            make_loss(loss_name, scheduler, out_channels=2 if learned else 1, in_channels=1, snr_gamma=snr_gamma)
        return
    loss_fn = make_loss(loss_name, scheduler, out_channels=2 if learned else 1, in_channels=1, snr_gamma=snr_gamma)
    tensors = [torch.from_numpy(a).float() for a in (x0, x_t, noise)]
    out = torch.from_numpy(output).float().requires_grad_()
    got = loss_fn(out, tensors[0], tensors[1], torch.from_numpy(k), tensors[2])
    got.sum().backward()

    # The same float32 numbers the loss saw, now in float64.
    x0, x_t, noise, output = (t.double().numpy() for t in (*tensors, out.detach()))
    mean_output, variance_output = output[:, :1], (output[:, 1:] if learned else None)
    dims = x0[0].size
    weight = np.ones(len(k)) if snr_gamma is None else min_snr_weight(p.alpha_bars, prediction_type, snr_gamma)[k]
    simple = weight * ((mean_output - target) ** 2).mean((1, 2, 3))  # eq. 14, per example
    x0_pred = start_from_output(p, prediction_type, mean_output, x_t, k)  # no clipping in training
    vlb_nats = T * bound_term(p, x0, x_t, x0_pred, k, reverse_log_variance(p, variance_type, k, variance_output)) / dims
    expected = {"simple": simple, "vlb": vlb_nats, "hybrid": simple + 0.001 * vlb_nats / math.log(2)}[loss_name]
    # The bound runs in float64 on the float32 inputs; the loss is returned in float32.
    np.testing.assert_allclose(got.detach().double().numpy(), expected, rtol=1e-6, atol=1e-7)
    if loss_name == "hybrid":  # the bound trains the variance only: the mean's gradient is L_simple's alone
        # (the v target is computed from diffusers' float32 ᾱ table: √(1 − ᾱ_1) is off by ~1e-4 relative)
        np.testing.assert_allclose(out.grad[:, :1].double().numpy(),
                                   per_sample(weight, np.arange(len(k))) * 2 * (mean_output - target) / dims,
                                   rtol=1e-4, atol=1e-6)
        assert out.grad[:, 1:].abs().sum() > 0


def test_a_learned_variance_needs_a_loss_that_trains_it_and_the_hybrid_loss_a_learned_variance():
    """L_simple gives a learned variance no gradient; the hybrid loss's bound (its mean frozen) trains only a learned
    variance, so with a fixed one it is L_simple at more cost."""
    for loss in LOSSES:
        for variance_type in VARIANCE_TYPES:
            learned = variance_type in LEARNED_VARIANCE_TYPES
            if loss == "simple" and learned:
                words = f"--variance_type {variance_type} gets no gradient from --loss simple"
            elif loss == "hybrid" and not learned:
                words = f"with --variance_type {variance_type} it trains what --loss simple does"
            else:
                check_loss_supports_variance(loss, variance_type)
                continue
            with pytest.raises(ValueError, match=words):
                check_loss_supports_variance(loss, variance_type)


# --- Min-SNR-γ (Hang et al. 2023) ----------------------------------------------------------------------------------


def min_snr_weight(alpha_bars, prediction_type, gamma):
    """The weight on each prediction type's own MSE that makes it min(SNR, γ) · ‖x_0 − x̂_0‖², SNR = ᾱ / (1 − ᾱ):
    ‖ε − ε̂‖² = SNR · ‖x_0 − x̂_0‖² and ‖v − v̂‖² = (SNR + 1) · ‖x_0 − x̂_0‖² for x̂_0, ε̂, v̂ from one output."""
    snr = alpha_bars / (1 - alpha_bars)
    return np.minimum(snr, gamma) / {"epsilon": snr, "sample": 1.0, "v_prediction": snr + 1}[prediction_type]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("gamma, crossing", [(5.0, 130), (1.0, 259)])  # the first index with SNR < γ
def test_min_snr_weights_match_their_closed_form_at_every_t(prediction_type, gamma, crossing):
    alpha_bars = np.cumprod(1 - np.linspace(1e-4, 0.02, T))  # the paper's schedule, here in float64
    snr = alpha_bars / (1 - alpha_bars)
    assert snr[crossing - 1] > gamma > snr[crossing]
    expected = min_snr_weight(alpha_bars, prediction_type, gamma)
    got = min_snr_weights(DDPMScheduler(prediction_type=prediction_type), gamma)
    assert got.dtype == torch.float64 and got.shape == (T,)
    # ≈1e-7: the scheduler's β_t are float32 numbers; a clamp missing or at the wrong side of γ is off by ≥ 1 %
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    k = np.array([0, 1, crossing - 2, crossing - 1, crossing, crossing + 1, 500, 999])
    np.testing.assert_allclose(got.numpy()[k], expected[k], rtol=1e-6)  # the same, named: both sides of SNR = γ
    if prediction_type == "epsilon":  # min(SNR, γ) / SNR: γ / SNR above the crossing, exactly 1 from it on
        assert (got[crossing:] == 1).all() and (got[:crossing] < 1).all()


@pytest.mark.parametrize("gamma", [1.0, 5.0, math.inf])
def test_min_snr_is_one_x0_space_loss_whatever_the_model_predicts(gamma):
    """For x̂_0 turned into the ε, x_0 and v output that carries it, the three weighted losses are one number:
    min(SNR, γ) · ‖x_0 − x̂_0‖² per dimension (γ = ∞: SNR · ‖x_0 − x̂_0‖² = ‖ε − ε̂‖², eq. 14's L_simple)."""
    rng = np.random.default_rng(3)
    k = np.array([0, 1, 129, 130, 258, 259, 500, 998, 999])
    x0, noise = rng.uniform(-1, 1, (len(k), 1, 4, 4)), rng.standard_normal((len(k), 1, 4, 4))
    x0_pred = x0 + 0.1 * rng.standard_normal(x0.shape)
    alpha_bars = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    ab = per_sample(alpha_bars, k)
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise  # eq. 4
    noise_pred = (x_t - np.sqrt(ab) * x0_pred) / np.sqrt(1 - ab)
    outputs = {"epsilon": noise_pred, "sample": x0_pred,
               "v_prediction": np.sqrt(ab) * noise_pred - np.sqrt(1 - ab) * x0_pred}
    snr = alpha_bars[k] / (1 - alpha_bars[k])
    expected = np.minimum(snr, gamma) * ((x0 - x0_pred) ** 2).mean((1, 2, 3))
    for prediction_type, output in outputs.items():
        loss_fn = make_loss("simple", DDPMScheduler(prediction_type=prediction_type), 1, 1, snr_gamma=gamma)
        got = loss_fn(torch.from_numpy(output), torch.from_numpy(x0), torch.from_numpy(x_t), torch.from_numpy(k),
                      torch.from_numpy(noise))
        # float32 differences of ε-sized numbers (|ε − ε̂| ≈ 10 at t = 1): ≈1e-6 relative
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=2e-5, err_msg=prediction_type)


def test_min_snr_with_infinite_gamma_is_l_simple_exactly():
    """ε prediction: min(SNR, ∞) / SNR = 1, so the loss is the paper's L_simple bit for bit."""
    scheduler = DDPMScheduler()
    generator = torch.Generator().manual_seed(0)
    x0, noise, output = (torch.randn(16, 1, 4, 4, generator=generator) for _ in range(3))
    t = torch.randint(0, T, (16,), generator=generator)
    x_t = scheduler.add_noise(x0, noise, t)
    weighted = make_loss("simple", scheduler, 1, 1, snr_gamma=math.inf)(output, x0, x_t, t, noise)
    assert torch.equal(weighted, make_loss("simple", scheduler, 1, 1)(output, x0, x_t, t, noise))


def test_min_snr_refuses_what_it_is_not_defined_for():
    with pytest.raises(ValueError, match=r"--snr_gamma is defined for --prediction_type epsilon / sample / "
                                         r"v_prediction, not 'mean'"):
        check_snr_gamma(5.0, "mean", "simple")
    for gamma in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="--snr_gamma must be positive"):
            check_snr_gamma(gamma, "epsilon")
    check_snr_gamma(None, "mean", "vlb")  # no weighting asked for: nothing to refuse
