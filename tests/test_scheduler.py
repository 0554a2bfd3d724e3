"""DDPMScheduler: parity with diffusers.DDPMScheduler (the oracle) and the paper's closed forms (a second oracle)."""

import itertools

import diffusers
import numpy as np
import pytest
import torch

from ddpm_hf import DDPMScheduler

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"]
VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]
X0_LIMITS = [{"clip_sample": False}, {"clip_sample": True, "clip_sample_range": 1.5}, {"thresholding": True, "sample_max_value": 2.0}]
SPACINGS = [{"timestep_spacing": "leading"}, {"timestep_spacing": "leading", "steps_offset": 1},
            {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"}]
INFERENCE_STEPS = [None, 1, 10, 50, 1000, "custom"]
CUSTOM_TIMESTEPS = [999, 871, 500, 321, 100, 20, 3, 0]

# Where ddpm_hf deliberately differs from diffusers, the oracle is diffusers run with the equivalent correct config.
ORACLE_VARIANCE = {"fixed_large_log": "fixed_large"}


def _pair(**config):
    ours = DDPMScheduler(**config)
    config = dict(config, variance_type=ORACLE_VARIANCE.get(config.get("variance_type"), config.get("variance_type")))
    return ours, diffusers.DDPMScheduler(**config)


def _set_steps(schedulers, steps):
    for s in schedulers:
        if steps == "custom":
            s.set_timesteps(timesteps=CUSTOM_TIMESTEPS)
        elif steps is not None:
            s.set_timesteps(steps)


@pytest.mark.parametrize("beta_schedule,variance_type,prediction_type",
                         list(itertools.product(BETA_SCHEDULES, VARIANCE_TYPES, PREDICTION_TYPES)))
def test_step_matches_diffusers(beta_schedule, variance_type, prediction_type):
    learned = variance_type in ("learned", "learned_range")
    torch.manual_seed(0)
    sample = torch.randn(2, 3, 4, 4) * 1.5
    model_output = torch.randn(2, 6 if learned else 3, 4, 4)
    cases = 0
    for limits, spacing, steps in itertools.product(X0_LIMITS, SPACINGS, INFERENCE_STEPS):
        if steps in (None, "custom") and spacing != SPACINGS[0]:
            continue  # spacing only matters for num_inference_steps
        config = dict(beta_schedule=beta_schedule, variance_type=variance_type,
                      prediction_type=prediction_type, **limits, **spacing)
        ours, oracle = _pair(**config)
        if steps == 1000 and spacing.get("steps_offset"):
            with pytest.raises(ValueError, match="steps_offset"):  # diffusers would index past the schedule
                ours.set_timesteps(steps)
            continue
        _set_steps((ours, oracle), steps)
        assert torch.equal(ours.timesteps, oracle.timesteps)
        ts = ours.timesteps.tolist()
        for t in sorted({ts[0], ts[len(ts) // 2], ts[-1]}, reverse=True):
            oracle_output = model_output
            if variance_type == "learned":  # ours reads a log-variance, diffusers a variance
                oracle_output = torch.cat([model_output[:, :3], model_output[:, 3:].exp()], dim=1)
            a = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(t))
            b = oracle.step(oracle_output, t, sample, generator=torch.Generator().manual_seed(t))
            torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=1e-6, atol=1e-6)
            assert torch.isfinite(a.prev_sample).all()
            cases += 1
    assert cases >= 3 * (2 + 4 * 4) * 2


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("rescale", [False, True])
def test_add_noise_velocity_and_schedule_match_diffusers(beta_schedule, rescale):
    ours, oracle = _pair(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale)
    torch.testing.assert_close(ours.alphas_cumprod, oracle.alphas_cumprod, rtol=0, atol=0)
    torch.manual_seed(1)
    x0, noise = torch.randn(8, 3, 5, 5), torch.randn(8, 3, 5, 5)
    t = torch.tensor([0, 1, 10, 250, 500, 998, 999, 999]) if not rescale else torch.tensor([0, 1, 10, 250, 500, 998, 998, 3])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), oracle.add_noise(x0, noise, t), rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), oracle.get_velocity(x0, noise, t), rtol=0, atol=1e-7)


