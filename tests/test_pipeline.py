"""DDPMPipeline: sample parity with diffusers.DDPMPipeline, the two checkpoint layouts (loaded by plain diffusers in
a process where ddpm_hf cannot be imported), progressive generation, interpolation and bad input."""

import json

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet
from helpers import read_json, run_without_ddpm_hf, sample_np, tiny_pipeline


def _diffusers_twin(pipe):
    unet = diffusers.UNet2DModel(**{k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}).eval()
    unet.load_state_dict(pipe.unet.state_dict())
    twin = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler.from_config(pipe.scheduler.config))
    twin.set_progress_bar_config(disable=True)
    return twin


@pytest.mark.parametrize("scheduler_kwargs", [dict(variance_type="fixed_large"), dict(variance_type="fixed_small"),
                                              dict(prediction_type="v_prediction", clip_sample=False)])
def test_samples_match_diffusers_ddpm_pipeline(scheduler_kwargs):
    pipe = tiny_pipeline(num_train_timesteps=1000, **scheduler_kwargs)
    twin = _diffusers_twin(pipe)
    for output_type in ("np", "pt"):
        ours = pipe(batch_size=3, generator=torch.Generator().manual_seed(1), num_inference_steps=25,
                    output_type=output_type).images
        theirs = twin(batch_size=3, generator=torch.Generator().manual_seed(1), num_inference_steps=25,
                      output_type=output_type).images
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=1e-5)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (4, 5)]  # noqa: E731
    ours = pipe(batch_size=2, generator=gens(), num_inference_steps=10, output_type="np").images
    theirs = twin(batch_size=2, generator=gens(), num_inference_steps=10, output_type="np").images
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    # per-sample generators: an image depends on its own seed only
    alone = pipe(batch_size=1, generator=[torch.Generator().manual_seed(5)], num_inference_steps=10, output_type="np").images
    np.testing.assert_allclose(ours[1:], alone, rtol=0, atol=1e-5)
    pil = pipe(batch_size=1, generator=torch.Generator().manual_seed(1), num_inference_steps=3).images[0]
    assert isinstance(pil, Image.Image) and pil.size == (16, 16) and pil.mode == "L"
    # called as diffusers' pipeline is, by position (batch_size, generator, num_inference_steps, output_type), and
    # with its other names for NumPy output
    for output_type in ("np", "numpy", None):
        ours = pipe(2, torch.Generator().manual_seed(3), 4, output_type).images
        theirs = twin(2, torch.Generator().manual_seed(3), 4, output_type).images
        assert isinstance(ours, np.ndarray) and ours.shape == theirs.shape == (2, 16, 16, 1)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    ours, = pipe(1, torch.Generator().manual_seed(3), 4, "pil", False)
    theirs, = twin(1, torch.Generator().manual_seed(3), 4, "pil", False)
    assert np.array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))


def test_custom_timesteps_and_callback():
    pipe = tiny_pipeline(num_train_timesteps=100)
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t), tuple(tensors)))
        return {"sample": tensors["sample"] * 0} if i == 3 else {}

    out = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), timesteps=[90, 50, 20, 0], output_type="pt",
               callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["sample", "pred_original_sample"])
    assert [s[:2] for s in seen] == [(0, 90), (1, 50), (2, 20), (3, 0)]
    assert seen[0][2] == ("sample", "pred_original_sample")
    assert torch.equal(out.images, torch.full_like(out.images, 0.5))  # the replaced final sample (0 → 0.5)


def test_plain_diffusers_folder_loads_without_ddpm_hf(tmp_path):
    pipe = tiny_pipeline(variance_type="fixed_large")
    pipe.save_pretrained(tmp_path / "pipe")
    index = read_json(tmp_path / "pipe" / "model_index.json")
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert read_json(tmp_path / "pipe" / "unet" / "config.json")["_class_name"] == "UNet2DModel"
    assert not list((tmp_path / "pipe").rglob("*.py"))
    expected = sample_np(pipe)
    run_without_ddpm_hf(f"""
        import numpy, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / 'pipe')!r})
        assert type(pipe).__name__ == "DDPMPipeline" and type(pipe).__module__.startswith("diffusers."), type(pipe)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=20,
                      output_type="np").images
        numpy.save("out.npy", images)
    """, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=0, atol=1e-5)


