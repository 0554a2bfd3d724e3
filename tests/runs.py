"""Real training runs for the tests and for bench/soak.py: a small parquet dataset, launching and killing
training/train.py at chosen moments, and a check that every visible checkpoint is complete."""

import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "training" / "train.py")
# A 176 k-parameter model, a 50-step chain and no tensorboard: a step takes tens of milliseconds.
FAST = ["--preset", "tiny-16", "--ddpm_num_steps", "50", "--ddpm_num_inference_steps", "4", "--num_sample_images",
        "4", "--logger", "none", "--shuffle_buffer_size", "16", "--lr_warmup_steps", "2", "--ema_max_decay", "0.9",
        "--train_batch_size", "4"]
FAST_LOGGED = [a if a != "none" else "tensorboard" for a in FAST]  # FAST, logging to TensorBoard
KILL_POINTS = ("step", "checkpoint", "upload")


def train_in_process(train, argv: List[str]):
    """train.py's ``main(argv)`` run in this process as a launched run would have it: on one thread (as launches are,
    OMP_NUM_THREADS=1), with accelerate's state made afresh (a process keeps one: a GPU run of an earlier test and
    this one's run on the host would clash), and the process-wide settings train.py makes (cuDNN's autotuner, TF32)
    put back afterwards, so that later tests run as they would alone."""
    from accelerate.state import AcceleratorState

    settings = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    threads = torch.get_num_threads()
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(1)
    try:
        return train.main(argv)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = settings
        AcceleratorState._reset_state(reset_partial_state=True)


