"""train.py's mathematics against independent oracles: one training step against diffusers' example loop (same
weights, batch, t and ε), the warm-up learning rate against its formula, each preset's recipe against the paper's
numbers (Ho et al. 2020, §4 and Appendix B)."""

import json
import math
import re

import numpy as np
import pytest
import torch

from runs import FAST, load_train_script, train_in_process, write_images

train = load_train_script()


def _args(*flags):
    return train.parse_args(["--preset", "tiny-16", "--dropout", "0.0", *flags])


def test_one_training_step_equals_the_diffusers_example_loop():
    """The loss and the gradients of train.py's step (our U-Net, our scheduler's eq. 4, L_simple) equal those of
    diffusers' train_unconditional.py step (UNet2DModel, diffusers.DDPMScheduler.add_noise, F.mse_loss) on the same
    weights, batch, t and ε; so does the AdamW update."""
    from diffusers import DDPMScheduler as DiffusersScheduler
    from diffusers import UNet2DModel

    args = _args("--learning_rate", "1e-3", "--lr_warmup_steps", "0")
    torch.manual_seed(0)
    ours, resolution = train.build_model(args)
    theirs = UNet2DModel(**ours.config)
    theirs.load_state_dict(ours.state_dict())
    scheduler = train.DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, variance_type=args.variance_type)
    loss_fn = train.make_loss(args.loss, scheduler, ours.config.out_channels, ours.config.in_channels)

    x0 = torch.rand(6, 1, resolution, resolution) * 2 - 1
    loop = train.LoopState([0, 1], 3, seed=0, device=torch.device("cpu"))
    t, noise = loop.draw(x0, args.ddpm_num_steps)
    assert t.min() >= 0 and t.max() < args.ddpm_num_steps

    loss = loss_fn(ours(scheduler.add_noise(x0, noise, t), t).sample, x0, None, t, noise).mean()
    loss.backward()
    reference = DiffusersScheduler(num_train_timesteps=1000, beta_schedule="linear")
    noisy = reference.add_noise(x0, noise, t)
    their_loss = torch.nn.functional.mse_loss(theirs(noisy, t).sample.float(), noise.float())
    their_loss.backward()
    assert loss.item() == pytest.approx(their_loss.item(), rel=1e-5)
    their_params = dict(theirs.named_parameters())
    assert their_params.keys() == dict(ours.named_parameters()).keys()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, their_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)

    # Adam's first update is lr · g / (|g| + eps): gradients equal to float rounding can still flip where g ≈ 0, so
    # the update is compared from the same gradients (the optimizer's settings are what is under test here).
    for name, p in ours.named_parameters():
        their_params[name].grad = p.grad.clone()
    optimizer, _ = train.make_optimizer(args, ours, torch.device("cpu"))
    their_optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    optimizer.step()
    their_optimizer.step()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, their_params[name], rtol=0, atol=0, msg=name)


def test_the_warmup_learning_rate_follows_its_formula():
    """constant_with_warmup: lr · min(1, n / W) after n optimizer steps (the paper's linear warm-up)."""
    args = _args("--learning_rate", "2e-4", "--lr_warmup_steps", "8")
    model, _ = train.build_model(args)
    optimizer, lr_scheduler = train.make_optimizer(args, model, torch.device("cpu"))
    for n in range(0, 12):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 * min(1.0, n / 8), rel=1e-12, abs=1e-15), n
        optimizer.step()
        lr_scheduler.step()