# What diffusers would sample wrongly from a plain folder: NaN from fixed_large_log (diffusers#14569), and μ̃
# prediction, a prediction type diffusers lacks.
WRONG_IN_DIFFUSERS = {"fixed_large_log": dict(variance_type="fixed_large_log"),
                      "mean": dict(prediction_type="mean", clip_sample=False)}


def test_remote_code_folder_for_what_diffusers_gets_wrong(tmp_path):
    """Saved as remote code; diffusers refuses to run it without trust_remote_code=True and samples our samples with
    it; diffusers' own DDPMScheduler on the saved config refuses μ̃ prediction with its own error (and gives NaN for
    fixed_large_log); ddpm_hf reads the folders back into its own classes. One child process checks both folders."""
    expected = {}
    for name, config in WRONG_IN_DIFFUSERS.items():
        pipe = tiny_pipeline(**config)
        assert not pipe.diffusers_can_load()
        pipe.save_pretrained(tmp_path / name)
        index = read_json(tmp_path / name / "model_index.json")
        assert index["_class_name"] == ["pipeline_ddpm_hf", "DDPMPipeline"]
        assert index["scheduler"] == ["scheduling_ddpm_hf", "DDPMScheduler"]
        assert (tmp_path / name / "scheduler" / "scheduling_ddpm_hf.py").is_file()
        expected[name] = sample_np(pipe)
        assert np.isfinite(expected[name]).all()
    child = run_without_ddpm_hf(f"""
        import json, numpy, torch
        from diffusers import DDPMScheduler, DiffusionPipeline
        refused = {{}}
        for name in {list(WRONG_IN_DIFFUSERS)!r}:
            try:
                DiffusionPipeline.from_pretrained(name)
            except ValueError as err:
                assert "trust_remote_code" in str(err), err
            else:
                raise AssertionError("remote code was run without trust_remote_code=True")
            pipe = DiffusionPipeline.from_pretrained(name, trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=20,
                          output_type="np").images
            numpy.save(name + ".npy", images)
            theirs = DDPMScheduler.from_pretrained(name, subfolder="scheduler")
            try:
                out = theirs.step(torch.zeros(1, 1, 4, 4), 10, torch.zeros(1, 1, 4, 4),
                                  generator=torch.Generator().manual_seed(0)).prev_sample
                refused[name] = "NaN" if torch.isnan(out).any() else "sampled"
            except ValueError as err:
                refused[name] = str(err)
        json.dump(refused, open("refused.json", "w"))
    """, cwd=tmp_path)
    # diffusers scans remote code for imports and asks for the packages missing (diffusers < 0.36 refused to load):
    # the pipeline's file needs no ddpm_hf
    assert "might require the following packages" not in child.stderr, child.stderr
    refused = read_json(tmp_path / "refused.json")
    assert refused["fixed_large_log"] == "NaN"
    assert "prediction_type given as mean must be one of" in refused["mean"], refused["mean"]
    for name, config in WRONG_IN_DIFFUSERS.items():
        # diffusers' UNet2DModel runs the saved weights: its float32 output differs from ours by ~1e-5, which a mean
        # predictor's last step passes on undamped (an ε-predictor's is scaled by √β_1 = 0.01); a level is 4e-3
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), expected[name], rtol=0, atol=1e-4)
        # ddpm_hf reads it back into its own classes, without running the folder's code
        back = DDPMPipeline.from_pretrained(tmp_path / name)
        assert type(back.scheduler) is DDPMScheduler
        assert {k: back.scheduler.config[k] for k in config} == config
        back.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(sample_np(back), expected[name], rtol=0, atol=1e-6)