def load_train_script():
    """training/train.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hold_publishing(monkeypatch, checkpoint: str, until_step: int, then=None) -> list:
    """Hold the background publishing of ``checkpoint`` (CheckpointSaver._publish) until training, in this process,
    has made ``until_step`` optimizer steps (counted by the EMA's updates; ``then()`` is called at that step), 20 s at
    most. Returns the list each hold's outcome is appended to: True where the steps came, False where it timed out
    (had the training loop waited for the publishing, they could not come)."""
    import threading

    import ddpm_hf.ema
    from ddpm_hf.checkpoints import CheckpointSaver

    steps, reached, held = [0], threading.Event(), []
    update, publish = ddpm_hf.ema.EMA.update, CheckpointSaver._publish

    def counted(self, *args, **kwargs):
        steps[0] += 1
        if steps[0] == until_step:
            if then is not None:
                then()
            reached.set()
        return update(self, *args, **kwargs)

    def held_publish(self, tmp, final, *args):
        if final.name == checkpoint:
            held.append(reached.wait(timeout=20))
        return publish(self, tmp, final, *args)

    monkeypatch.setattr(ddpm_hf.ema.EMA, "update", counted)
    monkeypatch.setattr(CheckpointSaver, "_publish", held_publish)
    return held


def png_bytes(seed: int, size: int = 20) -> bytes:
    """A random grey ``size`` × ``size`` PNG, the same for the same seed."""
    from PIL import Image

    buffer = io.BytesIO()
    array = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(array, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: Path, count: int = 256, shards: int = 8, size: int = 20) -> Path:
    """``png_bytes(0..count-1)`` in ``shards`` parquet files (``image`` column). The fault tests use more rows than a
    short run reads, so that no run reaches the end of an epoch."""
    from datasets import Dataset, Features, Image as ImageFeature

    folder.mkdir(parents=True, exist_ok=True)
    ds = Dataset.from_dict({"image": [{"bytes": png_bytes(i, size), "path": None} for i in range(count)]},
                           features=Features({"image": ImageFeature()}))
    for k in range(shards):
        ds.shard(shards, k, contiguous=True).to_parquet(str(folder / f"train-{k:05d}-of-{shards:05d}.parquet"))
    return folder


def read_batches(stream, batches: int) -> List[str]:
    """The example ids a TrainStream (made with record_ids) has handed out after ``batches`` more batches; the stream
    is closed after them, or after the error that stopped it."""
    try:
        for _ in range(batches):
            stream.next_batch()
    finally:
        stream.close()
    return stream.seen_ids


def child_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("WORLD_SIZE", None)
    return env


def launch(args: List[str], log: Path, env: Optional[dict] = None, preexec_fn=None) -> subprocess.Popen:
    """Start ``train.py args`` with stdout and stderr appended to ``log`` (a file: a pipe nobody reads would block)."""
    with open(log, "ab") as sink:
        return subprocess.Popen([sys.executable, TRAIN, *args], stdout=sink, stderr=subprocess.STDOUT,
                                env=env or child_env(), cwd=log.parent, preexec_fn=preexec_fn)


def run(args: List[str], log: Path, env: Optional[dict] = None, preexec_fn=None, expect_ok: bool = True) -> int:
    proc = launch(args, log, env, preexec_fn)
    code = proc.wait(timeout=600)
    if expect_ok and code != 0:
        raise AssertionError(f"train.py {' '.join(args)} exited {code}:\n{log.read_text()[-6000:]}")
    return code


def kill_at(proc: subprocess.Popen, point: str, output_dir: Path, rng: random.Random, upload_fault=None,
            deadline_s: float = 300) -> str:
    """SIGKILL ``proc`` at ``point``: "step" (a random moment of training), "checkpoint" (while a checkpoint folder
    is being written) or "upload" (while the Hub holds an upload request: ``upload_fault`` is a stall fault of the
    test Hub). Returns what was hit; "finished" if the run ended first. The caller removes run_info.json before the
    launch: the run writes it once it has resumed and starts training."""
    deadline = time.time() + deadline_s
    while not (output_dir / "run_info.json").exists():
        if proc.poll() is not None:
            return "finished"
        assert time.time() < deadline, "training did not start"
        time.sleep(0.01)
    hit = point
    if point == "step":
        time.sleep(rng.uniform(0.2, 1.5))
    elif point == "checkpoint":
        while not list(output_dir.glob(".checkpoint-*.tmp")):
            if proc.poll() is not None or time.time() > deadline:
                return "finished"
            time.sleep(0.001)
    elif point == "upload":
        hits = len(upload_fault.hits)
        while len(upload_fault.hits) == hits:
            if proc.poll() is not None or time.time() > deadline:
                return "finished"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, upload_fault.seconds / 2))
    if proc.poll() is not None:
        return "finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return hit


def check_checkpoints(output_dir: Path) -> List[str]:
    """Every visible checkpoint-N folder must load completely: the model's safetensors and every pickled state
    accelerate wrote (optimizer, RNGs, our registered objects). Returns their names, oldest first."""
    names = []
    for folder in sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        files = sorted(p.name for p in folder.iterdir())
        assert "model.safetensors" in files and "optimizer.bin" in files, f"{folder}: incomplete, holds {files}"
        load_file(folder / "model.safetensors")
        for name in files:
            if name.endswith((".bin", ".pkl")):
                torch.load(folder / name, weights_only=False)  # our own files: trusted
        if "pipeline" in files:  # its EMA pipeline (written unless there was no memory for the copy)
            assert (folder / "pipeline" / "model_index.json").is_file(), f"{folder}: incomplete pipeline"
            final_weights(folder / "pipeline")
        names.append(folder.name)
    return names


def logged_scalars(logdir: Path, tag: str) -> Dict[int, float]:
    """{step: value} of the scalar ``tag`` that a run logged to TensorBoard in ``logdir`` (its newest event file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(sorted(logdir.rglob("events.out.tfevents.*"))[-1].parent))
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def final_weights(output_dir: Path) -> dict:
    return load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it, as a crashed machine would (torchrun starts the training
    processes in sessions of their own: a kill of the launcher's group alone leaves them running). A launcher that has
    ended is left alone: its pid may belong to another process by now."""
    if proc.poll() is not None:
        return
    tree, frontier = [proc.pid], [proc.pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                children = [int(pid) for pid in task.read_text().split()]
            except OSError:
                continue
            tree += children
            frontier += children
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in tree[1:]:  # reaped by init: wait until they are gone
        deadline = time.time() + 30
        while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) and time.time() < deadline:
            time.sleep(0.01)


def free_port() -> int:
    """A free port for a launcher's rendezvous, taken below the kernel's ephemeral range: a port the kernel hands out
    (bind to 0) can go to any outgoing connection, the local Hub's clients included, before the launcher binds it."""
    import socket

    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    first_ephemeral = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    if first_ephemeral < 2048:  # (almost) every port is ephemeral here: the kernel's choice it is
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(1000):
        port = random.SystemRandom().randrange(max(1024, first_ephemeral - 10000), first_ephemeral)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {first_ephemeral}")