@pytest.mark.parametrize("schedule", ["linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_the_decaying_learning_rates_follow_their_formulas(schedule):
    """diffusers' schedules by their names (as its example's --lr_scheduler takes them): after a linear warm-up of W
    steps, the fraction f = (n − W) / (N − W) of the decay gives lr · (1 − f) (linear; polynomial of power 1 decays
    to 1e-7), lr · (1 + cos(π f)) / 2 (cosine; with restarts, one cycle: the same)."""
    args = _args("--learning_rate", "2e-4", "--lr_warmup_steps", "4", "--max_train_steps", "20",
                 "--lr_scheduler", schedule)
    model, _ = train.build_model(args)
    optimizer, lr_scheduler = train.make_optimizer(args, model, torch.device("cpu"))
    for n in range(0, 21):
        f = max(0.0, (n - 4) / 16)
        decay = {"linear": 1 - f, "cosine": (1 + math.cos(math.pi * f)) / 2,
                 "cosine_with_restarts": (1 + math.cos(math.pi * (f % 1.0 if f < 1 else 1.0))) / 2,
                 "polynomial": 1 - f + f * 1e-7 / 2e-4}[schedule]
        expected = 2e-4 * (n / 4 if n < 4 else decay)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-12), (schedule, n)
        optimizer.step()
        lr_scheduler.step()


@pytest.mark.parametrize("flags", [["--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "3"],
                                   ["--lr_scheduler", "polynomial", "--lr_power", "2"]])
def test_the_schedules_cycles_and_power_are_taken(flags):
    """--lr_num_cycles and --lr_power, as diffusers' training examples take them: k hard restarts,
    lr · (1 + cos(π ((k f) mod 1))) / 2, and a decay of power p to 1e-7, (lr − 1e-7) (1 − f)^p + 1e-7."""
    args = _args("--learning_rate", "2e-4", "--lr_warmup_steps", "4", "--max_train_steps", "20", *flags)
    model, _ = train.build_model(args)
    optimizer, lr_scheduler = train.make_optimizer(args, model, torch.device("cpu"))
    for n in range(0, 20):
        f = (n - 4) / 16  # (after the warm-up of 4)
        expected = 2e-4 * n / 4 if n < 4 else ((2e-4 - 1e-7) * (1 - f) ** 2 + 1e-7 if "--lr_power" in flags
                                               else 2e-4 * (1 + math.cos(math.pi * ((3 * f) % 1.0))) / 2)
        assert lr_scheduler.get_last_lr()[0] == pytest.approx(expected, rel=1e-9, abs=1e-12), (flags, n)
        optimizer.step()
        lr_scheduler.step()


@pytest.mark.parametrize("preset, parameters, lr, batch, dropout", [
    ("ddpm-cifar10", 35_746_307, 2e-4, 128, 0.1),
    ("ddpm-256", 113_673_219, 2e-5, 64, 0.0),
])
def test_each_paper_preset_carries_the_paper_recipe(preset, parameters, lr, batch, dropout):
    """§4 and Appendix B: Adam 2e-4 (2e-5 at 256²), linear warm-up of 5000 steps, batch 128 (64 at 256²), gradient
    clipping at 1, EMA 0.9999, random horizontal flips, β_t linear 1e-4 → 0.02 over T = 1000, fixed σ_t² = β_t,
    L_simple, 800k steps at CIFAR-10; dropout 0.1 at CIFAR-10. Parameter counts: 35.7 M and 114 M."""
    args = train.parse_args(["--preset", preset])
    assert (args.learning_rate, args.train_batch_size, args.lr_warmup_steps) == (lr, batch, 5000)
    assert (args.max_grad_norm, args.ema_max_decay, args.random_flip) == (1.0, 0.9999, True)
    assert (args.ddpm_num_steps, args.ddpm_beta_schedule, args.variance_type) == (1000, "linear", "fixed_large")
    assert (args.loss, args.prediction_type, args.lr_scheduler) == ("simple", "epsilon", "constant_with_warmup")
    assert (args.adam_beta1, args.adam_beta2, args.adam_weight_decay) == (0.9, 0.999, 0.0)
    if preset == "ddpm-cifar10":
        assert args.max_train_steps == 800_000
    with torch.device("meta"):  # counts without allocating 114 M weights
        model, _ = train.build_model(args)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model.config.dropout == dropout
    scheduler = train.DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule)
    torch.testing.assert_close(scheduler.betas.double(), torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64),
                               rtol=0, atol=1e-8)  # float32 rounding of the betas


