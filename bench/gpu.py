"""One prepared GPU check: every figure the GPU goals of the project need, one line each, in one run (≤ 8 minutes on one
H100). Run through bench/gpu.sh, which installs diffusers and datasets from wheels first (the GPU machine has no
network). Each part is timed against a deadline and skipped, saying so, when the time is up.

Lines printed (prefix "GPU"):
  unet train step  ours vs diffusers at ddpm-cifar10, batch 128, fp32 and bf16 autocast (time ratio), the two
                   upsampling formulations and the two activation layouts of ours on this device, and both networks
                   with cuDNN's algorithms timed (cudnn.benchmark, which train.py and `ddpm-hf evaluate` set);
  train.py         ~300 steps at ddpm-cifar10, batch 128, bf16, on synthetic 32² PNG parquet: images/s, data_wait,
                   model FLOP utilisation (FLOPs counted from the network by torch's FLOP counter, against the
                   measured bf16 matmul peak and the data-sheet peak), eager (contiguous and channels-last
                   activations; and with every update's outcome read at once, the host waiting for each step, as
                   before 2026-11-27 c), --compile, and compiled with CUDA graphs (accelerate's --dynamo_mode
                   reduce-overhead) in both layouts; fp16 for a few steps; last, when asked for or when time is
                   left, with inductor's autotuning of convolutions and matmuls (--dynamo_mode max-autotune);
  step anatomy     train.py's bf16 step, its pieces added one at a time to the bare U-Net step, and its kernels;
  data.py          decode throughput with 0, 4 and 8 workers against what the presets consume, and the time
                   next_batch takes the training loop when its batch is ready;
  sampling         --sampling_steps ancestral steps of 256 images as `ddpm-hf sample/evaluate` run them: fp32,
                   --dtype bf16, --compile, with CUDA graphs in both layouts, a larger batch, and with evaluate's
                   generator per image, on the host's threads and on one as under accelerate launch (images/s;
                   50,000-sample projection);
  bits/dim         256 images over all 1000 terms (seconds), eager and compiled.
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from data import write_dataset  # bench/data.py: the same synthetic CIFAR-like parquet shards

ROOT = Path(__file__).resolve().parents[1]
START = time.time()
# dense bf16 TFLOP/s of NVIDIA's data sheets, by what torch.cuda.get_device_name() says (first match): the NVL and
# PCIe cards run at lower clocks than the SXM modules (H100 80GB HBM3, H200)
DATA_SHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("NVL", 835.0), ("H100", 989.0), ("H200", 989.0))


def data_sheet_tflops(device_name: str):
    """(dense bf16 TFLOP/s of the data sheet, the entry used) for ``device_name``; (None, None) if none matches."""
    return next(((tflops, key) for key, tflops in DATA_SHEET_BF16_TFLOPS if key in device_name), (None, None))


def say(*parts):
    print("GPU", *parts, flush=True)


def left(deadline_s):
    return deadline_s - (time.time() - START)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(fn, repeats):
    fn(), fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    seconds = time_steps(lambda: a @ b, 10)
    return 2 * 8192 ** 3 / seconds / 1e12


def train_flops_per_image(preset: str) -> float:
    """Forward + backward FLOPs of one training image, counted by torch on the real network (batch 8)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm_hf import DDPMUNet
    from ddpm_hf.presets import unet_config

    config = unet_config(preset, dropout=0.0)
    model = DDPMUNet(**config).cuda()
    x = torch.randn(8, config["in_channels"], config["sample_size"], config["sample_size"], device="cuda")
    t = torch.randint(0, 1000, (8,), device="cuda")
    with FlopCounterMode(display=False) as counter:
        model(x, t).sample.square().mean().backward()
    return counter.get_total_flops() / 8