def test_from_pretrained_reads_diffusers_own_and_legacy_folders(tmp_path):
    pipe = tiny_pipeline(variance_type="fixed_large")
    twin = _diffusers_twin(pipe)
    twin.save_pretrained(tmp_path / "native")  # what diffusers itself writes
    loaded = DDPMPipeline.from_pretrained(tmp_path / "native")
    assert type(loaded.unet) is DDPMUNet and type(loaded.scheduler) is DDPMScheduler
    loaded.set_progress_bar_config(disable=True)
    expected = sample_np(pipe)
    np.testing.assert_allclose(sample_np(loaded), expected, rtol=0, atol=1e-5)

    # google/ddpm-cifar10-32's layout: pickle weights with the pre-0.14 attention key names
    legacy = tmp_path / "legacy"
    twin.save_pretrained(legacy)
    (legacy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = {}
    for key, value in twin.unet.state_dict().items():
        for new, old in renames.items():
            key = key.replace(new, old)
        state[key] = value
    torch.save(state, legacy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        DDPMPipeline.from_pretrained(legacy)
    loaded = DDPMPipeline.from_pretrained(legacy, allow_pickle=True)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(sample_np(loaded), expected, rtol=0, atol=1e-5)


def test_a_swapped_diffusers_scheduler_is_saved_as_what_it_is(tmp_path, caplog):
    """diffusers users swap schedulers (pipe.scheduler = DDIMScheduler.from_config(...)): the folder names the
    scheduler it holds (it was labelled DDPMScheduler, and diffusers loaded that), its card is written (the card
    read a variance_type DDIM has not: AttributeError), ddpm_hf says what it loads instead, and takes the scheduler
    passed to from_pretrained, as diffusers does. Oracle: diffusers' own loading and sampling of the same folder."""
    from pipelines.pipeline_ddpm_hf import model_card

    pipe = tiny_pipeline()
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "ddim")
    assert read_json(tmp_path / "ddim" / "model_index.json")["scheduler"] == ["diffusers", "DDIMScheduler"]
    theirs = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ddim")
    assert type(theirs.scheduler) is diffusers.DDIMScheduler
    assert "variance none (deterministic), prediction epsilon, sampled with DDIMScheduler" in model_card("a/b", pipe)
    with caplog.at_level("WARNING", logger="ddpm_hf"):
        back = DDPMPipeline.from_pretrained(tmp_path / "ddim")
    assert type(back.scheduler) is DDPMScheduler and "its scheduler is DDIMScheduler" in caplog.text
    given = diffusers.DDIMScheduler.from_pretrained(tmp_path / "ddim", subfolder="scheduler")
    ours = DDPMPipeline.from_pretrained(tmp_path / "ddim", scheduler=given)
    assert ours.scheduler is given
    theirs.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    expected = theirs(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10,
                      output_type="np").images
    got = ours(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="np").images
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_from_pretrained_takes_diffusers_dtype_arguments_and_refuses_other_pipelines(tmp_path):
    """dtype (diffusers' newer name of torch_dtype) and a dict of dtypes per component, as diffusers reads them (they
    were refused, or a dict ignored); a folder of another pipeline (a latent diffusion's vqvae beside its unet) is
    refused, where it loaded as a pixel-space DDPM; a folder without safetensors names allow_pickle."""
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    for kwargs in ({"dtype": torch.bfloat16}, {"dtype": {"unet": torch.bfloat16}},
                   {"dtype": {"default": torch.float16}}, {"torch_dtype": {"scheduler": torch.float16}}):
        theirs = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe", **kwargs).unet.dtype
        assert DDPMPipeline.from_pretrained(tmp_path / "pipe", **kwargs).unet.dtype == theirs
    with pytest.raises(ValueError, match="both dtype and torch_dtype"):
        DDPMPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.float16, torch_dtype=torch.float16)
    index = read_json(tmp_path / "pipe" / "model_index.json")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({**index, "vqvae": [None, None]}))
    DDPMPipeline.from_pretrained(tmp_path / "pipe")  # a component left empty is none
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({**index, "_class_name": "LDMPipeline",
                                                                    "vqvae": ["diffusers", "VQModel"]}))
    with pytest.raises(ValueError, match=r"\(LDMPipeline\) has the components \['vqvae'\] too: not a pixel-space "):
        DDPMPipeline.from_pretrained(tmp_path / "pipe")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    weights = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), weights.with_suffix(".bin"))
    weights.unlink()
    DDPMPipeline.from_pretrained(tmp_path / "pipe", allow_pickle=True)
    with pytest.raises(OSError):  # safetensors or nothing, as diffusers, whatever allow_pickle
        diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipe", use_safetensors=True)
    with pytest.raises(FileNotFoundError, match="no U-Net weights in safetensors"):
        DDPMPipeline.from_pretrained(tmp_path / "pipe", allow_pickle=True, use_safetensors=True)
    weights.with_suffix(".bin").unlink()
    with pytest.raises(FileNotFoundError, match="are looked for only with allow_pickle=True"):
        DDPMPipeline.from_pretrained(tmp_path / "pipe")