def test_trained_betas_and_previous_timestep_match_diffusers():
    betas = np.linspace(1e-3, 0.05, 50)
    ours, oracle = _pair(num_train_timesteps=50, trained_betas=betas.tolist())
    torch.testing.assert_close(ours.betas, oracle.betas)
    assert ours.previous_timestep(10) == oracle.previous_timestep(10)
    _set_steps((ours, oracle), 7)
    assert [int(ours.previous_timestep(t)) for t in ours.timesteps] == [int(oracle.previous_timestep(t)) for t in oracle.timesteps]
    assert len(ours) == len(oracle) == 50


def test_per_sample_generators_match_diffusers():
    ours, oracle = _pair(variance_type="fixed_large")
    x, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]  # noqa: E731
    torch.testing.assert_close(ours.step(eps, 500, x, generator=gens()).prev_sample,
                               oracle.step(eps, 500, x, generator=gens()).prev_sample, rtol=0, atol=0)


def test_config_interchange(tmp_path):
    ours = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large", prediction_type="v_prediction",
                         timestep_spacing="trailing", clip_sample=False)
    ours.save_pretrained(tmp_path / "ours")
    theirs = diffusers.DDPMScheduler.from_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    back = DDPMScheduler.from_pretrained(tmp_path / "theirs")
    for key in (k for k in diffusers.DDPMScheduler().config if not k.startswith("_")):
        assert ours.config[key] == theirs.config[key] == back.config[key], key
    torch.testing.assert_close(back.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=0)
    # _compatibles: swap with DDIM and back through from_config.
    ddim = diffusers.DDIMScheduler.from_config(ours.config)
    assert ddim.config.beta_schedule == "squaredcos_cap_v2" and ddim.config.prediction_type == "v_prediction"
    assert isinstance(DDPMScheduler.from_config(ddim.config), DDPMScheduler)
    assert "DDIMScheduler" in [c.__name__ for c in ours.compatibles]


# --- closed forms, independent of diffusers ------------------------------------------------------------------------


def _alpha_bars_float64(scheduler):
    return np.cumprod(1 - scheduler.betas.double().numpy())


def test_forward_process_monte_carlo_matches_eq4():
    scheduler = DDPMScheduler()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    n = 40_000
    for t in (0, 99, 499, 999):
        noise = torch.randn(n, 1, 4, 4, generator=generator, dtype=torch.float64)
        xt = scheduler.add_noise(x0.double().expand(n, -1, -1, -1), noise, torch.full((n,), t))
        ab = _alpha_bars_float64(scheduler)[t]
        se_mean = np.sqrt((1 - ab) / n)
        assert (xt.mean(0) - np.sqrt(ab) * x0.double()).abs().max() < 5 * se_mean
        # The sample variance of a Gaussian has standard error σ² √(2/(n−1)).
        assert (xt.var(0) - (1 - ab)).abs().max() < 5 * (1 - ab) * np.sqrt(2 / (n - 1))
        mean, var = scheduler.q_mean_variance(x0.double(), t)
        torch.testing.assert_close(mean, np.sqrt(ab) * x0.double(), rtol=1e-5, atol=1e-6)
        assert abs(float(var) - (1 - ab)) < 1e-6


def test_posterior_variance_and_coefficients_match_eq7():
    scheduler = DDPMScheduler()
    ab = _alpha_bars_float64(scheduler)
    betas = scheduler.betas.double().numpy()
    t = torch.arange(1, 1000)
    ab_t, ab_prev = ab[1:], ab[:-1]
    expected_var = (1 - ab_prev) / (1 - ab_t) * betas[1:]
    np.testing.assert_allclose(scheduler.posterior_variance(t).double().numpy(), expected_var, rtol=1e-6)
    assert float(scheduler.posterior_variance(0)) == 0.0
    coef_x0, coef_xt = scheduler.posterior_mean_coefficients(t)
    np.testing.assert_allclose(coef_x0.double().numpy(), np.sqrt(ab_prev) * betas[1:] / (1 - ab_t), rtol=1e-6)
    np.testing.assert_allclose(coef_xt.double().numpy(), np.sqrt(1 - betas[1:]) * (1 - ab_prev) / (1 - ab_t), rtol=1e-6)
    clipped = scheduler.posterior_log_variance_clipped(torch.tensor([0, 1, 500]))
    np.testing.assert_allclose(clipped.double().numpy(), np.log(expected_var[[0, 0, 499]]), rtol=1e-4)