def unet_step_ratios(batch: int, preset: str = "ddpm-cifar10", device: str = "cuda", repeats: int = 20):
    from diffusers import UNet2DModel

    from ddpm_hf import DDPMUNet
    from ddpm_hf.presets import unet_config
    from ddpm_hf.unet import GroupNorm, Upsample

    config = unet_config(preset, dropout=0.0)
    torch.manual_seed(0)
    theirs = UNet2DModel(**config).to(device)
    ours = DDPMUNet(**config).to(device)
    ours.load_state_dict(theirs.state_dict())
    size, channels = config["sample_size"], config["in_channels"]
    x = torch.randn(batch, channels, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    target = torch.randn_like(x)
    for precision in ("fp32", "bf16"):
        def step(model, optimizer):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = torch.nn.functional.mse_loss(model(x, t).sample.float(), target)
            loss.backward()
            optimizer.step()

        opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for m in (ours, theirs)}
        results = {}
        for name, model in (("ours", ours), ("diffusers", theirs)):
            results[name] = time_steps(lambda: step(model, opts[model]), repeats)
        results["ours_phases"] = switched(Upsample, "phases_on", {"cpu", "cuda"},
                                          lambda: time_steps(lambda: step(ours, opts[ours]), repeats))
        results["ours_channels_last"] = switched(DDPMUNet, "channels_last_on", {"cpu", "cuda"},
                                                 lambda: time_steps(lambda: step(ours, opts[ours]), repeats))
        results["ours_bf16_norms"] = switched(GroupNorm, "autocast_dtype_on", {"cpu", "cuda"},
                                              lambda: time_steps(lambda: step(ours, opts[ours]), repeats))
        for name, model in (("ours", ours), ("diffusers", theirs)):  # as train.py and `ddpm-hf evaluate` set it
            results[f"{name}_cudnn_benchmark"] = switched(torch.backends.cudnn, "benchmark", True, lambda: time_steps(
                lambda: step(model, opts[model]), repeats))
        ours.to(memory_format=torch.channels_last)  # the convolutions' weights too (cuDNN converts them otherwise)
        try:
            optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)  # its state in the weights' layout
            results["ours_channels_last_weights"] = switched(
                DDPMUNet, "channels_last_on", {"cpu", "cuda"}, lambda: time_steps(lambda: step(ours, optimizer), repeats))
        finally:
            ours.to(memory_format=torch.contiguous_format)
        say(f"unet train step {preset} b{batch} {precision}: ours {1000 * results['ours']:.1f} ms, diffusers "
            f"{1000 * results['diffusers']:.1f} ms, ratio ours/diffusers {results['ours'] / results['diffusers']:.3f}; "
            f"ours with phase upsampling {1000 * results['ours_phases']:.1f} ms "
            f"(ratio phases/plain {results['ours_phases'] / results['ours']:.3f}); ours channels-last "
            f"{1000 * results['ours_channels_last']:.1f} ms (ratio channels-last/plain "
            f"{results['ours_channels_last'] / results['ours']:.3f}), with channels-last weights "
            f"{1000 * results['ours_channels_last_weights']:.1f} ms (ratio "
            f"{results['ours_channels_last_weights'] / results['ours']:.3f}); ours with its norms in the autocast "
            f"dtype {1000 * results['ours_bf16_norms']:.1f} ms (ratio {results['ours_bf16_norms'] / results['ours']:.3f}"
            f"; fp32 runs no autocast: the same step); with cudnn.benchmark: ours "
            f"{1000 * results['ours_cudnn_benchmark']:.1f} ms, diffusers {1000 * results['diffusers_cudnn_benchmark']:.1f}"
            f" ms (ratio benchmark/heuristic, ours {results['ours_cudnn_benchmark'] / results['ours']:.3f})")


def step_anatomy(preset: str = "ddpm-cifar10", batch: int = 128, repeats: int = 20, device: str = "cuda",
                 profile_rows: int = 12, data: Path = None, compile_options: Optional[dict] = None):
    """``compile_options``: torch.compile's, for the last stage (None: CUDA graphs, as `--dynamo_mode
    reduce-overhead`)."""
    compile_options = {"mode": "reduce-overhead"} if compile_options is None else compile_options
    switched(torch.backends.cudnn, "benchmark", True,  # as train.py sets it
             lambda: _step_anatomy(preset, batch, repeats, device, profile_rows, data, compile_options))


