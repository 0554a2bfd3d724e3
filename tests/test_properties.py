"""Property-based checks (hypothesis) of the scheduler and the bound, over the whole space of valid inputs."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpm_hf.likelihood import bits_per_dim, discretized_gaussian_log_likelihood, normal_kl
from ddpm_hf.scheduler import BETA_SCHEDULES, PREDICTION_TYPES, VARIANCE_TYPES, DDPMScheduler
from test_likelihood import GaussianDataOptimum

configs = st.fixed_dictionaries({
    "num_train_timesteps": st.integers(2, 1000),
    "beta_schedule": st.sampled_from(BETA_SCHEDULES),
    "variance_type": st.sampled_from(VARIANCE_TYPES),
    "prediction_type": st.sampled_from(PREDICTION_TYPES),
    "clip_sample": st.booleans(),
    "thresholding": st.booleans(),
    "timestep_spacing": st.sampled_from(["leading", "trailing", "linspace"]),
    "rescale_betas_zero_snr": st.booleans(),
})


@settings(max_examples=60, deadline=None)
@given(config=configs, data=st.data())
def test_step_is_finite_for_any_valid_config_and_timestep(config, data):
    if config["rescale_betas_zero_snr"] and config["prediction_type"] == "epsilon":
        config["rescale_betas_zero_snr"] = False  # ᾱ_T = 0 makes x̂_0 from ε undefined by construction
    scheduler = DDPMScheduler(**config)
    steps = data.draw(st.integers(1, config["num_train_timesteps"]))
    scheduler.set_timesteps(steps)
    t = data.draw(st.sampled_from(scheduler.timesteps.tolist()))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 1, 4, 4, generator=g) * data.draw(st.floats(0.01, 10))
    channels = 2 if config["variance_type"] in ("learned", "learned_range") else 1
    output = torch.randn(2, channels, 4, 4, generator=g).clamp(-1, 1) * 3
    out = scheduler.step(output, t, sample, generator=g)
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.pred_original_sample).all()
    noise = torch.randn(sample.shape, generator=g)
    ts = torch.full((2,), t)
    assert torch.isfinite(scheduler.add_noise(sample, noise, ts)).all()
    assert torch.isfinite(scheduler.get_velocity(sample, noise, ts)).all()


@settings(max_examples=8, deadline=None)
@given(mean=st.floats(-0.5, 0.5), std=st.floats(0.05, 0.4), seed=st.integers(0, 1000))
def test_bound_is_never_below_the_exact_nll_of_gaussian_data(mean, std, seed):
    scheduler = DDPMScheduler(num_train_timesteps=200, variance_type="learned")
    x = (mean + std * torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)
    images = ((x + 1) * 127.5).round().to(torch.uint8)
    x0 = images.double() / 127.5 - 1
    nll = -discretized_gaussian_log_likelihood(x0, torch.tensor(mean, dtype=torch.float64),
                                               torch.tensor(math.log(std), dtype=torch.float64)).sum((1, 2, 3))
    nll = nll / (4 * math.log(2))
    model = GaussianDataOptimum(scheduler, True, mean=mean, std=std)
    result = bits_per_dim(model, scheduler, images, batch_size=256, progress=False)
    gap = result.per_image.double() - nll
    assert float(gap.mean()) > -3 * float(gap.std()) / math.sqrt(len(gap))


@settings(max_examples=100, deadline=None)
@given(mean=st.floats(-3, 3), log_scale=st.floats(-9, 3), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_decoder_is_a_probability_distribution_over_the_256_levels(mean, log_scale, dtype):
    levels = torch.arange(256, dtype=dtype) / 127.5 - 1
    log_p = discretized_gaussian_log_likelihood(levels, torch.tensor(mean, dtype=dtype),
                                                torch.tensor(log_scale, dtype=dtype))
    assert torch.isfinite(log_p).all() and (log_p <= 1e-6).all()
    # The bins partition the real line; the 1e-12 floor per bin may add up to 256e-12. In float32 the levels
    # themselves are off by up to ~1e-7, which at the smallest scales (σ ≈ 1e-4) moves ~1e-3 of mass across an edge.
    assert abs(float(log_p.double().exp().sum()) - 1) < (1e-3 if dtype == torch.float32 else 1e-9)


@settings(max_examples=100, deadline=None)
@given(m1=st.floats(-5, 5), v1=st.floats(-8, 4), m2=st.floats(-5, 5), v2=st.floats(-8, 4))
def test_kl_is_non_negative_and_zero_only_between_equal_gaussians(m1, v1, m2, v2):
    args = [torch.tensor(x, dtype=torch.float64) for x in (m1, v1, m2, v2)]
    kl = float(normal_kl(*args))
    assert math.isfinite(kl) and kl >= -1e-12
    assert abs(float(normal_kl(args[0], args[1], args[0], args[1]))) < 1e-12
    if abs(m1 - m2) > 1e-3 or abs(v1 - v2) > 1e-3:
        assert kl > 0