def test_posterior_composed_with_forward_gives_marginal():
    """∫ q(x_{t−1}|x_t, x_0) q(x_t|x_0) dx_t = q(x_{t−1}|x_0): mean √ᾱ_{t−1} x_0, variance 1 − ᾱ_{t−1}."""
    scheduler = DDPMScheduler()
    ab = _alpha_bars_float64(scheduler)
    t = torch.arange(1, 1000)
    coef_x0, coef_xt = (c.double().numpy() for c in scheduler.posterior_mean_coefficients(t))
    var = scheduler.posterior_variance(t).double().numpy()
    np.testing.assert_allclose(coef_x0 + coef_xt * np.sqrt(ab[1:]), np.sqrt(ab[:-1]), rtol=1e-4)
    np.testing.assert_allclose(coef_xt**2 * (1 - ab[1:]) + var, 1 - ab[:-1], rtol=1e-4, atol=1e-7)
    # and by sampling: x_t ~ q(x_t|x_0), then x_{t−1} ~ q(x_{t−1}|x_t, x_0).
    g = torch.Generator().manual_seed(3)
    n, x0 = 50_000, torch.full((50_000, 1), 0.7, dtype=torch.float64)
    for step in (1, 300, 999):
        xt = scheduler.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.full((n,), step))
        mean, var, _ = scheduler.q_posterior_mean_variance(x0, xt, step)
        prev = mean + var.sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        assert abs(float(prev.mean()) - np.sqrt(ab[step - 1]) * 0.7) < 5 * np.sqrt((1 - ab[step - 1]) / n)
        assert abs(float(prev.var()) - (1 - ab[step - 1])) < 5 * (1 - ab[step - 1]) * np.sqrt(2 / n)


