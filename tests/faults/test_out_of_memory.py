"""Running out of memory, for real: this process's address space is limited (RLIMIT_AS, as `ulimit -v` does) to what
it holds plus a little, and allocations beyond it fail in torch's CPU allocator as a GPU's would in CUDA's. A training
step that does not fit stops the run with the flags that make it fit and the checkpoint to resume from; a sample
grid that does not fit is skipped and training goes on; no room for the EMA copy stops the run after its checkpoint;
sampling names --batch_size; and a probe that runs out of memory is not reported as a compiler or dtype failure."""

import gc
import hashlib
import json
import resource
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from helpers import tiny_pipeline
from runs import FAST, check_checkpoints, write_images

from ddpm_hf import compiling
from ddpm_hf.cli import main as cli
from ddpm_hf.errors import is_out_of_memory

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads the address space's size in /proc")

ROOM = 2 * 2**30  # beyond what the process holds: a tiny-16 step at 16² needs far less, one at 2048² far more


def _virtual_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


@pytest.fixture
def on_the_host(monkeypatch):
    """Training on the CPU even where a GPU is (the limit is on host memory)."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")


@contextmanager
def address_space(room: int = ROOM):
    """This process may map at most ``room`` bytes more than it has mapped now, until the block ends. Garbage is
    collected first and not during the block: a collection inside it would free memory an earlier test's traceback
    held, room the block did not mean to give."""
    gc.collect()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _virtual_size() + room
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip(f"the address space is limited to {hard} bytes here already")
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_grid_that_does_not_fit_is_skipped_and_a_step_that_does_not_fit_names_the_fix(tmp_path, train_here,
                                                                                          caplog, on_the_host):
    data, out = write_images(tmp_path / "data", count=64, shards=4), tmp_path / "run"
    args = FAST + ["--dataset_name", str(data), "--checkpointing_steps", "2", "--output_dir", str(out)]

    # 100,000 sample images: the grid's first network call does not fit; training goes on, the pipeline is saved
    with address_space(), caplog.at_level("WARNING", logger="ddpm_hf.train"):
        train_here(args + ["--max_train_steps", "3", "--num_sample_images", "100000", "--save_images_steps", "2"])
    skipped = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(skipped) == 2, caplog.text  # the grid of step 2 and the final one
    for step, message in zip((2, 3), skipped):
        assert f"making the sample grid of step {step}" in message and "skipped, training goes on" in message
        assert "lower --num_sample_images (100000)" in message and "(ulimit -v)" in message
    assert check_checkpoints(out) == ["checkpoint-2", "checkpoint-3"]
    assert (out / "model_index.json").exists() and not list(out.glob("samples/*.png"))
    before = _digest(out / "checkpoint-3")

    # the step itself at 2048²: it stops with the flags that make it fit and the checkpoint to resume from
    with address_space(), pytest.raises(SystemExit) as stopped:
        train_here(args + ["--max_train_steps", "5", "--resume_from_checkpoint", "latest", "--resolution", "2048"])
    message = str(stopped.value.code)
    assert message.startswith("out of memory on cpu in training step 4, 4 images of 1×2048×2048 per process ("), message
    assert "can't allocate memory" in message and "(ulimit -v)" in message
    assert "lower --train_batch_size (raising --gradient_accumulation_steps keeps the batch)" in message
    assert "add --gradient_checkpointing" in message
    assert message.endswith("checkpoint-3 is intact: resume from it with --resume_from_checkpoint latest.")
    assert check_checkpoints(out) == ["checkpoint-2", "checkpoint-3"] and _digest(out / "checkpoint-3") == before

    # and with room again, the run goes on from there
    train_here(args + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    assert check_checkpoints(out)[-1] == "checkpoint-4"


def test_no_room_for_the_ema_copy_stops_the_run_after_its_checkpoint(tmp_path, train_here, on_the_host):
    """After a step, the main process copies the network with the EMA weights for the step's outputs (a grid, the
    final pipeline). On a GPU that training fills, the copy may not fit: the run stops saying so, with the fix, and
    the checkpoint of that step, written before the copy, intact to resume from. Here the copy's allocations really
    fail: the address space is closed while it is made, in a process of its own (tests/faults/no_room_for_ema.py)
    where the copy's weights (the paper's CIFAR-10 network) are mapped anew, not taken from memory freed before."""
    import ctypes
    import subprocess

    from runs import child_env

    from ddpm_hf.presets import unet_config

    if not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("needs glibc's mallopt to map large allocations anew")
    data, out = write_images(tmp_path / "data", count=64, shards=4), tmp_path / "run"
    config = tmp_path / "unet.json"  # for the grey 16² test images
    config.write_text(json.dumps(unet_config("ddpm-cifar10", in_channels=1, out_channels=1, sample_size=16)))
    args = FAST + ["--model_config", str(config), "--train_batch_size", "2", "--dataset_name", str(data),
                   "--checkpointing_steps", "2", "--save_images_steps", "2", "--output_dir", str(out)]
    stopped = subprocess.run([sys.executable, str(Path(__file__).with_name("no_room_for_ema.py")), *args,
                              "--dataloader_num_workers", "0", "--max_train_steps", "3"],
                             env=child_env(ACCELERATE_USE_CPU="1"), capture_output=True,
                             text=True, timeout=600)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    said = stopped.stderr.rfind("out of memory on cpu making the outputs of step 2, a copy of the network with the "
                                "EMA weights (")
    assert said >= 0, stopped.stderr[-3000:]
    message = stopped.stderr[said:]  # SystemExit's message, the end of the output
    assert "lower --train_batch_size or add --gradient_checkpointing" in message
    assert "checkpoint-2 is intact: resume from it with --resume_from_checkpoint latest" in message
    assert check_checkpoints(out) == ["checkpoint-2"] and not (out / "model_index.json").exists()
    before = _digest(out / "checkpoint-2")

    train_here(args + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"])  # with room, it goes on
    assert check_checkpoints(out) == ["checkpoint-2", "checkpoint-3"] and (out / "model_index.json").exists()
    assert _digest(out / "checkpoint-2") == before


@pytest.mark.parametrize("check", ["dtype", "compile"])
def test_a_sample_batch_that_does_not_fit_names_the_batch_size_not_the_check(tmp_path, monkeypatch, check):
    folder = tmp_path / "pipe"
    tiny_pipeline(num_train_timesteps=10).save_pretrained(folder)
    # --dtype bf16 and --compile check the network with one call at the batch size first: that call runs out of memory
    if check == "compile":
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "eager")  # torch.compile without code generation: fast
    flags = ["--dtype", "bf16"] if check == "dtype" else ["--compile"]
    with address_space(), pytest.raises(SystemExit) as stopped:
        cli(["sample", str(folder), "--num_images", "1000000", "--batch_size", "1000000", *flags,
             "--out", str(tmp_path / "out")])
    message = str(stopped.value.code)
    assert message.startswith("ddpm-hf sample: error: out of memory on cpu with batches of 1000000 images ("), message
    assert "lower --batch_size" in message and "--dtype" not in message and "torch.compile" not in message
    assert not list((tmp_path / "out").glob("*.png"))


def test_a_probe_that_runs_out_of_memory_is_not_called_a_compiler_failure():
    unet = torch.nn.Linear(2, 2)

    def probe():
        torch.empty(ROOM * 4, dtype=torch.uint8)  # four times the room: fails in torch's allocator

    with address_space(), pytest.raises(RuntimeError) as failed:
        compiling.compile_checked(unet, probe, {"backend": "eager"}, compiling.COMPILE_FLAG, "train")
    assert is_out_of_memory(failed.value) and "torch.compile" not in str(failed.value)
    assert unet._compiled_call_impl is None  # left uncompiled, as after a compiler failure

    def broken():
        raise RuntimeError("a compiler failure")

    with pytest.raises(RuntimeError, match="--compile: torch.compile of the U-Net failed"):  # the contrast
        compiling.compile_checked(unet, broken, {"backend": "eager"}, compiling.COMPILE_FLAG, "train")


def test_a_compiled_step_that_does_not_fit_names_the_fix_not_the_compiler(tmp_path, train_here, monkeypatch,
                                                                           on_the_host):
    data = write_images(tmp_path / "data", count=16, shards=4)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "eager")  # torch.compile without code generation: seconds
    with address_space(), pytest.raises(SystemExit) as stopped:
        train_here(FAST + ["--dataset_name", str(data), "--max_train_steps", "2", "--resolution", "2048",
                           "--output_dir", str(tmp_path / "run")])
    message = str(stopped.value.code)
    assert message.startswith("out of memory on cpu in the check of the compiled U-Net (one training step), 4 images "
                              "of 1×2048×2048 per process ("), message
    assert "lower --train_batch_size" in message and message.endswith("no checkpoint was written yet.")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's own out-of-memory error (bench/gpu.sh runs it)")
def test_a_step_that_does_not_fit_on_the_gpu_names_the_fix(tmp_path, train_here):
    data = write_images(tmp_path / "data", count=16, shards=4)
    with pytest.raises(SystemExit) as stopped:  # 16 images × 16 channels × 4096² in float32: 16 GiB per activation
        train_here(FAST + ["--dataset_name", str(data), "--max_train_steps", "2", "--resolution", "4096",
                           "--train_batch_size", "16", "--output_dir", str(tmp_path / "run")])
    message = str(stopped.value.code)
    del stopped
    gc.collect()
    torch.cuda.empty_cache()
    assert message.startswith("out of memory on cuda") and "in training step 1, 16 images of 1×4096×4096" in message
    assert "CUDA out of memory" in message and "of the GPU's" in message, message
    assert "lower --train_batch_size" in message and "--mixed_precision bf16" in message