def _step_anatomy(preset, batch, repeats, device, profile_rows, data, compile_options):
    """Where train.py's bf16 step spends the time the bare U-Net step does not: the step timed as train.py's pieces
    are added one at a time (the preset's dropout, t and ε drawn and eq. 4, the loss, the gradient clipping, the
    EMA, the batch copied from pinned host memory; then the gradient norm's finiteness read at once, which waits for
    the device, as a logged step does; and with ``data`` the batches of a TrainStream over it instead, whose reader
    thread shares this process's interpreter with the step's kernel launches), then the kernels of the whole step
    by device time (torch.profiler); last the whole step with the U-Net compiled in place as train.py compiles it
    (``compile_options``), its time and kernels. Uses train.py's own functions."""
    from accelerate import Accelerator

    from ddpm_hf import DDPMScheduler, DDPMUNet
    from ddpm_hf.ema import EMA
    from ddpm_hf.images import to_model_range
    from ddpm_hf.losses import make_loss
    from ddpm_hf.presets import unet_config

    sys.path.insert(0, str(ROOT / "tests"))  # as bench/soak.py: the tests' helpers for training runs
    from runs import load_train_script

    train = load_train_script()
    accelerator = Accelerator(mixed_precision="bf16", cpu=device == "cpu")
    config = unet_config(preset)
    size, channels = config["sample_size"], config["in_channels"]
    torch.manual_seed(0)
    models = {dropout: accelerator.prepare(DDPMUNet(**dict(config, dropout=dropout)).to(device))
              for dropout in (0.0, config["dropout"])}
    models[0.0].load_state_dict(models[config["dropout"]].state_dict())
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device == "cuda") for k, m in models.items()}
    scheduler = DDPMScheduler()
    loss_fn = make_loss("simple", scheduler, channels, channels)
    loop = train.LoopState([0], batch, 0, torch.device(device))
    ema = EMA(models[config["dropout"]].parameters())
    host_batch = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)
    host_batch = host_batch.pin_memory() if device == "cuda" else host_batch
    x0 = to_model_range(host_batch.to(device))
    t_fixed = torch.randint(0, 1000, (batch,), device=device)
    noise_fixed = torch.randn_like(x0)

    stream = None
    if data is not None:
        from ddpm_hf.data import TrainStream, default_num_workers, load_image_dataset

        stream = TrainStream(load_image_dataset(str(data)), "image", size, channels, batch, 1, 0, 1, seed=0,
                             num_workers=default_num_workers(1), pin_memory=device == "cuda")

    def step(dropout, draw=False, clip=False, check=False, with_ema=False, copy=False, streamed=False):
        model, optimizer = models[dropout], optimizers[dropout]
        if streamed:
            x = to_model_range(stream.next_batch().to(device, non_blocking=True))
        else:
            x = to_model_range(host_batch.to(device, non_blocking=True)) if copy else x0
        if draw:
            t, noise = loop.draw(x, 1000)
            x_t = scheduler.add_noise(x, noise, t)
            loss = loss_fn(model(x_t, t).sample, x, x_t, t, noise).mean()
        else:
            loss = torch.nn.functional.mse_loss(model(x, t_fixed).sample.float(), noise_fixed)
        accelerator.backward(loss)
        if clip:
            norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
            if check:
                bool(torch.isfinite(norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if with_ema:
            ema.update(model.parameters())

    d = config["dropout"]
    whole = dict(dropout=d, draw=True, clip=True, with_ema=True, copy=True)  # train.py's step between logged steps
    # (label, options, the stage it adds to: the one before when None)
    stages = [("bare (dropout 0)", dict(dropout=0.0), None), (f"+ dropout {d}", dict(dropout=d), None),
              ("+ t, ε drawn, eq. 4, loss", dict(dropout=d, draw=True), None),
              ("+ gradient clipping", dict(dropout=d, draw=True, clip=True), None),
              ("+ EMA", dict(dropout=d, draw=True, clip=True, with_ema=True), None),
              ("+ batch from pinned host memory", whole, None),
              # what train.py did at every step before 2026-11-27 c, and still does at a logged step
              ("+ the finiteness check read at once (host sync)", dict(whole, check=True), None)]
    if stream is not None:
        stages.append((f"batches from a TrainStream ({stream.num_workers} workers) instead",
                       dict(whole, streamed=True), "+ batch from pinned host memory"))
        # The reader thread holds the interpreter lock while it runs Python; the step, back from a wait for the
        # device, may wait up to the switch interval (5 ms by default) to get it back.
        stages.append(("the same with a 0.5 ms interpreter switch interval", dict(whole, streamed=True, switch_s=5e-4),
                       None))
    # Timed in rounds, one step of each stage per round: a drift of the GPU's clocks over the minute this takes moves
    # every stage alike. (Timed one stage after the other on 2026-11-27 g, every stage from the batch copy on came out
    # about 10 ms slower than the one before it, far more than a 393 kB copy costs: unexplained.)
    parts, timed = [], {}
    default_switch_s = sys.getswitchinterval()
    runs = [(label, {k: v for k, v in options.items() if k != "switch_s"}, options.get("switch_s", default_switch_s))
            for label, options, _ in stages]
    samples = {label: [] for label, _, _ in runs}

    def timed_step(options, switch_s):
        sys.setswitchinterval(switch_s)
        sync()
        start = time.perf_counter()
        step(**options)
        sync()
        return time.perf_counter() - start

    try:
        for round_ in range(repeats + 2):  # the first two: warm-up, left out
            for label, options, switch_s in runs:
                if not options.get("streamed"):
                    seconds = timed_step(options, switch_s)
                    samples[label] += [seconds] if round_ >= 2 else []
        # The TrainStream's steps back to back, as train.py takes its batches: interleaved, its reader would refill
        # while the other stages run (and burden them), and every streamed step would find its batch ready.
        for label, options, switch_s in runs:
            if options.get("streamed"):
                samples[label] = [timed_step(options, switch_s) for _ in range(repeats + 2)][2:]
    finally:
        sys.setswitchinterval(default_switch_s)
        if stream is not None:
            stream.close()
    for label, _, base in stages:
        seconds = statistics.median(samples[label])
        reference = timed.get(base, list(timed.values())[-1] if timed else None)
        parts.append(f"{label} {1000 * seconds:.1f} ms" + ("" if reference is None else
                                                          f" ({1000 * (seconds - reference):+.1f})"))
        timed[label] = seconds
    say(f"step anatomy {preset} b{batch} bf16 (train.py's pieces added one by one, timed in {repeats} rounds of one "
        "step each): " + "; ".join(parts))

    from torch.profiler import ProfilerActivity, profile

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # the step's FLOPs by operator, for the convolutions' rate
        step(**whole)
    counted = counter.get_flop_counts()["Global"]
    convolution_flops = sum(n for op, n in counted.items() if "convolution" in str(op))

    def kernels(label):
        activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            for _ in range(5):
                step(**whole)
            sync()
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events) or 1
        say(f"step profile {preset} b{batch} bf16 {label}: {total / 5 / 1000:.2f} ms of kernels per step")
        for e in events[:profile_rows]:
            say(f"step profile {preset} b{batch} bf16 {label}: {100 * getattr(e, key) / total:5.1f} % "
                f"{getattr(e, key) / 5 / 1000:7.2f} ms/step  {e.count // 5:4d}×  {e.key[:90]}")
        families = dict.fromkeys([name for name, _ in KERNEL_FAMILIES] + ["other"], 0.0)
        for e in events:
            families[next((name for name, pattern in KERNEL_FAMILIES if re.search(pattern, e.key)), "other")] += \
                getattr(e, key) / 5 / 1e6  # seconds per step
        rate = convolution_flops / families["convolutions"] / 1e12 if families["convolutions"] else float("nan")
        shares = [f"{name} {100 * seconds * 5e6 / total:.1f} % ({1000 * seconds:.2f} ms)"
                  for name, seconds in families.items()]
        say(f"step kernels {preset} b{batch} bf16 {label}: " + "; ".join(shares)
            + f"; the convolutions' counted FLOPs at {rate:.0f} TFLOP/s in their kernels")

    kernels("eager")
    # The U-Net compiled in place, as train.py does when accelerate's dynamo settings ask (CUDA graphs by default
    # here: 4,665 images/s in train.py on 2026-11-27 g, 2.3× plain --compile): how far the step is from the GPU's
    # own time for it, and which kernels that time is (the next lever towards 30 % model FLOP utilisation)
    models[d].compile(**compile_options)
    seconds = time_steps(lambda: step(**whole), repeats)  # its first calls compile, then record the graphs
    say(f"step anatomy {preset} b{batch} bf16, the U-Net compiled ({compile_options}): {1000 * seconds:.1f} ms per "
        f"step, {batch / seconds:.0f} images/s (eager {1000 * timed['+ batch from pinned host memory']:.1f} ms)")
    kernels("compiled")


# Kernel families, by the names that cuDNN, cuBLAS, inductor's Triton and ATen give their kernels (the first match
# counts; the CPU's profile names ATen's operators): where a step's GPU time goes
KERNEL_FAMILIES = [("layout transposes", r"nchwToNhwc|nhwcToNchw"),
                   ("convolutions", r"(?i)conv|fprop|dgrad|wgrad|implicit_gemm"),
                   ("matmuls and attention", r"(?i)gemm|flash|fmha|sdpa|attention|cublas|cutlass|aten::(mm|bmm|addmm)"),
                   ("inductor's fused kernels", r"^triton_"),
                   ("group norms", r"(?i)group_norm|RowwiseMoments|ComputeInternalGradients|GammaBeta"),
                   ("copies and casts", r"(?i)copy|memcpy|memset|to_copy"),
                   ("other elementwise and reductions", r"(?i)elementwise|reduce|vectorized|aten::")]


def switched(cls, name: str, value, fn):
    """fn() with the class attribute ``name`` of ``cls`` set to ``value`` (a speed choice), restored afterwards."""
    saved = getattr(cls, name)
    setattr(cls, name, value)
    try:
        return fn()
    finally:
        setattr(cls, name, saved)


def switched_threads(threads: int, fn):
    """fn() with torch's intra-op threads set to ``threads``, restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


# train.py run by this wrapper: its threads' stacks go to its log on SIGUSR1 (sent before a timeout's kill, so a run
# that overstays says where it was), and bench-only speed choices (the U-Net's activation layout) set before it starts.
TRAIN_WRAPPER = """
import faulthandler, os, runpy, signal, sys
script = sys.argv[2]
sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python train.py` has it, not the cwd (whose ddpm_hf is
                                                        # the source tree's, without ddpm_hf.pipelines)
faulthandler.register(signal.SIGUSR1, all_threads=True)
if sys.argv[1] == "channels-last":
    from ddpm_hf import DDPMUNet
    DDPMUNet.channels_last_on = {"cpu", "cuda"}
sys.argv = sys.argv[2:]
if os.environ.get("BENCH_READ_AT_ONCE"):  # every update's outcome read at once, each step waiting for the GPU
    import importlib.util
    spec = importlib.util.spec_from_file_location("train", script)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    train.count_at_once = lambda args, step: True
    sys.exit(train.main(sys.argv[1:]))
runpy.run_path(script, run_name="__main__")
"""


def train_run(data: Path, out: Path, steps: int, extra, timeout, log: Path, layout: str = "default",
              env: Optional[dict] = None):
    """One train.py run at ddpm-cifar10, batch 128, with ``env`` added to its environment; its whole output goes to
    ``log`` as it is written (a run killed at the time limit keeps what it printed, and its stacks)."""
    cmd = [sys.executable, "-u", "-c", TRAIN_WRAPPER, layout, str(ROOT / "training" / "train.py"),
           "--preset", "ddpm-cifar10", "--dataset_name", str(data), "--train_batch_size", "128", "--max_train_steps", str(steps),
           "--checkpointing_steps", "0", "--num_sample_images", "1", "--ddpm_num_inference_steps", "2",
           "--logger", "none", "--logging_steps", "50", "--lr_warmup_steps", "10", "--output_dir", str(out), *extra]
    with open(log, "w") as sink:
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env=dict(os.environ, **(env or {})))
        try:
            returncode = process.wait(timeout=timeout)
        except BaseException as err:  # a timeout, or this script stopped: the run must not outlive it
            if isinstance(err, subprocess.TimeoutExpired):
                process.send_signal(signal.SIGUSR1)
                time.sleep(3)
            process.kill()
            process.wait()
            if not isinstance(err, subprocess.TimeoutExpired):
                raise
            raise RuntimeError(f"train.py overstayed {timeout:.0f} s; its stacks at the kill are at the end of {log}:\n"
                               + log.read_text()[-3000:])
    text = log.read_text()
    found = re.search(r"([\d.]+) images/s, data_wait ([\d.]+) % over ([\d.]+) s", text)
    if returncode or not found:
        raise RuntimeError(f"train.py exited {returncode}:\n{text[-3000:]}")
    overflow = re.search(r"(\d+) fp16 overflow steps", text)
    return float(found.group(1)), float(found.group(2)), float(found.group(3)), overflow and int(overflow.group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deadline_s", type=float, default=450, help="skip parts that would start after this")
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--sampling_steps", type=int, default=100,
                        help="steps of each sampling variant (projected to the 1000-step chain)")
    parser.add_argument("--only", nargs="*", default=None, help="run only the parts whose names start with these")
    parser.add_argument("--logs", type=Path, default=None,
                        help="folder for each train.py run's whole output (default: a temporary folder)")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "bench/gpu.py needs a CUDA GPU"
    import datasets
    import pyarrow

    say(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
        f"{os.cpu_count()} CPUs; datasets {datasets.__version__}, pyarrow {pyarrow.__version__}")
    peak = matmul_peak_tflops()
    flops = train_flops_per_image("ddpm-cifar10")
    sheet, entry = data_sheet_tflops(torch.cuda.get_device_name())
    say(f"bf16 matmul 8192³: {peak:.0f} TFLOP/s measured (data sheet: "
        f"{f'{sheet:.0f}, as {entry}' if sheet else 'none known for this device'}); ddpm-cifar10 training: "
        f"{flops / 1e9:.2f} GFLOP per image (forward + backward, counted)")

    parts = []  # (name, fn, seconds it needs at least), run below

    def part(name, fn, needs_s):
        parts.append((name, fn, needs_s))

    def run_parts():
        """The parts, in the order written below, or in --only's order: a deadline skips the last ones."""
        chosen = parts if args.only is None else [
            (name, fn, needs_s) for prefix in args.only for name, fn, needs_s in parts if name.startswith(prefix)]
        for name, fn, needs_s in dict.fromkeys(chosen):  # (a part named by two prefixes runs once)
            if left(args.deadline_s) < needs_s:
                say(f"{name}: skipped, {left(args.deadline_s):.0f} s left of the deadline")
                continue
            try:
                fn()
            except Exception as err:  # one failing part must not hide the others' figures
                say(f"{name}: FAILED {type(err).__name__}: {str(err)[-1500:]}")
            torch.cuda.empty_cache()  # the next part, in this process or another, gets the whole GPU

    tmp = Path(tempfile.mkdtemp())
    data = tmp / "cifar_like"

    def shards():  # the synthetic CIFAR-like shards, written by the first part that needs them (--only may skip "data")
        if not data.exists():  # (written aside and renamed: a part that failed writing them leaves none half made)
            shutil.rmtree(tmp / "cifar_like.partial", ignore_errors=True)
            os.replace(write_dataset(tmp / "cifar_like.partial", "png32", 20_000), data)
        return data

    logs = args.logs or tmp
    logs.mkdir(parents=True, exist_ok=True)

    def training(extra, label, steps, layout="default", env=None):
        # a run may overstay the deadline by a minute at most: the figures of the parts before it must get out
        img_s, wait, seconds, overflow = train_run(shards(), tmp / label, steps, extra,
                                                   timeout=max(60, left(args.deadline_s + 60)),
                                                   log=logs / f"train-{label}.log", layout=layout, env=env)
        mfu = img_s * flops / 1e12
        of_sheet = f" ({100 * mfu / sheet:.1f} % of data sheet)" if sheet else ""
        say(f"train.py {label} ddpm-cifar10 b128 {steps} steps: {img_s:.0f} images/s, data_wait {wait:.2f} %, "
            f"{mfu:.0f} TFLOP/s = MFU {100 * mfu / peak:.1f} % of measured peak{of_sheet}; 800k steps × 128 would "
            f"take {800_000 * 128 / img_s / 3600:.1f} h"
            + (f"; fp16 overflow steps {overflow}" if overflow is not None and "fp16" in label else ""))
        return img_s

    bf16 = ["--mixed_precision", "bf16", "--allow_tf32"]
    part("unet", lambda: unet_step_ratios(128), 30)
    part("data", shards, 30)
    part("anatomy", lambda: step_anatomy(data=shards()), 30)
    # In the order of what the goals need most, so that a deadline skips the least needed: the eager and compiled
    # steps first (model FLOP utilisation), sampling (the 50,000-sample projection), then the A/B runs of choices.
    part("train bf16", lambda: training(bf16, "bf16", args.train_steps), 60)
    # CUDA graphs: the step's ~1,000 kernel launches replayed as one (accelerate's --dynamo_mode, as a user sets it);
    # 2.3× plain --compile on 2026-11-27 g. Compiled, channels-last lets inductor fuse the norms without cuDNN's
    # layout transposes (11 % of the eager step's kernel time), which made the eager step slower.
    def inductor(mode):  # accelerate's dynamo settings, as `accelerate launch --dynamo_backend inductor` sets them
        return {"ACCELERATE_DYNAMO_BACKEND": "inductor", "ACCELERATE_DYNAMO_MODE": mode}

    reduce_overhead = inductor("reduce-overhead")
    part("train bf16 reduce-overhead", lambda: training(bf16, "bf16-reduce-overhead", args.train_steps,
                                                        env=reduce_overhead), 90)
    part("train bf16 channels-last reduce-overhead", lambda: training(
        bf16, "bf16-channels-last-reduce-overhead", args.train_steps, "channels-last", env=reduce_overhead), 90)
    # its 8 variants (5 compilations, about 60 s each on one H100), the last skipped at the deadline
    part("sampling", lambda: sampling(args.sampling_steps, deadline_s=args.deadline_s), 90)
    part("train bf16 compile", lambda: training(bf16 + ["--compile"], "bf16-compile", args.train_steps), 90)
    part("train bf16-channels-last", lambda: training(bf16, "bf16-channels-last", args.train_steps, "channels-last"),
         60)
    # The host reading every update's outcome at once, so waiting for each step (before 2026-11-27 c train.py waited
    # for the gradient norm, just before the update): beside the first run, what reading it one step later gains
    part("train bf16-read-at-once", lambda: training(bf16, "bf16-read-at-once", args.train_steps,
                                                     env={"BENCH_READ_AT_ONCE": "1"}), 60)
    part("train fp16", lambda: training(["--mixed_precision", "fp16"], "fp16", 100), 40)
    part("checkpoint", lambda: checkpoint_cost(tmp, timeout=max(30, left(args.deadline_s + 30))), 30)
    part("decode", lambda: decode_rates(timeout=max(30, left(args.deadline_s + 30))), 40)
    part("bits/dim", lambda: bits(compiled=False), 45)
    part("bits/dim compiled", lambda: bits(compiled=True), 60)
    # inductor's autotuning of the convolutions and matmuls (its Triton templates against cuDNN's and cuBLAS's
    # kernels), with CUDA graphs: the next lever on model FLOP utilisation once the launches are gone; minutes of
    # compilation, so last, run when asked for (--only "train bf16 max-autotune") or when time is left
    part("train bf16 max-autotune", lambda: training(bf16, "bf16-max-autotune", args.train_steps,
                                                     env=inductor("max-autotune")), 240)
    run_parts()
    say(f"done in {time.time() - START:.0f} s")


def bench_script(name: str, args: List[str], timeout: float):
    """bench/``name`` run on this machine, each line of its figures said (its stderr holds progress bars)."""
    def figures(stdout):
        for line in (stdout.decode() if isinstance(stdout, bytes) else stdout or "").strip().splitlines():
            say(f"{name}:", line)

    try:
        result = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True,
                                timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as err:  # the figures printed before the limit still count
        figures(err.stdout)
        raise
    if result.returncode:
        raise RuntimeError(f"bench/{name} exited {result.returncode}:\n{result.stderr[-2000:]}")
    figures(result.stdout)


def checkpoint_cost(folder: Path, timeout: float, preset: str = "ddpm-cifar10"):
    """bench/checkpoint.py on this machine's disk: the time a checkpoint holds the training loop, published in the
    background and in the loop (the state copied from the GPU in both)."""
    bench_script("checkpoint.py", ["--preset", preset, "--repeats", "3", "--output_dir", str(folder)], timeout)


def decode_rates(timeout: float):
    """bench/data.py on this machine: decode throughput per worker count against what the presets consume."""
    bench_script("data.py", ["--device", "cuda", "--workers", "0", "4", "8", "--seconds", "3", "--step_s", "0.1",
                             "--handoffs", "10"], timeout)


def sampling(steps: int = 1000, batch: int = 256, device: str = "cuda", backend: str = "inductor",
             deadline_s: Optional[float] = None):
    """``steps`` ancestral steps of ``batch`` images per variant, projected to 50,000 samples of the full 1000-step
    chain, each network prepared as ``ddpm-hf sample/evaluate --dtype/--compile`` prepare it (the reverse chain in
    float32): fp32 (TF32 matmuls), bf16, compiled, compiled with CUDA graphs (mode reduce-overhead) with contiguous
    and with channels-last activations and weights, the faster of the two at 2× the batch, and that one drawing its
    noise as ``ddpm-hf evaluate`` does for FID (a generator per image, so the set does not depend on the batching). Each
    variant runs a 2-step chain first (cuDNN's algorithm timing, compilation, the recording of CUDA graphs).
    ``backend``: torch.compile's; None runs the "compiled" variants uncompiled (the CPU test of this script, which
    checks its flow: compiling is tested with the sampling commands). A variant is skipped, said, with under 75 s
    left of ``deadline_s`` (a compilation takes about a minute), an eager one under 20 s.

    Every network is compiled for its one batch size (``dynamic=False``): torch keeps its record of the shapes seen
    per code object, not per network, so the 2× batch's network, all of them running DDPMUNet.forward, would
    otherwise be compiled for any batch size (dynamic shapes, slower: 2026-11-27 g's batch 1024 was), as would the
    variant on one host thread (the thread count is in dynamo's guards: it is compiled again, for its own size)."""
    from torch._dynamo.utils import counters

    from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet
    from ddpm_hf.evaluation import generate_uint8, prepare_sampling
    from ddpm_hf.presets import unet_config

    config = unet_config("ddpm-cifar10" if device == "cuda" else "tiny-16")
    rates, unets = {}, {}

    def variant(label, dtype="fp32", channels_last=False, compiled=None, size=batch, per_image=False):
        """``compiled``: torch.compile's options (None: eager)."""
        if deadline_s is not None and left(deadline_s) < (75 if compiled is not None else 20):
            say(f"sampling, {label}: skipped, {left(deadline_s):.0f} s left of the deadline")
            return
        skips = counters["inductor"]["cudagraph_skips"]  # graphs compiled without CUDA graphs (one per graph)
        # variants with the same options and batch share one network
        key = (dtype, channels_last, str(compiled), size)
        layouts = {"cpu", "cuda"} if channels_last else DDPMUNet.channels_last_on
        if key not in unets:
            unets[key] = DDPMUNet(**config).to(device).eval()
            if channels_last:
                unets[key].to(memory_format=torch.channels_last)
            options = (None if compiled is None or backend is None
                       else dict(compiled, backend=backend, dynamic=False))
            # compiled in the layout it is timed in: another would fail dynamo's guards and compile it again
            switched(DDPMUNet, "channels_last_on", layouts, lambda: prepare_sampling(
                DDPMPipeline(unet=unets[key], scheduler=DDPMScheduler()), dtype, options, size,
                "--compile" if not compiled else f"accelerate's dynamo settings ({backend})"))
        pipe = DDPMPipeline(unet=unets[key], scheduler=DDPMScheduler())
        pipe.set_progress_bar_config(disable=True)

        def run():
            if per_image:
                generate_uint8(pipe, size, size, steps, seed=0)
            else:
                pipe(batch_size=size, num_inference_steps=steps, output_type="np",
                     generator=torch.Generator().manual_seed(0))

        def timed():
            pipe(batch_size=size, num_inference_steps=2, output_type="np")  # left out, in the same layout
            sync()
            start = time.perf_counter()
            run()
            sync()
            return time.perf_counter() - start

        per_image_step = switched(DDPMUNet, "channels_last_on", layouts, timed) / (size * steps)
        skips = counters["inductor"]["cudagraph_skips"] - skips
        rates[label] = 1 / per_image_step / 1000  # images/s of the 1000-step chain
        say(f"sampling {steps} steps × {size} images, {label}: {rates[label]:.1f} images/s of the 1000-step chain; "
            f"50,000 samples projected {50_000 * 1000 * per_image_step / 60:.1f} min on one GPU"
            + (f"; graphs compiled without CUDA graphs: {skips}" if "reduce-overhead" in str(compiled) else ""))

    def variants():
        # in the order of what the 50,000-sample goal needs most, so that a deadline skips the least needed
        variant("fp32/tf32")
        variant("--dtype bf16", "bf16")
        # CUDA graphs: a chain's 1000 calls each replay the network's kernels as one launch (accelerate's
        # --dynamo_mode reduce-overhead, which ddpm-hf sample/evaluate read as train.py does); 37.4 min projected on
        # 2026-11-27 g, the fastest. Compiled, the layout is inductor's to use: eager channels-last was 2 % slower.
        graphs = "--dtype bf16 --compile, CUDA graphs (--dynamo_mode reduce-overhead)"
        reduce_overhead = {"mode": "reduce-overhead"}
        variant(graphs, "bf16", compiled=reduce_overhead)
        variant(f"{graphs}, channels-last", "bf16", True, reduce_overhead)
        layout = rates.get(f"{graphs}, channels-last", 0) > rates.get(graphs, 0)
        best = f"{graphs}{', channels-last' if layout else ''}"
        variant(f"{best}, a generator per image as evaluate draws them", "bf16", layout, reduce_overhead,
                per_image=True)
        # `accelerate launch` sets OMP_NUM_THREADS=1 in every process it starts, GPU ones included: evaluate's
        # per-image noise is then drawn on one host thread (see ddpm_hf.scheduler._draw_rows)
        switched_threads(1, lambda: variant(
            f"{best}, a generator per image on one host thread, as under accelerate launch", "bf16", layout,
            reduce_overhead, per_image=True))
        variant(f"{best}, batch {2 * batch}", "bf16", layout, reduce_overhead, 2 * batch)
        variant("--dtype bf16 --compile", "bf16", compiled={})

    # as `ddpm-hf evaluate` sets cuDNN, and TF32 matmuls (--allow_tf32 in training)
    switched(torch.backends.cudnn, "benchmark", True, lambda: switched(
        torch.backends.cudnn, "allow_tf32", True, lambda: switched(
            torch.backends.cuda.matmul, "allow_tf32", True, variants)))


def bits(compiled: bool):
    from ddpm_hf import DDPMScheduler, DDPMUNet
    from ddpm_hf.likelihood import bits_per_dim
    from ddpm_hf.presets import unet_config

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    unet = DDPMUNet(**unet_config("ddpm-cifar10")).cuda().eval()
    if compiled:
        unet.compile()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (256, 3, 32, 32), dtype=np.uint8)).cuda()
    sync()
    start = time.perf_counter()
    result = bits_per_dim(unet, DDPMScheduler(), images, batch_size=256, progress=False)
    sync()
    say(f"bits/dim 256 images × 1000 terms {'compiled' if compiled else 'eager'} (tf32): "
        f"{time.perf_counter() - start:.1f} s (includes compilation) , mean {float(result.mean):.3f}")


if __name__ == "__main__":
    main()