def test_the_draw_of_t_and_noise_is_algorithm_1():
    """t ~ Uniform({1, ..., T}) (0-based here: 0 … T−1, each about equally often) and ε ~ N(0, I), per data stream
    from the stream's own generator: the same stream gives the same draws in any process."""
    loop = train.LoopState([0, 1], 10_000, seed=0, device=torch.device("cpu"))
    x0 = torch.zeros(20_000, 1, 2, 2)
    t, noise = loop.draw(x0, 10)
    counts = torch.bincount(t, minlength=10)
    assert len(counts) == 10 and counts.min() > 1_800 and counts.max() < 2_200  # 2,000 ± 4.7 σ
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01
    alone = train.LoopState([1], 10_000, seed=0, device=torch.device("cpu"))  # stream 1 served by another process
    t1, noise1 = alone.draw(x0[:10_000], 10)
    assert torch.equal(t1, t[10_000:]) and torch.equal(noise1, noise[10_000:])
    # no other (seed, stream) draws these: seeded seed · 1009 + stream, seed 1's stream 0 drew seed 0's stream 1009,
    # and seed 0's stream 0 the very numbers of torch.manual_seed(0), which initialised the weights
    first = lambda seed, stream: train.LoopState([stream], 4, seed, torch.device("cpu")).draw(x0[:4], 10)[1]  # noqa
    assert not torch.equal(first(1, 0), first(0, 1009))
    weights_generator = torch.Generator().manual_seed(0)
    torch.rand(4, generator=weights_generator, dtype=torch.float64)  # where draw() takes its t from
    assert not torch.equal(first(0, 0), torch.randn(x0[:4].shape, generator=weights_generator))


def test_dropout_masks_differ_between_processes_and_come_back_after_a_resume():
    """Every process seeds torch's generator alike (the same initial weights): the masks of its batches must still be
    its own, and a resume must draw the same masks as the uninterrupted run, though a sample grid drew from that
    generator at the checkpoint (accelerate restores the generator as it was before). Oracle: nn.Dropout's masks."""
    dropout, x0, ones = torch.nn.Dropout(0.5), torch.zeros(2, 1, 2, 2), torch.ones(4096)

    def masks(loop, batches, grid_after=None, state_after=None):
        drawn, state = [], None
        for batch in range(batches):
            loop.draw(x0, 10)
            drawn.append(dropout(ones) > 0)
            if batch == grid_after:
                torch.rand(10_000)  # what sampling a grid draws
            if batch == state_after:
                state = loop.state_dict()
        return drawn, state

    per_process = []
    for process in (0, 1):
        torch.manual_seed(0)  # accelerate's set_seed, on every process
        per_process.append(masks(train.LoopState([process], 1, 0, torch.device("cpu"), process=process), 3)[0])
    assert all(0.45 < m.float().mean() < 0.55 for m in per_process[0])
    assert all(not torch.equal(a, b) for a, b in zip(*per_process))
    assert not torch.equal(per_process[0][0], per_process[0][1])  # and other for each batch

    torch.manual_seed(0)
    straight, state = masks(train.LoopState([0], 1, 0, torch.device("cpu")), 3, grid_after=0, state_after=0)
    resumed = train.LoopState([0], 1, 0, torch.device("cpu"))
    resumed.load_state_dict(state)
    torch.manual_seed(0)  # the generator as a resume finds it: not as the straight run left it
    assert all(torch.equal(a, b) for a, b in zip(masks(resumed, 2)[0], straight[1:]))


def test_a_run_reaches_its_min_snr_weights_and_records_gamma(tmp_path, capsys):
    """A real run (2 steps, ≈5 s) with γ = 1e-6: every Min-SNR weight of ε prediction is γ / SNR(t) ≤ 1e-6 here
    (SNR ≥ 1.5 on this 50-step schedule), so the progress bar's loss reads 0.0000 when --snr_gamma reaches the
    loss, and about 1 when it does not. training_config.json keeps γ."""
    data = write_images(tmp_path / "data", count=16, shards=1)
    out = tmp_path / "out"
    train_in_process(train, FAST + ["--max_train_steps", "2", "--checkpointing_steps", "0", "--dataloader_num_workers",
                                    "0", "--num_sample_images", "1", "--snr_gamma", "1e-6", "--dataset_name", str(data),
                                    "--output_dir", str(out)])
    assert json.loads((out / "training_config.json").read_text())["snr_gamma"] == 1e-6
    shown = re.findall(r"loss=([0-9.]+)", capsys.readouterr().err)
    assert shown and set(shown) == {"0.0000"}, shown