def test_eps_parameterisation_identities():
    """eq. 11 (μ_θ from ε) equals eq. 7 at x̂_0 from ε; x̂_0 ↔ ε round trip; step() without clipping uses μ_θ."""
    scheduler = DDPMScheduler(clip_sample=False)
    torch.manual_seed(0)
    x_t, eps = torch.randn(4, 3, 4, 4, dtype=torch.float64), torch.randn(4, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    x0 = scheduler.predict_start_from_noise(x_t, t, eps)
    torch.testing.assert_close(scheduler.predict_noise_from_start(x_t, t, x0), eps)
    posterior_mean, _, _ = scheduler.q_posterior_mean_variance(x0, x_t, t)
    ab = torch.from_numpy(_alpha_bars_float64(scheduler))[t].view(-1, 1, 1, 1)
    beta = scheduler.betas.double()[t].view(-1, 1, 1, 1)
    p_mean = (x_t - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()  # μ_θ of eq. 11
    torch.testing.assert_close(p_mean, posterior_mean, rtol=1e-4, atol=1e-5)
    for i, step in enumerate(t.tolist()):
        out = scheduler.step(eps[i:i + 1].float(), step, x_t[i:i + 1].float(), generator=torch.Generator().manual_seed(0))
        std = float(scheduler.posterior_variance(step)) ** 0.5
        noise = torch.randn(out.prev_sample.shape, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out.prev_sample, (posterior_mean[i:i + 1] + std * noise).float(), rtol=1e-4, atol=1e-4)


def test_fixed_large_log_is_finite_and_equals_fixed_large():
    log, plain = DDPMScheduler(variance_type="fixed_large_log"), DDPMScheduler(variance_type="fixed_large")
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in (999, 500, 1):
        a = log.step(eps, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        b = plain.step(eps, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # diffusers' own result is NaN (diffusers#14569): the reason we differ
        buggy = diffusers.DDPMScheduler(variance_type="fixed_large_log").step(eps, 500, x).prev_sample
    assert torch.isnan(buggy).any()


def test_learned_variance_is_a_log_variance():
    scheduler = DDPMScheduler(variance_type="learned", clip_sample=False)
    x = torch.zeros(1, 1, 64, 64)
    out = torch.cat([torch.zeros_like(x), torch.full_like(x, -2.0)], dim=1)  # log σ² = −2, even a negative value
    mean = scheduler.step(torch.cat([torch.zeros_like(x), torch.full_like(x, -50.0)], 1), 700, x).prev_sample
    sample = scheduler.step(out, 700, x, generator=torch.Generator().manual_seed(0)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample - mean, np.exp(-1.0) * noise, rtol=1e-5, atol=1e-5)


def test_p_variance_of_a_learned_variance_is_the_exp_of_the_models_log_variance():
    """The public p_variance returns (σ², log σ²); for ``learned`` the model's extra channels are log σ² (improved-
    diffusion's convention), so σ² = exp of them exactly (float64). The step reads the log, so only this sees σ²."""
    scheduler = DDPMScheduler(variance_type="learned")
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    log_variance = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    variance, log_var = scheduler.p_variance(x, torch.tensor([5, 300, 999]), model_variance=log_variance)
    torch.testing.assert_close(variance, log_variance.exp(), rtol=1e-12, atol=0)
    assert torch.equal(log_var, log_variance)


def test_thresholding_of_a_prediction_whose_quantile_is_below_one_matches_diffusers():
    """Dynamic thresholding (Imagen) clamps the quantile s to at least 1, so a prediction already inside [−1, 1] is
    left alone. The parity tests' random outputs have quantiles above 1, where the lower clamp does nothing: here the
    x̂_0 (prediction_type sample) is 0.2·N(0, 1), whose 99.5 % quantile is about 0.5."""
    ours, theirs = _pair(thresholding=True, sample_max_value=2.0, prediction_type="sample")
    g = torch.Generator().manual_seed(0)
    x, output = torch.randn(2, 3, 8, 8, generator=g), 0.2 * torch.randn(2, 3, 8, 8, generator=g)
    assert float(output.abs().flatten(1).quantile(0.995, dim=1).max()) < 0.9
    a, b = (s.step(output, 500, x, generator=torch.Generator().manual_seed(1)) for s in (ours, theirs))
    torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-6, atol=1e-6)


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,words", [
    ({"beta_schedule": "cosine"}, "squaredcos_cap_v2"),
    ({"variance_type": "large"}, "fixed_large"),
    ({"prediction_type": "eps"}, "v_prediction"),
    ({"timestep_spacing": "uniform"}, "trailing"),
    ({"num_train_timesteps": 0}, "positive"),
    ({"num_train_timesteps": 10, "trained_betas": [0.1] * 5}, "trained_betas"),
    ({"beta_end": 1.5}, "(0, 1]"),
])
def test_bad_config_names_the_allowed_values(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("]", r"\]")):
        DDPMScheduler(**kwargs)


def test_bad_timesteps():
    scheduler = DDPMScheduler()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        scheduler.step(x, 1000, x)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        scheduler.add_noise(x, x, torch.tensor([-1]))
    with pytest.raises(ValueError, match="descending"):
        scheduler.set_timesteps(timesteps=[10, 20, 5])
    with pytest.raises(ValueError, match="descending"):
        scheduler.set_timesteps(timesteps=[10, 10, 5])
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        scheduler.set_timesteps(timesteps=[1000, 5])
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps(10, timesteps=[5, 1])
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps()
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        scheduler.set_timesteps(1001)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="not one of the timesteps"):
        scheduler.step(x, 901, x)
    with pytest.raises(ValueError, match="channels"):
        scheduler.step(torch.randn(1, 6, 4, 4), 900, x)