def test_progressive_generation():
    pipe = tiny_pipeline(num_train_timesteps=50)
    out = pipe.progressive(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=50,
                           num_snapshots=5, output_type="np")
    assert out.timesteps == [49, 37, 25, 12, 0]  # evenly spaced chain positions 0, 12, 24, 37, 49
    assert len(out.snapshots) == 5 and out.snapshots[0].shape == (2, 16, 16, 1)
    # At the last step μ̃ puts all weight on x̂_0, so the last snapshot is the sample itself.
    np.testing.assert_allclose(out.snapshots[-1], out.images, rtol=0, atol=1e-6)
    plain = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=50, output_type="np").images
    np.testing.assert_allclose(out.images, plain, rtol=0, atol=1e-6)
    assert out.grid.size == (5 * 16 + 6 * 2, 2 * 16 + 3 * 2)
    with pytest.raises(ValueError, match="not steps of the chain"):
        pipe.progressive(batch_size=1, num_inference_steps=10, snapshot_timesteps=[7])


def test_interpolation_through_the_latent():
    pipe = tiny_pipeline(num_train_timesteps=40)
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(1, 16, 16, generator=g) * 2 - 1, torch.rand(1, 16, 16, generator=g) * 2 - 1
    out = pipe.interpolate(a, b, lambdas=5, t=20, output_type="np")
    assert out.lambdas == [0.0, 0.25, 0.5, 0.75, 1.0] and out.images.shape == (5, 16, 16, 1)
    assert out.grid.size == (7 * 16 + 8 * 2, 16 + 2 * 2)
    # The encoding noise and the reverse noise are fixed across λ: each λ decodes as it would alone, and the
    # λ = 0 end depends on image_a only.
    alone = pipe.interpolate(a, b, lambdas=[0.75], t=20, output_type="np").images
    np.testing.assert_allclose(alone[0], out.images[3], rtol=0, atol=1e-6)
    other_b = pipe.interpolate(a, -b, lambdas=[0.0, 1.0], t=20, output_type="np").images
    np.testing.assert_allclose(other_b[0], out.images[0], rtol=0, atol=1e-6)
    assert np.abs(other_b[1] - out.images[4]).max() > 1e-2
    pil = Image.fromarray(((a[0].numpy() + 1) * 127.5).round().astype(np.uint8), "L")
    assert len(pipe.interpolate(pil, b, lambdas=2, t=5).images) == 2
    # uint8 pixels (as the data and the bound take them) are the images p / 127.5 - 1; pixels as floats are refused
    pixels_a = ((a + 1) * 127.5).round().to(torch.uint8)
    scaled = pipe.interpolate(pixels_a.float() / 127.5 - 1, b, lambdas=[0.0, 0.5], t=20, output_type="np").images
    np.testing.assert_array_equal(pipe.interpolate(pixels_a, b, lambdas=[0.0, 0.5], t=20, output_type="np").images,
                                  scaled)
    sixteen = Image.fromarray(pixels_a[0].numpy().astype(np.uint16) * 257)  # the same image in 16 bits (I;16)
    np.testing.assert_allclose(pipe.interpolate(sixteen, b, lambdas=[0.0, 0.5], t=20, output_type="np").images,
                               scaled, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"image_a has values in \[.*\]: the model takes \[-1, 1\]"):
        pipe.interpolate(pixels_a.float(), b, t=10)
    with pytest.raises(ValueError, match=r"\[0, 39\]"):
        pipe.interpolate(a, b, t=40)
    with pytest.raises(ValueError, match=r"shape \(1, 16, 16\)"):
        pipe.interpolate(torch.zeros(3, 16, 16), b, t=10)