@pytest.mark.parametrize("prediction_type", ["epsilon", "mean"])
def test_the_true_bound_trains_the_mean_and_the_learned_variance(prediction_type):
    """Table 2's "L, learned diagonal Σ" rows: --loss vlb with --variance_type learned sends the bound's gradient
    through both halves of the output, the mean's and the log-variance's (no stop-gradient, unlike the hybrid loss),
    so one optimizer step moves the output convolution's rows of both halves. The hybrid loss with the L_simple part
    removed (its bound alone) leaves the mean's rows untouched: the check tells the two apart."""
    def output_rows_after_one_step(loss_name):
        args = _args("--variance_type", "learned", "--loss", loss_name, "--prediction_type", prediction_type,
                     "--learning_rate", "1e-3", "--lr_warmup_steps", "0")
        torch.manual_seed(0)
        model, resolution = train.build_model(args)
        assert model.config.out_channels == 2 * model.config.in_channels
        torch.nn.init.normal_(model.conv_out.weight, std=1e-3)  # the original init zeroes it: no gradient below it
        scheduler = train.DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, variance_type="learned",
                                        prediction_type=prediction_type)
        loss_fn = train.make_loss(loss_name, scheduler, model.config.out_channels, model.config.in_channels)
        x0 = torch.rand(4, 1, resolution, resolution, generator=torch.Generator().manual_seed(1)) * 2 - 1
        t = torch.tensor([0, 3, 20, 49])
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
        x_t = scheduler.add_noise(x0, noise, t)
        before = model.conv_out.weight.detach().clone()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        per_example = loss_fn(model(x_t, t).sample, x0, x_t, t, noise)
        if loss_name == "hybrid":  # its bound part only
            per_example = per_example - loss_fn.simple(model(x_t, t).sample, x0, x_t, t, noise)
        per_example.mean().backward()
        optimizer.step()
        moved = (model.conv_out.weight.detach() - before).abs().flatten(1).sum(1)  # per output channel
        return moved[:1], moved[1:]

    mean_rows, variance_rows = output_rows_after_one_step("vlb")
    assert mean_rows.min() > 0 and variance_rows.min() > 0
    mean_rows, variance_rows = output_rows_after_one_step("hybrid")
    assert float(mean_rows.max()) == 0 and variance_rows.min() > 0