# --- diffusers' private _get_variance, called by diffusers' own pipelines on the scheduler they hold ----------------


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("steps", [None, 10, "trailing", "custom"])
def test_get_variance_matches_diffusers(beta_schedule, steps):
    """Every variance_type, configured and passed as the override, at t = 0, 1, T−1 and timesteps in between; with
    fewer steps the variance uses the respaced β, so diffusers' values depend on set_timesteps."""
    torch.manual_seed(0)
    predicted = torch.rand(2, 3, 4, 4) * 2 - 1
    spacing = {"timestep_spacing": "trailing"} if steps == "trailing" else {}
    compared = 0
    for configured in VARIANCE_TYPES:
        ours = DDPMScheduler(beta_schedule=beta_schedule, variance_type=configured, **spacing)
        oracle = diffusers.DDPMScheduler(beta_schedule=beta_schedule, variance_type=configured, **spacing)
        _set_steps((ours, oracle), 10 if steps == "trailing" else steps)
        timesteps = ours.timesteps.tolist()
        if steps is None:  # the full chain: its ends and every 37th step
            timesteps = [999, 998, *range(963, 2, -37), 2, 1, 0]
        assert timesteps[-1] == (99 if steps == "trailing" else 0)  # trailing's last step has no successor either
        for t in timesteps:
            for override in (None, *VARIANCE_TYPES) if configured == "fixed_small" else (None,):
                a = ours._get_variance(t, predicted_variance=predicted, variance_type=override)
                b = oracle._get_variance(t, predicted_variance=predicted, variance_type=override)
                assert a.dtype == b.dtype and a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{configured=} {override=} {t=}")
                compared += 1
        # diffusers' pipelines pass an element of scheduler.timesteps (a 0-dim tensor), without predicted_variance.
        if configured not in LEARNED_VARIANCE_TYPES:
            t = ours.timesteps[len(ours.timesteps) // 2]
            torch.testing.assert_close(ours._get_variance(t), oracle._get_variance(t), rtol=0, atol=0)
    assert compared == (len(VARIANCE_TYPES) + 6) * len(timesteps)


def test_get_variance_at_the_first_step_is_the_sampling_chains():
    """At t = 0 (the paper's t = 1) β̃ = 0. The bound's p_variance uses β̃ of the second step there (§3.3's decoder);
    _get_variance keeps diffusers' floor of 1e-20 (and β_1 for fixed_large), so that a diffusers caller scaling its
    last step's noise by √_get_variance adds none, as step() does."""
    small, large = DDPMScheduler(variance_type="fixed_small"), DDPMScheduler(variance_type="fixed_large")
    assert float(small._get_variance(0)) == pytest.approx(1e-20, rel=1e-6)
    assert float(small._get_variance(0, variance_type="fixed_small_log")) == pytest.approx(1e-10, rel=1e-6)
    assert float(large._get_variance(0)) == pytest.approx(1e-4, rel=1e-3)  # β_1 of the linear schedule, in float32
    decoder_variance = float(small.posterior_variance(1, dtype=torch.float32))
    x = torch.zeros(1, 1, 2, 2)
    for scheduler in (small, large):
        assert float(scheduler.p_variance(x, 0)[0].flatten()[0]) == decoder_variance
    # step() at t = 0 adds no noise: its result is the mean whatever the generator.
    eps = torch.randn(1, 1, 2, 2)
    a = small.step(eps, 0, x, generator=torch.Generator().manual_seed(1)).prev_sample
    b = small.step(eps, 0, x, generator=torch.Generator().manual_seed(2)).prev_sample
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="variance channels"):
        DDPMScheduler(variance_type="learned_range")._get_variance(500)
    with pytest.raises(ValueError, match="fixed_large"):
        small._get_variance(500, variance_type="large")


class _HopperLikeEnv:
    """The two things ValueGuidedRLPipeline reads from a gym environment: its spaces and its offline dataset."""

    observation_space = type("Space", (), {"shape": (3,)})
    action_space = type("Space", (), {"shape": (2,)})

    def get_dataset(self):
        rng = np.random.default_rng(0)
        return {"observations": rng.normal(size=(50, 3)), "actions": rng.normal(size=(50, 2))}