def test_progressive_snapshots_are_the_x0_predictions_of_diffusers_chain():
    """Fig. 6 shows x̂_0 along the chain, not x_{t−1}. Oracle: the same network stepped by diffusers' DDPMScheduler
    with the same generator, its pred_original_sample at each kept step, as an image in [0, 1]."""
    pipe = tiny_pipeline(num_train_timesteps=50)
    out = pipe.progressive(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=50,
                           num_snapshots=5, output_type="np")
    reference = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    reference.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    x, x0_at = torch.randn(2, 1, 16, 16, generator=generator), {}
    with torch.no_grad():
        for t in reference.timesteps:
            step = reference.step(pipe.unet(x, t).sample, t, x, generator=generator)
            x0_at[int(t)] = (step.pred_original_sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
            x = step.prev_sample
    for t, snapshot in zip(out.timesteps, out.snapshots):
        np.testing.assert_allclose(snapshot, x0_at[t], rtol=0, atol=1e-5)


def test_interpolation_encodes_both_images_then_decodes_each_mix_from_t_as_diffusers_steps():
    """Fig. 8 (§4.3): x_t ~ q(x_t | x_0) and x'_t ~ q(x'_t | x'_0) with independent noise (drawn in that order from
    ``seed``), x̄_t = (1 − λ) x_t + λ x'_t, decoded by the reverse chain from t itself down to 0, one generator per
    λ seeded ``seed + 1``. Oracle: that recipe with diffusers' DDPMScheduler (add_noise, custom timesteps, step).
    The same image at both ends still decodes to two images (the encodings are independent)."""
    pipe = tiny_pipeline(num_train_timesteps=40)
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(1, 16, 16, generator=g) * 2 - 1, torch.rand(1, 16, 16, generator=g) * 2 - 1
    lambdas, t, seed = [0.0, 0.3, 1.0], 20, 5
    got = pipe.interpolate(a, b, lambdas=lambdas, t=t, seed=seed, output_type="np").images

    reference = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    encoder = torch.Generator().manual_seed(seed)
    noise_a, noise_b = torch.randn(1, 1, 16, 16, generator=encoder), torch.randn(1, 1, 16, 16, generator=encoder)
    at_t = torch.tensor([t])
    x_t, x_t_b = reference.add_noise(a[None], noise_a, at_t), reference.add_noise(b[None], noise_b, at_t)
    x = torch.cat([(1 - lam) * x_t + lam * x_t_b for lam in lambdas])
    reference.set_timesteps(timesteps=list(range(t, -1, -1)))
    generators = [torch.Generator().manual_seed(seed + 1) for _ in lambdas]
    with torch.no_grad():
        for step_t in reference.timesteps:
            x = reference.step(pipe.unet(x, step_t).sample, step_t, x, generator=generators).prev_sample
    np.testing.assert_allclose(got, (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-5)

    same = pipe.interpolate(a, a, lambdas=[0.0, 1.0], t=t, seed=seed, output_type="np").images
    assert np.abs(same[0] - same[1]).max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_network_samples_a_float32_chain(dtype):
    """The network may run in bf16/fp16; x_t stays float32. Oracle: a network whose output is exactly 0 in any
    dtype, so the half-precision pipeline must give the float32 pipeline's samples bit for bit, through __call__,
    progressive and interpolate (a chain kept in bf16 rounds x_t at every step and would not)."""
    pipe = tiny_pipeline(num_train_timesteps=1000)
    pipe.unet.conv_out.weight.data.zero_()
    pipe.unet.conv_out.bias.data.zero_()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def outputs():
        return [pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=40,
                     output_type="pt").images,
                pipe.progressive(batch_size=1, generator=torch.Generator().manual_seed(2), num_inference_steps=20,
                                 num_snapshots=3, output_type="pt").snapshots[1],
                pipe.interpolate(x[0], x[1], lambdas=2, t=30, output_type="pt").images]

    reference = outputs()
    pipe.unet.to(dtype)
    for half, full in zip(outputs(), reference):
        assert half.dtype == torch.float32 and torch.equal(half, full)


def test_a_bf16_network_samples_close_to_its_float32_self():
    """With a real (random) network the bf16 samples stay within a fraction of a uint8 level of the float32 ones
    on average over 100 steps (measured 0.16 levels; x_t kept in bf16 instead: 1.08, as diffusers' pipeline)."""
    pipe = tiny_pipeline(num_train_timesteps=1000)
    run = lambda: pipe(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=100,  # noqa: E731
                       output_type="pt").images
    reference = run()
    pipe.unet.bfloat16()
    levels = (run() - reference).abs() * 255
    assert 0 < levels.mean() < 0.5, levels.mean()


def test_bad_call_arguments():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="batch_size"):
        pipe(batch_size=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="jpg")
    with pytest.raises(ValueError, match="one per sample"):
        pipe(batch_size=3, generator=[torch.Generator(), torch.Generator()], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"\[1, 20\]"):
        pipe(num_inference_steps=1000)