def test_training_starts_from_a_pretrained_pipelines_unet(tmp_path, capsys, caplog):
    """--pretrained_model_name_or_path (diffusers' examples' name): the U-Net's config and weights come from a
    pipeline folder, ddpm_hf's or diffusers' own (the oracle: the weights saved there), over --preset; --dropout and
    --resolution still apply; what cannot start from it stops before training, naming the flag."""
    import diffusers

    from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet
    from ddpm_hf.presets import unet_config

    torch.manual_seed(5)
    ours = DDPMUNet(**unet_config("tiny-16", dropout=0.1))
    DDPMPipeline(unet=ours, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ours")
    theirs = diffusers.UNet2DModel(**unet_config("tiny-16", attention_head_dim=8))
    diffusers.DDPMPipeline(unet=theirs, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "theirs")
    for folder, source in (("ours", ours), ("theirs", theirs)):
        args = train.parse_args(["--preset", "small-28", "--pretrained_model_name_or_path", str(tmp_path / folder)])
        model, resolution = train.build_model(args)
        assert resolution == 16 and model.config.attention_head_dim == source.config.attention_head_dim
        assert all(torch.equal(value, source.state_dict()[key]) for key, value in model.state_dict().items())
    args = train.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "ours"), "--dropout", "0.3",
                             "--resolution", "32"])
    model, resolution = train.build_model(args)
    assert (model.config.dropout, resolution) == (0.3, 32)
    assert all(torch.equal(value, ours.state_dict()[key]) for key, value in model.state_dict().items())
    for flags, words in ((["--variance_type", "learned_range", "--loss", "hybrid"], "the U-Net predicts 2 channels"),
                         (["--pretrained_model_name_or_path", str(tmp_path / "none")], "neither an existing folder")):
        argv = ["--pretrained_model_name_or_path", str(tmp_path / "ours"), *flags]
        with pytest.raises(SystemExit, match=words):
            train.build_model(train.parse_args(argv))
    for flags, words in ((["--model_config", str(tmp_path / "ours" / "unet" / "config.json")], "drop --model_config"),
                         (["--original_init"], "--original_init initialises"),):
        with pytest.raises(SystemExit):
            train.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "ours"), *flags])
        assert words in capsys.readouterr().err
    # a learned-variance model (2C outputs) with a fixed variance, and the reverse, stop naming --variance_type
    learned = DDPMUNet(**unet_config("tiny-16", out_channels=2))
    DDPMPipeline(unet=learned, scheduler=DDPMScheduler(variance_type="learned_range")).save_pretrained(tmp_path / "2c")
    with pytest.raises(SystemExit, match="--variance_type fixed_large: the U-Net predicts 1 channels, .*'s 2"):
        train.build_model(train.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "2c")]))
    # its scheduler is not the flags' diffusion: said, and the flags' is trained
    caplog.clear()
    with caplog.at_level("WARNING"):
        train.build_model(train.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "2c"), "--variance_type",
                                            "learned_range", "--loss", "hybrid", "--ddpm_num_steps", "500"]))
    said = [r.getMessage() for r in caplog.records if "another diffusion" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("the flags': --ddpm_num_steps 500 (its 1000); training goes on with "
                                               "the flags' (pass its own to continue its diffusion)"), said
    # pickle weights (the google/ddpm-* repos' layout) only with --allow_pickle
    pickled = tmp_path / "pickled"
    DDPMPipeline(unet=ours, scheduler=DDPMScheduler()).save_pretrained(pickled)
    torch.save(ours.state_dict(), pickled / "unet" / "diffusion_pytorch_model.bin")
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SystemExit, match="allow_pickle"):
        train.build_model(train.parse_args(["--pretrained_model_name_or_path", str(pickled)]))
    model, _ = train.build_model(train.parse_args(["--pretrained_model_name_or_path", str(pickled), "--allow_pickle"]))
    assert all(torch.equal(value, ours.state_dict()[key]) for key, value in model.state_dict().items())
    # a model card names a local folder by its name only, as it does a local dataset
    card = train.card_config(train.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "ours")]))
    assert card["pretrained_model_name_or_path"] == "local folder ours"
    with pytest.raises(SystemExit):
        train.parse_args(["--revision", "main"])
    assert "--revision is about --pretrained_model_name_or_path, which is not given" in capsys.readouterr().err