def test_diffusers_value_guided_pipeline_runs_with_our_scheduler():
    """diffusers' value-guided sampling pipeline calls scheduler._get_variance at every step (AttributeError before):
    with our scheduler it plans the same actions as with diffusers'."""
    from diffusers import UNet1DModel
    from diffusers.experimental import ValueGuidedRLPipeline

    torch.manual_seed(0)
    common = dict(in_channels=5, use_timestep_embedding=True, layers_per_block=1, act_fn="mish", freq_shift=1,
                  flip_sin_to_cos=False, time_embedding_type="positional")
    unet = UNet1DModel(out_channels=5, block_out_channels=(8, 16), down_block_types=("DownResnetBlock1D",) * 2,
                       up_block_types=("UpResnetBlock1D",), mid_block_type="MidResTemporalBlock1D",
                       out_block_type="OutConv1DBlock", norm_num_groups=8, **common).eval()
    # The smallest value function whose fully connected head fits a horizon of 16 (diffusers' test config).
    value_function = UNet1DModel(out_channels=1, block_out_channels=(32, 64, 128, 256), downsample_each_block=True,
                                 down_block_types=("DownResnetBlock1D",) * 4, up_block_types=(),
                                 mid_block_type="ValueFunctionMidBlock1D", out_block_type="ValueFunction",
                                 **common).eval()
    actions = []
    for scheduler_class in (DDPMScheduler, diffusers.DDPMScheduler):
        # fixed_small_log is the variance type of diffusers' pretrained hopper planner.
        scheduler = scheduler_class(num_train_timesteps=3, variance_type="fixed_small_log", clip_sample=False)
        pipe = ValueGuidedRLPipeline(value_function=value_function, unet=unet, scheduler=scheduler,
                                     env=_HopperLikeEnv())
        pipe.set_progress_bar_config(disable=True)
        torch.manual_seed(0)  # the pipeline and step() draw from the global generator
        actions.append(pipe(np.zeros(3), batch_size=2, planning_horizon=16, n_guide_steps=1, scale=0.1))
    np.testing.assert_allclose(actions[0], actions[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variance_type,num_inference_steps", [("fixed_small", 1000), ("fixed_large", 1000),
                                                               ("fixed_small_log", 50)])
def test_a_step_costs_the_host_about_what_diffusers_step_does(variance_type, num_inference_steps):
    """The host's work per step of a chain, counted as the tensor operations dispatched (deterministic, unlike a
    time): at most a quarter more than diffusers' step, the same numbers. A network compiled with CUDA graphs leaves
    the host little else to do between two calls; until 2026-11-27 d our step dispatched 142 operations to diffusers'
    63 (the bound's first-step variance computed at every step, a single t checked through the per-example path),
    since then about 69. (diffusers is the yardstick: a release whose step does far less would need a look here.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.operations = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.operations += 1
            return func(*args, **(kwargs or {}))

    sample, model_output = torch.randn(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    counts, outputs = [], []
    for scheduler in (DDPMScheduler(variance_type=variance_type), diffusers.DDPMScheduler(variance_type=variance_type)):
        scheduler.set_timesteps(num_inference_steps)
        with Count() as count:
            outputs.append(scheduler.step(model_output, scheduler.timesteps[len(scheduler.timesteps) // 2], sample,
                                          generator=torch.Generator().manual_seed(1)).prev_sample)
        counts.append(count.operations)
    assert torch.equal(*outputs) and counts[1] > 0  # (the count saw diffusers' step)
    assert counts[0] <= 1.25 * counts[1], f"ours {counts[0]} operations per step, diffusers' {counts[1]}"


def test_per_sample_host_noise_is_the_same_whatever_the_threads_drawing_it():
    """Host noise for a list of generators is drawn by several threads when the batch is large (see _draw_rows): row
    i must still be torch.randn from generator i, as on one thread. Oracle: torch.randn per row; for one generator
    listed for every row, or None (the global generator), the rows drawn in order from it."""
    from ddpm_hf.scheduler import randn_like_batch

    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for dtype in (torch.float32, torch.float64, torch.bfloat16):
                seeds = range(100, 100 + 97)  # not a multiple of the thread count
                noise = randn_like_batch((97, 3, 4, 4), [torch.Generator().manual_seed(s) for s in seeds], "cpu", dtype)
                oracle = torch.cat([torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(s), dtype=dtype)
                                    for s in seeds])
                assert torch.equal(noise, oracle), (threads, dtype)
            shared = torch.Generator().manual_seed(7)
            noise = randn_like_batch((97, 3, 4, 4), [shared] * 97, "cpu", torch.float32)
            shared.manual_seed(7)
            assert torch.equal(noise, torch.cat([torch.randn((1, 3, 4, 4), generator=shared) for _ in range(97)]))
            torch.manual_seed(8)
            noise = randn_like_batch((97, 3, 4, 4), [None] * 97, "cpu", torch.float32)
            torch.manual_seed(8)
            assert torch.equal(noise, torch.cat([torch.randn((1, 3, 4, 4)) for _ in range(97)]))
    finally:
        torch.set_num_threads(previous)