def test_the_default_chain_is_the_models_full_chain():
    """A model of 20 diffusion steps samples its 20 by default (1000 would be refused), as the model card's usage
    code calls it; progressive generation too. The predictor the card names follows the prediction type."""
    from ddpm_hf.pipelines import model_card

    pipe = tiny_pipeline()
    steps = []
    pipe(callback_on_step_end=lambda p, i, t, kwargs: steps.append(int(t)) or {})
    assert steps == list(range(19, -1, -1))
    assert pipe.progressive(batch_size=1, num_snapshots=3).grid is not None
    assert "U-Net x₀-predictor" in model_card("a/b", tiny_pipeline(prediction_type="sample"))
    assert "U-Net v-predictor" in model_card("a/b", tiny_pipeline(prediction_type="v_prediction"))


def test_bad_folders_name_the_file(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "ok")

    def broken(name):
        folder = tmp_path / name
        pipe.save_pretrained(folder)
        return folder

    folder = broken("no_weights")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        DDPMPipeline.from_pretrained(folder)

    folder = broken("truncated")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        DDPMPipeline.from_pretrained(folder)

    folder = broken("wrong_shapes")
    state = {k: v for k, v in pipe.unet.state_dict().items()}
    state["conv_in.weight"] = torch.zeros(8, 1, 3, 3)
    save_file(state, folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        DDPMPipeline.from_pretrained(folder)

    folder = broken("missing_keys")
    state = {k: v for k, v in pipe.unet.state_dict().items() if not k.startswith("conv_out")}
    save_file(state, folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="conv_out"):
        DDPMPipeline.from_pretrained(folder)

    folder = broken("bad_json")
    (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="scheduler_config.json"):
        DDPMPipeline.from_pretrained(folder)

    folder = broken("bad_value")
    config = read_json(folder / "scheduler" / "scheduler_config.json")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(config, variance_type="huge")))
    with pytest.raises(ValueError, match="fixed_large"):
        DDPMPipeline.from_pretrained(folder)

    folder = broken("bad_unet_config")
    config = read_json(folder / "unet" / "config.json")
    (folder / "unet" / "config.json").write_text(json.dumps(dict(config, time_embedding_type="fourier")))
    with pytest.raises(ValueError, match="unet/config.json.*positional"):
        DDPMPipeline.from_pretrained(folder)

    folder = broken("no_index")
    (folder / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        DDPMPipeline.from_pretrained(folder)

    for name in ("../../etc/passwd", "/definitely/not/here", "a/b/c", "bad name"):
        with pytest.raises(ValueError, match="neither an existing folder nor a valid Hub repo id"):
            DDPMPipeline.from_pretrained(name)


def test_save_pretrained_refuses_what_would_write_a_folder_it_does_not_load(tmp_path):
    """diffusers' save_pretrained takes a weight variant and a shard size; ddpm_hf's loader reads one float32 file
    and refuses variants, so a variant saved was a folder ddpm_hf could not load, and a shard size was ignored
    without a word. Both are refused before anything is written; an argument it does not take is named."""
    pipe = tiny_pipeline()
    for kwargs, error, message in ((dict(variant="fp16"), ValueError, "variant='fp16'"),
                                   (dict(max_shard_size="10MB"), ValueError, "max_shard_size='10MB'"),
                                   (dict(push_to_hub=True), ValueError, "push_to_hub"),
                                   (dict(safe_serialisation=False), TypeError, "safe_serialisation")):
        with pytest.raises(error, match=message):
            pipe.save_pretrained(tmp_path / "refused", **kwargs)
        assert not (tmp_path / "refused").exists()
    pipe.save_pretrained(tmp_path / "saved", use_flashpack=False)  # diffusers' other arguments, at their defaults
    np.testing.assert_array_equal(sample_np(DDPMPipeline.from_pretrained(tmp_path / "saved")), sample_np(pipe))