def test_a_run_from_a_pretrained_unet_trains_from_its_weights(tmp_path):
    """The flag through a whole run: one step with a learning rate that leaves the weights in place but for Adam's
    first step (at most the rate per weight), so the saved weights are the pretrained ones within it."""
    from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet
    from ddpm_hf.presets import unet_config

    torch.manual_seed(7)
    source = DDPMUNet(**unet_config("tiny-16"))
    DDPMPipeline(unet=source, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pretrained")
    images = write_images(tmp_path / "images", count=16, shards=2, size=16)
    argv = [a for a in FAST if a not in ("--ema_max_decay", "0.9")]
    train_in_process(train, argv + ["--dataset_name", str(images), "--max_train_steps", "1", "--no-use_ema",
                                    "--learning_rate", "1e-6", "--lr_warmup_steps", "0", "--output_dir",
                                    str(tmp_path / "run"), "--pretrained_model_name_or_path",
                                    str(tmp_path / "pretrained")])
    trained = DDPMUNet.from_pretrained(tmp_path / "run" / "unet")
    moved = max((value - source.state_dict()[key]).abs().max().item() for key, value in trained.state_dict().items())
    assert 0 < moved <= 1.2e-6  # Adam's first step moves a weight by the rate at most (+ float32 rounding near 1)


def test_no_two_seeds_of_the_library_are_the_same():
    """ddpm_hf.seeds promises that no two uses, indices or user seeds share a stream. Brute force over seeds 0..3,
    indices 0..23, processes 0..2 and the resumes' from_step: every image, noise and dropout seed is distinct. (A
    dropout tag equal to the noise's would make process 0's masks reuse a noise stream: SeedSequence pads its words
    with zeros.)"""
    from ddpm_hf.seeds import dropout_seed, image_seed, noise_seed

    drawn = {}
    for seed in range(4):
        for index in range(24):
            drawn["image", seed, index] = image_seed(seed, index)
            for from_step in (0, 1, 2, 7, 100):
                drawn["noise", seed, index, from_step] = noise_seed(seed, index, from_step)
            for process in range(3):
                drawn["dropout", seed, process, index] = dropout_seed(seed, process, index)
    assert len(set(drawn.values())) == len(drawn)


@pytest.mark.parametrize("num_train_timesteps", [1000, 10, 7, 1])
def test_the_logged_quarters_hold_the_timesteps_of_their_quarter(num_train_timesteps):
    """loss_sums puts a loss at t in quarter q where q·T/4 ≤ t < (q + 1)·T/4 (float comparison here, numpy), for
    every t of 0..T − 1, T a multiple of 4 or not; the sums and counts per quarter as numpy makes them."""
    T = num_train_timesteps
    t = np.arange(T)
    losses = np.random.default_rng(T).random(T) + 0.5
    sums = train.loss_sums(torch.tensor(losses, dtype=torch.float32), torch.tensor(t), T).numpy()
    for q in range(4):
        inside = (t >= q * T / 4) & (t < (q + 1) * T / 4)
        assert sums[4 + q] == inside.sum(), (q, sums)
        assert sums[q] == pytest.approx(losses[inside].sum(), rel=1e-5, abs=1e-6), q


def test_images_per_second_and_the_data_wait_are_those_of_the_clock(monkeypatch):
    """Throughput against a clock the test sets: per logging interval, images over seconds and the wait's share;
    the summary over all intervals but the first (start-up), in closed form: 160 images and 1.5 s of wait over 10 s
    after the first interval."""
    import types

    clock = [100.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    speed = train.Throughput()
    speed.waited(2.0, 100)
    clock[0] += 10
    assert speed.interval() == {"images_per_s": 10.0, "data_wait": 0.2}
    speed.waited(1.0, 40)
    speed.waited(0.5, 20)
    clock[0] += 5
    assert speed.interval() == {"images_per_s": 12.0, "data_wait": 0.3}
    speed.waited(0.0, 30)
    clock[0] += 5
    assert speed.interval() == {"images_per_s": 6.0, "data_wait": 0.0}
    assert speed.summary().startswith("9.0 images/s, data_wait 15.00 % over 10.0 s")


@pytest.mark.parametrize("logging_steps,checkpointing_steps,push,push_checkpoints,last",
                         [(3, 4, True, False, 10), (3, 4, True, True, 10), (1, 0, False, False, 5),
                          (7, 5, True, False, 12)])
def test_what_is_due_after_each_step_is_the_flags_rule(logging_steps, checkpointing_steps, push, push_checkpoints,
                                                        last):
    """due_after against its rule written out here, step by step: logs every --logging_steps and at the last step;
    checkpoints every --checkpointing_steps and at the last step, where checkpointing is on; an upload at the end,
    and at each checkpoint only with --push_checkpoints."""
    import types

    args = types.SimpleNamespace(max_train_steps=last, logging_steps=logging_steps,
                                 checkpointing_steps=checkpointing_steps, save_images_steps=0, eval_steps=0,
                                 push_to_hub=push, push_checkpoints=push_checkpoints)
    for step in range(1, last + 1):
        due = train.due_after(args, step)
        at_checkpoint = bool(checkpointing_steps) and step % checkpointing_steps == 0
        assert due.log == (step % logging_steps == 0 or step == last), step
        assert due.checkpoint == (at_checkpoint or (bool(checkpointing_steps) and step == last)), step
        assert due.push == (push and (step == last or (push_checkpoints and at_checkpoint))), step


@pytest.mark.parametrize("resumed_at", [0, 3])
def test_a_resume_under_other_optimiser_flags_runs_their_schedule_from_its_step(resumed_at):
    """take_the_flags_optimizer_settings on a checkpoint's optimiser and schedule (1e-3, β1 0.9) under other flags
    (3e-4, β1 0.8), warm-up 8: at each of the next 10 steps the rate is 3e-4 · min(1, k / 8) (the closed form of a
    linear warm-up) and the betas are the flags'. Resumed in the warm-up, at step 0 and at step 3."""
    warmup = ["--lr_warmup_steps", "8", "--lr_scheduler", "constant_with_warmup", "--max_train_steps", "100"]
    saved = _args("--learning_rate", "1e-3", *warmup)
    flags = _args("--learning_rate", "3e-4", "--adam_beta1", "0.8", *warmup)
    optimizer, schedule = train.make_optimizer(saved, torch.nn.Linear(2, 2), torch.device("cpu"))
    for _ in range(resumed_at):
        optimizer.step()
        schedule.step()
    train.take_the_flags_optimizer_settings(flags, optimizer, schedule, say=False)
    for k in range(resumed_at, resumed_at + 10):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-4 * min(1.0, k / 8), rel=1e-12, abs=1e-15), k
        assert optimizer.param_groups[0]["betas"] == (0.8, 0.999)
        optimizer.step()
        schedule.step()


def test_latest_resumes_the_checkpoint_of_the_highest_step(tmp_path, caplog):
    """--resume_from_checkpoint latest among checkpoint-2 ... checkpoint-10: the one of step 10 (by the number: by
    name, checkpoint-8 sorts last). An exact resume from an older one ends on the same weights, so the resume tests
    cannot see which was taken: the run says it."""
    import logging

    images = write_images(tmp_path / "images", count=16, shards=2, size=16)
    base = FAST + ["--dataset_name", str(images), "--output_dir", str(tmp_path / "run"), "--checkpointing_steps", "2"]
    train_in_process(train, base + ["--max_train_steps", "10"])
    with caplog.at_level(logging.INFO, logger="ddpm_hf.train"):
        train_in_process(train, base + ["--max_train_steps", "11", "--resume_from_checkpoint", "latest"])
    assert f"resumed from {tmp_path / 'run' / 'checkpoint-10'} at step 10" in caplog.text, caplog.text[-2000:]


def test_two_micro_batches_make_the_update_that_their_batch_makes(tmp_path, monkeypatch):
    """--gradient_accumulation_steps 2 with batches of 4 is, update for update, the run with batches of 8 and no
    accumulation (the oracle; accelerate's and diffusers' meaning): the loss divided by the 2 micro-steps, the
    gradient clipped once, on the update's sum, the learning-rate schedule, its warm-up and the EMA stepped once per
    update, and the logged gradient norm the update's. The stream gives both runs the same examples in the same order
    (their --record_example_ids); for both to draw the same t and ε for an example, the draw is made a function of
    the example's pixels (tiny-16 has no dropout)."""
    import hashlib

    from safetensors.torch import load_file

    from ddpm_hf import DDPMUNet
    from runs import FAST_LOGGED, final_weights, logged_scalars

    def draw(self, x0, num_train_timesteps):
        generators = [torch.Generator().manual_seed(int(hashlib.sha256(x.numpy().tobytes()).hexdigest()[:15], 16))
                      for x in x0]
        t = torch.cat([torch.randint(num_train_timesteps, (1,), generator=g) for g in generators])
        return t, torch.stack([torch.randn(x.shape, generator=g) for x, g in zip(x0, generators)])

    monkeypatch.setattr(train.LoopState, "draw", draw)
    images = write_images(tmp_path / "images", count=64, shards=2, size=16)
    argv = FAST_LOGGED + [
        "--dataset_name", str(images), "--max_train_steps", "6", "--logging_steps", "1", "--checkpointing_steps",
        "6", "--lr_scheduler", "linear", "--lr_warmup_steps", "2", "--learning_rate", "1e-3", "--max_grad_norm",
        "0.05", "--ema_max_decay", "0.5", "--dataloader_num_workers", "0", "--record_example_ids"]
    runs = {"accumulated": ["--train_batch_size", "4", "--gradient_accumulation_steps", "2"],
            "one batch": ["--train_batch_size", "8"]}
    logged = {}
    for name, flags in runs.items():
        out = tmp_path / name
        train_in_process(train, argv + flags + ["--output_dir", str(out)])
        logged[name] = {tag: list(logged_scalars(out / "logs", tag).items())
                        for tag in ("loss", "grad_norm", "lr", "ema_decay")}
    accumulated, one = (tmp_path / name for name in runs)
    assert ((accumulated / "logs" / "example_ids_rank0.txt").read_text() ==
            (one / "logs" / "example_ids_rank0.txt").read_text())
    for tag, values in logged["one batch"].items():
        assert [step for step, _ in values] == [1, 2, 3, 4, 5, 6], tag
        assert [v for _, v in logged["accumulated"][tag]] == pytest.approx([v for _, v in values], rel=1e-4), tag
    assert min(v for _, v in logged["one batch"]["grad_norm"]) > 0.05  # every update clipped: the clip is tested
    for weights in (final_weights, lambda run: load_file(run / "checkpoint-6" / "model.safetensors")):  # EMA, trained
        ours, oracle = weights(accumulated), weights(one)
        for key in oracle:
            torch.testing.assert_close(ours[key], oracle[key], rtol=1e-4, atol=1e-6)
    # the pipeline holds the EMA's weights, after its 6 updates (the checkpoint's EMA state: the fourth state
    # train.py registers with accelerate, after the schedule's, the stream's and the loop's)
    ema = torch.load(one / "checkpoint-6" / "custom_checkpoint_3.pkl", weights_only=False)
    pipeline_unet = list(DDPMUNet.from_pretrained(one / "unet").parameters())
    assert ema["num_updates"] == 6 and len(ema["shadow"]) == len(pipeline_unet)
    for weight, average in zip(pipeline_unet, ema["shadow"]):
        torch.testing.assert_close(weight, average, rtol=0, atol=0)


def test_the_data_wait_logged_is_the_time_the_loop_waited_for_its_batches(tmp_path, monkeypatch):
    """`data_wait` is the fraction of each logging interval that the loop spent getting its batch. Every batch
    comes 50 ms late here (a slow stream), so each logged step's wait, data_wait × the interval's seconds (its
    images / images_per_s), is at least those 50 ms, and at most the interval."""
    import time

    from ddpm_hf.data import TrainStream
    from runs import FAST_LOGGED, logged_scalars

    real_next_batch = TrainStream.next_batch

    def late_next_batch(self):
        time.sleep(0.05)
        return real_next_batch(self)

    monkeypatch.setattr(TrainStream, "next_batch", late_next_batch)
    images, out = write_images(tmp_path / "images", count=32, shards=2, size=16), tmp_path / "run"
    train_in_process(train, FAST_LOGGED + [
        "--dataset_name", str(images), "--max_train_steps", "4", "--logging_steps", "1", "--checkpointing_steps", "0",
        "--dataloader_num_workers", "0", "--output_dir", str(out)])
    waits, speeds = (logged_scalars(out / "logs", tag) for tag in ("data_wait", "images_per_s"))
    assert list(waits) == list(speeds) == [1, 2, 3, 4]
    for step, wait in waits.items():
        seconds = 4 / speeds[step]  # a batch of 4 images per step
        assert 0.05 <= wait * seconds <= seconds, (step, wait, seconds)


def test_an_update_clips_the_gradients_l2_norm_and_says_the_norm_before():
    """optimizer_step clips the gradient to --max_grad_norm in its L2 norm over all the weights (clip_grad_norm_, as
    diffusers' example does) and hands back the norm before clipping, which is logged. Closed form: SGD with a rate
    of 1 moves the weights by g · min(1, c / ‖g‖₂); here ‖g‖₂ = 13 (‖g‖∞ = 12) and c = 1.3."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(cpu=True)
        layer = torch.nn.Linear(3, 2)
        model, optimizer = accelerator.prepare(layer, torch.optim.SGD(layer.parameters(), lr=1.0))
        before = [p.detach().clone() for p in model.parameters()]
        grads = [torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]), torch.tensor([0.0, 12.0])]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        update = train.optimizer_step(accelerator, model, optimizer, torch.tensor(1.0), 1.3)
        assert update.finite() and float(update.grad_norm) == pytest.approx(13.0, rel=1e-6)
        for p, b, g in zip(model.parameters(), before, grads):
            torch.testing.assert_close(b - p.detach(), g / 10)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
