"""bench/gpu.py, the prepared GPU check, run part by part on the CPU with the smallest network: a GPU is lent to few
sessions, and a part that fails there for a reason the CPU can show (a renamed function, a wrong argument) loses its
figures for that session. The CPU's timings mean nothing; what is checked is that every part runs, prints its line,
and leaves the speed switches it flips as it found them."""

import importlib
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_on_the_cpu(tmp_path, monkeypatch, capsys):
    from ddpm_hf import DDPMUNet
    from ddpm_hf.unet import GroupNorm, Upsample

    from accelerate.state import AcceleratorState

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    for name in ("gpu", "data"):  # bench's modules under top-level names: gone again after the test
        monkeypatch.delitem(sys.modules, name, raising=False)
    gpu = importlib.import_module("gpu")
    switches = lambda: (set(DDPMUNet.channels_last_on), set(Upsample.phases_on),  # noqa: E731
                        set(GroupNorm.autocast_dtype_on), torch.backends.cudnn.benchmark,
                        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                        sys.getswitchinterval(), torch.get_num_threads())
    before = switches()
    gpu.write_dataset(tmp_path / "shards", "png32", 64, shards=2)
    gpu.unet_step_ratios(2, "tiny-16", "cpu", repeats=1)
    AcceleratorState._reset_state(reset_partial_state=True)  # the anatomy's Accelerator is bf16, any other's is not
    try:
        gpu.step_anatomy("tiny-16", 4, 1, "cpu", profile_rows=3, data=tmp_path / "shards",
                         compile_options={"backend": "eager"})  # (inductor's compile time is not what this checks)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    gpu.sampling(2, 2, "cpu", backend=None)
    gpu.checkpoint_cost(tmp_path, timeout=300, preset="tiny-16")
    out = capsys.readouterr().out
    number = r"[\d.]+"
    assert re.search(rf"GPU checkpoint.py: loop blocked: {number} s published in the background, {number} s "
                     rf"published in the loop; ratio {number}; every checkpoint holds the weights of its step",
                     out), out
    for precision in ("fp32", "bf16"):
        assert re.search(rf"GPU unet train step tiny-16 b2 {precision}: ours {number} ms, diffusers {number} ms, ratio "
                         rf"ours/diffusers {number}; .*with cudnn.benchmark: ours {number} ms", out), out
    anatomy = re.search(r"GPU step anatomy tiny-16 b4 bf16 \(.*\): (.*)", out)
    assert anatomy and len(anatomy.group(1).split("; ")) == 9, out  # 7 pieces, the TrainStream's batches, and
    # those with a shorter switch interval
    for label in ("eager", "compiled"):
        assert len(re.findall(rf"GPU step profile tiny-16 b4 bf16 {label}: ", out)) == 4, out  # the total, 3 kernels
        families = re.search(rf"GPU step kernels tiny-16 b4 bf16 {label}: (.*); the convolutions' counted FLOPs at "
                             rf"{number} TFLOP/s in their kernels", out)
        shares = [float(share) for share in re.findall(rf"({number}) % \({number} ms\)", families.group(1))]
        assert len(shares) == 8 and shares[1] > 0 and abs(sum(shares) - 100) < 0.5, out  # every kernel in one family
    assert re.search(rf"GPU step anatomy tiny-16 b4 bf16, the U-Net compiled \(.*\): {number} ms per step, "
                     rf"{number} images/s \(eager {number} ms\)", out), out
    assert len(re.findall(rf"GPU sampling 2 steps × [24] images, .*: {number} images/s of the 1000-step chain; 50,000 "
                          rf"samples projected {number} min", out)) == 8, out  # 6 networks (one for the 2× batch), and
    # the per-image generators of evaluate, on the host's threads and on one (as under accelerate launch)
    assert re.search(r"\(--dynamo_mode reduce-overhead\): .* graphs compiled without CUDA graphs: \d+\n", out), out
    assert switches() == before


def test_the_read_at_once_run_replaces_what_train_py_calls(monkeypatch):
    """gpu.py's "train bf16-read-at-once" run replaces train.py's ``count_at_once`` (the one decision of the late
    counting) in the module it runs: a rename or a changed signature in train.py would break that run on a lent GPU
    only, where the late counting exists (fused AdamW). Oracle: train.py itself, loaded as that run loads it."""
    import inspect

    from runs import load_train_script

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.delitem(sys.modules, "gpu", raising=False)
    gpu = importlib.import_module("gpu")
    train = load_train_script()
    replaced = re.findall(r"train\.(\w+) = lambda (\w+), (\w+): True", gpu.TRAIN_WRAPPER)
    assert replaced == [("count_at_once", "args", "step")]
    assert list(inspect.signature(train.count_at_once).parameters) == ["args", "step"]
    assert "count_at_once(args, loop.step + 1)" in inspect.getsource(train.run)  # (main runs it) looked up when called


def test_every_sampling_network_is_compiled_for_its_one_batch_size(monkeypatch, capsys):
    """torch keeps its record of the shapes it has seen per code object, not per network: the sampling part's network
    for the 2× batch (another DDPMUNet, the same forward) was compiled for any batch size, dynamic shapes being
    slower, and so was the variant on one host thread; its figures were not what `ddpm-hf sample` gets. Oracle:
    dynamo's own graphs, handed to a backend that looks for symbolic sizes among their inputs."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    for name in ("gpu", "data"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    gpu = importlib.import_module("gpu")
    dynamic = []

    def backend(graph, example_inputs, **options):
        values = [node.meta.get("example_value") for node in graph.graph.nodes if node.op == "placeholder"]
        dynamic.append(any(isinstance(v, torch.SymInt) or isinstance(v, torch.Tensor)
                           and any(isinstance(size, torch.SymInt) for size in v.shape) for v in values))
        return graph.forward

    torch._dynamo.reset()
    try:
        gpu.sampling(2, 2, "cpu", backend=backend)
    finally:
        torch._dynamo.reset()
    assert dynamic == [False] * 5, dynamic  # CUDA graphs in both layouts, one host thread, 2× batch, --compile
    assert len(re.findall(r"GPU sampling 2 steps", capsys.readouterr().out)) == 8
    # with under 75 s left of its deadline, the compiled variants are skipped, said; the eager ones still run
    gpu.sampling(2, 2, "cpu", backend=None, deadline_s=time.time() - gpu.START + 50)
    out = capsys.readouterr().out
    skipped = re.findall(r": skipped, \d+ s left", out)
    assert len(re.findall(r"GPU sampling 2 steps", out)) == 2 and len(skipped) == 6, out
