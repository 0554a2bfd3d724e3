"""The training fast path: decoding workers that change nothing but speed, the data-wait measurement, bf16,
torch.compile, fp16 (CUDA only), and the per-device choices of the U-Net."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ddpm_hf.data.stream as stream_module
from ddpm_hf.data import TrainStream, load_image_dataset
from ddpm_hf.data.reader import ReaderProcess
from runs import FAST, child_env, final_weights, launch, logged_scalars, png_bytes, read_batches, run, write_images


REAL_DECODE_ROWS = stream_module.decode_rows


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data"), count=96)


def _children(pid: int):
    """The pids whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _gone(pids, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_workers_change_nothing_but_speed(images, tmp_path):
    """Same weights and the same examples with 0 and 2 decoding workers (2 data streams in one process; the
    2-process case is in test_training.py)."""
    args = FAST + ["--dataset_name", str(images), "--max_train_steps", "10", "--checkpointing_steps", "0",
                   "--data_streams", "2", "--record_example_ids", "--random_flip"]
    for workers in (0, 2):
        run(args + ["--dataloader_num_workers", str(workers), "--output_dir", str(tmp_path / f"w{workers}")],
            tmp_path / f"w{workers}.log")
    assert json.loads((tmp_path / "w2" / "run_info.json").read_text())["dataloader_num_workers"] == 2
    ids = [(tmp_path / f"w{w}" / "logs" / "example_ids_rank0.txt").read_text().split() for w in (0, 2)]
    assert ids[0] == ids[1] and len(ids[0]) == 10 * 2 * 4
    a, b = final_weights(tmp_path / "w0"), final_weights(tmp_path / "w2")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # the wait for data is measured and reported
    assert "data_wait" in (tmp_path / "w2.log").read_text()


def dies_on_row_9(cells, keys, settings):
    """decode_rows in a worker that gets killed at row 9 (by reference, the workers find it in this module)."""
    if any(index == 9 for _, _, index in keys):
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer or a decoder crash does
    return REAL_DECODE_ROWS(cells, keys, settings)


def test_a_dead_worker_stops_the_stream_naming_the_rows(images, monkeypatch):
    monkeypatch.setattr(stream_module, "decode_rows", dies_on_row_9)
    stream = TrainStream(load_image_dataset(str(images)), "image", 16, 1, 4, 1, 0, 1, seed=0, shuffle_buffer_size=0,
                         num_workers=2)
    try:
        with pytest.raises(RuntimeError, match=r"a data worker died while decoding stream 0, between epoch 0 row "
                                               r"(\d+) and epoch 0 row (\d+)") as failure:
            for _ in range(4):
                stream.next_batch()
    finally:
        stream.close()
    first, last = map(int, re.search(r"row (\d+) and epoch 0 row (\d+)", str(failure.value)).groups())
    assert first <= 9 <= last  # the fatal row is named among those in flight


def test_with_workers_the_rows_are_read_outside_the_training_process(images, tmp_path, monkeypatch):
    """With decoding workers, the reading (datasets' row iteration and shuffle buffer, the hand-off to the workers,
    the batches' assembly: about 6 ms of interpreter time per batch of 128 small images) runs in a reader process,
    so that it does not hold the training process's interpreter lock between the step's kernel launches; with none,
    a thread of the training process reads (as DataLoader's 0 workers). Oracle: the process that iterates the rows,
    recorded by a wrapper of TrainStream._rows, and the process tree."""
    record, real_rows = tmp_path / "readers.txt", TrainStream._rows

    def rows(self, v, epoch, consumed, counts):
        with open(record, "a") as f:
            f.write(f"{os.getpid()}\n")
        yield from real_rows(self, v, epoch, consumed, counts)

    monkeypatch.setattr(TrainStream, "_rows", rows)
    for workers in (0, 2):
        record.write_text("")
        stream = TrainStream(load_image_dataset(str(images)), "image", 16, 1, 4, 2, 0, 1, seed=0, num_workers=workers)
        try:
            assert stream.next_batch().shape == (8, 1, 16, 16)
            readers = set(map(int, record.read_text().split()))
            if workers:
                reader = stream._reader.process.pid
                assert readers == {reader} and reader in _children(os.getpid()) and len(_children(reader)) == workers
            else:
                assert readers == {os.getpid()}
        finally:
            stream.close()


def test_with_workers_the_training_loops_thread_only_takes_received_batches(images, monkeypatch):
    """With decoding workers, the reader's batches are received (two messages, the copy out of its ring, the slot
    sent back: 0.4 ms per batch of 128 32² images here, 2.6 ms at 256², bench/data.py) by a thread of the training
    process as they come: the thread that calls next_batch, the training loop's, never receives one. The
    receiving thread ends with the stream. Oracle: the thread that runs ReaderProcess.receive, and the batches of
    a stream without workers."""
    receivers, real_receive = [], ReaderProcess.receive

    def receive(self):
        receivers.append(threading.current_thread())
        return real_receive(self)

    monkeypatch.setattr(ReaderProcess, "receive", receive)

    def stream(workers):
        return TrainStream(load_image_dataset(str(images)), "image", 16, 1, 4, 2, 0, 1, seed=0, record_ids=True,
                           num_workers=workers)

    with_workers = stream(1)
    with _bounded(60, "the stream did not deliver"):
        with_workers.next_batch()
        receiving = with_workers._reader.receiver
        assert read_batches(with_workers, 7) == read_batches(stream(0), 8)
    assert receivers and threading.current_thread() not in receivers
    assert set(receivers) == {receiving} and not receiving.is_alive()


@contextmanager
def _bounded(seconds: int, what: str):
    """Fail the test, not hang it, if the block takes more than ``seconds``."""
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail(what))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _until_ended(process, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while process.is_alive():
        assert time.time() < deadline, "the reader process did not end"
        time.sleep(0.05)


def test_an_error_sent_as_the_reader_ends_is_read_after_a_wait_that_timed_out():
    """The training process waits on the reader's pipe a second at a time and, after a wait that timed out, asks
    whether the reader lives. A reader that sends its error and ends between the two (the training process
    descheduled there, which the wait here forces) must still have its error raised, not "ended without sending its
    error". A real pipe and a real forked reader; only the timing of the first wait is imposed."""
    import multiprocessing
    import pickle

    conn, reader_end = multiprocessing.Pipe()

    def reader_that_fails():
        error = ValueError("row 7 of shard 3 cannot be decoded")
        reader_end.send(("error", pickle.dumps(error), f"ValueError: {error}", "Traceback: ...\n"))

    process = multiprocessing.get_context("fork").Process(target=reader_that_fails)
    process.start()
    reader_end.close()
    ready = ReaderProcess.waited_on(conn, process)

    class Descheduled:  # the first wait times out as the reader sends its error and ends
        waits = 0

        def poll(self, timeout_ms):
            self.waits += 1
            if self.waits == 1:
                process.join(30)
                return []
            return ready.poll(timeout_ms)

    reader = object.__new__(ReaderProcess)  # receive() with this pipe and process, nothing else
    reader.conn, reader.process, reader._ready, reader._stop = conn, process, Descheduled(), threading.Event()
    with pytest.raises(ValueError, match="row 7 of shard 3"):
        reader.receive()


def test_a_stream_dropped_without_close_has_its_reader_killed(images):
    """A TrainStream with workers dropped without close() (a script's own loop that forgets it): once it is collected,
    its reader process and decoding workers are killed and its receiving thread ends, instead of decoding ahead and
    holding the ring until the interpreter exits. (The receiving thread holds the reader only while receiving.)"""
    import gc

    stream = TrainStream(load_image_dataset(str(images)), "image", 16, 1, 4, 1, 0, 1, seed=0, num_workers=1)
    stream.next_batch()
    process, receiving = stream._reader.process, stream._reader.receiver
    workers = _children(process.pid)
    del stream
    deadline = time.time() + 60
    while process.is_alive():  # the reader and the stream hold each other: collected by the cycle collector
        assert time.time() < deadline, "the reader of a dropped stream lives on"
        gc.collect()
        time.sleep(0.05)
    assert _gone(workers), "the decoding workers outlived their reader"
    receiving.join(10)
    assert not receiving.is_alive(), "the receiving thread of a dropped stream lives on"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
@pytest.mark.parametrize("workers", [0, 1])
def test_batches_come_in_pinned_memory_on_the_gpu(images, workers):
    """On a CUDA machine train.py asks for pinned memory: every batch comes pinned, ready for a non-blocking copy
    (allocated by the receiving thread with workers, by the reading thread without), and equal to the batches of a
    stream without it."""
    def stream(pin):
        return TrainStream(load_image_dataset(str(images)), "image", 16, 1, 4, 1, 0, 1, seed=0, num_workers=workers,
                           pin_memory=pin)

    pinned, plain = stream(True), stream(False)
    try:
        for _ in range(6):
            batch = pinned.next_batch()
            assert batch.is_pinned() and torch.equal(batch, plain.next_batch())
    finally:
        pinned.close()
        plain.close()


def test_a_dead_reader_stops_the_stream_saying_so(images):
    """The reader process killed (for memory, or a native library crashed in it), and gone with its workers, before
    the training process asks for its next batch: the batches it had finished are handed out, then the stream stops
    with the reason and the way to resume, not a hang."""
    stream = TrainStream(load_image_dataset(str(images)), "image", 16, 1, 4, 1, 0, 1, seed=0, num_workers=1)
    try:
        with _bounded(60, "the stream waits for a dead reader"):
            stream.next_batch()
            workers = _children(stream._reader.process.pid)
            os.kill(stream._reader.process.pid, signal.SIGKILL)
            _until_ended(stream._reader.process)
            assert _gone(workers), "the decoding workers outlived their reader"
            with pytest.raises(RuntimeError, match=r"the data reader process was killed by SIGKILL \(killed for "
                                                   r"memory, or .*resume with --resume_from_checkpoint latest"):
                for _ in range(stream.prefetch + 1):  # the batches it had finished first
                    stream.next_batch()
    finally:
        stream.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_an_error_after_good_batches_comes_after_them(tmp_path, monkeypatch, workers):
    """Eight images, then corrupt ones: two batches, then the stream stops naming the corrupt rows, whether a thread
    of this process reads (the oracle) or a reader process that has sent both batches and its error and is gone
    before the second batch is asked for."""
    from datasets import Dataset, Features, Image as ImageFeature

    cells = [{"bytes": png_bytes(i), "path": None} for i in range(8)] + [{"bytes": b"\x89PNG broken", "path": None}] * 6
    Dataset.from_dict({"image": cells}, features=Features({"image": ImageFeature()})).to_parquet(
        str(tmp_path / "train-0.parquet"))
    monkeypatch.setattr(TrainStream, "MAX_UNDECODABLE_IN_A_ROW", 3)
    stream = TrainStream(load_image_dataset(str(tmp_path)), "image", 16, 1, 4, 1, 0, 1, seed=0, shuffle_buffer_size=0,
                         record_ids=True, num_workers=workers)
    try:
        with _bounded(60, "the stream waits for a reader that has ended"):
            stream.next_batch()
            if workers:
                _until_ended(stream._reader.process)
            assert stream.next_batch().shape == (4, 1, 16, 16)
            with pytest.raises(ValueError, match="no decodable image in 3 rows in a row of stream 0") as failure:
                stream.next_batch()
            with pytest.raises(ValueError, match="no decodable image in 3 rows in a row"):  # asked again: read again
                stream.next_batch()
    finally:
        stream.close()
    assert len(stream.seen_ids) == 8 and stream.position == {0: (0, 8)}
    if workers:  # where it was raised: the reader's traceback, as a note
        assert "in the data reader process" in "".join(failure.value.__notes__)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_batch_that_does_not_come_is_reported_while_waiting(images, monkeypatch, workers):
    """A reader that stops (the reader process SIGSTOPped; with 0 workers, the reading thread blocked): the wait for
    the next batch is reported every QUIET_WAIT_WARNING_S (here 0.5 s), naming the reader and the positions, instead
    of a silent stop; once the reader goes on (when the warning is seen), so does the stream, with the batches of
    an undisturbed stream (the oracle)."""
    import logging

    def stream():
        return TrainStream(load_image_dataset(str(images)), "image", 16, 1, 4, 1, 0, 1, seed=0, record_ids=True,
                           num_workers=workers)

    undisturbed = stream()
    after_the_stop = undisturbed.prefetch + 2  # at most prefetch batches are made ahead: the last ones wait
    undisturbed = read_batches(undisturbed, 1 + after_the_stop)
    monkeypatch.setattr(TrainStream, "QUIET_WAIT_WARNING_S", 0.5)
    warnings, go_on, calls, stalled = [], threading.Event(), [], stream()
    if not workers:  # the third batch's reading blocks until the wait has been reported
        real_take = TrainStream._take

        def take(self, v, decoded):
            calls.append(v)
            if len(calls) == 3:
                go_on.wait(60)
            return real_take(self, v, decoded)

        monkeypatch.setattr(TrainStream, "_take", take)

    class GoOn(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("still waiting for a batch from the data reader"):
                warnings.append(record.getMessage())
                go_on.set()
                if workers:
                    os.kill(stalled._reader.process.pid, signal.SIGCONT)

    handler, data_logger = GoOn(), logging.getLogger("ddpm_hf.data")
    data_logger.addHandler(handler)
    try:
        with _bounded(60, "the stream did not go on"):
            stalled.next_batch()
            if workers:
                os.kill(stalled._reader.process.pid, signal.SIGSTOP)
            read_batches(stalled, after_the_stop)
    finally:
        data_logger.removeHandler(handler)
    assert warnings and "positions after the last batch: {0: (0, " in warnings[0]
    assert f"data reader {'process (pid ' if workers else 'thread ('}" in warnings[0]
    assert stalled.seen_ids == undisturbed


class _Unreadable(Exception):
    """An error that pickles but cannot be rebuilt (its __init__ takes two arguments)."""

    def __init__(self, what, where):
        super().__init__(f"{what} at {where}")


@pytest.mark.parametrize("kind", ["plain", "holding a tensor", "unpicklable", "not rebuildable"])
def test_the_readers_error_reaches_the_training_process_whatever_it_holds(images, monkeypatch, kind):
    """An error raised in the reader process after its first batch: raised in the training process as it was where
    it pickles and unpickles (a tensor travels by value, not as a handle into the exited reader), else as a
    RuntimeError with its type and message; never as a broken pipe or a "died" message; with the reader's traceback
    as a note."""
    class Local(Exception):  # a class pickle cannot find by name
        pass

    error = {"plain": lambda: ValueError("row 5 is bad"), "holding a tensor": lambda: ValueError("bad", torch.ones(3)),
             "unpicklable": lambda: Local("row 5 is bad"), "not rebuildable": lambda: _Unreadable("row 5", "shard 2")}
    real_take, calls = TrainStream._take, []

    def take(self, v, decoded):
        calls.append(v)
        if len(calls) > 1:
            raise error[kind]()
        return real_take(self, v, decoded)

    monkeypatch.setattr(TrainStream, "_take", take)
    stream = TrainStream(load_image_dataset(str(images)), "image", 16, 1, 4, 1, 0, 1, seed=0, num_workers=1)
    try:
        with _bounded(60, "the stream waits for a reader that has ended"):
            stream.next_batch()
            _until_ended(stream._reader.process)
            with pytest.raises(Exception) as failure:
                stream.next_batch()
    finally:
        stream.close()
    got = failure.value
    if kind == "plain":
        assert type(got) is ValueError and str(got) == "row 5 is bad"
    elif kind == "holding a tensor":
        assert type(got) is ValueError and got.args[0] == "bad" and torch.equal(got.args[1], torch.ones(3))
    else:
        expected = "Local: row 5 is bad" if kind == "unpicklable" else "_Unreadable: row 5 at shard 2"
        assert type(got) is RuntimeError and str(got) == expected
    note = "".join(got.__notes__)
    assert note.startswith("in the data reader process:") and "in take" in note


# The exception case (about 20 s) stays in the slow set: it shares its exit path with SIGINT (the launcher's finally).
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", pytest.param("exception", marks=pytest.mark.slow)])
def test_workers_exit_with_the_run(images, tmp_path, how):
    args = FAST + ["--dataset_name", str(images), "--max_train_steps", "100000", "--checkpointing_steps", "0",
                   "--dataloader_num_workers", "2", "--output_dir", str(tmp_path / "run")]
    env = None
    if how == "exception":  # the loss turns NaN at every step: the run stops itself with an error after 5
        env = child_env(DDPM_HF_NAN_AT=",".join(str(i) for i in range(3, 100)))
        proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "faults" / "inject_nan.py"), *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    else:
        proc = launch(args, tmp_path / "log.txt")
    try:
        deadline = time.time() + 120
        # the reader process, a child of the training process, and its two decoding workers (nothing has finished
        # yet); each listing read once (a child may come or go between two)
        while True:
            reader = _children(proc.pid)
            workers = reader + (_children(reader[0]) if len(reader) == 1 else [])
            if len(reader) == 1 and len(workers) >= 3:
                break
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.05)
        if how != "exception":
            time.sleep(1.0)  # into the training loop
            proc.send_signal(getattr(signal, how))
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()  # a run that outlives the test (failed or timed out) would slow every test after it
    assert code != 0
    assert _gone(workers), f"the data reader and workers {workers} outlived the training process ({how})"
    if how == "SIGINT":  # Ctrl-C: a line saying what is kept, not a traceback through the library
        log = (tmp_path / "log.txt").read_text()
        assert code == 128 + signal.SIGINT and "Traceback" not in log, log[-3000:]
        assert "stopped by Ctrl-C. No checkpoint was written: the run would start anew." in log, log[-3000:]


def _eager_args(images):
    return FAST + ["--dataset_name", str(images), "--max_train_steps", "6", "--checkpointing_steps", "3",
                   "--logger", "tensorboard"]


@pytest.fixture(scope="module")
def eager(images, tmp_path_factory):
    """One fp32, uncompiled run: the reference of the bf16 and the compiled runs."""
    out = tmp_path_factory.mktemp("eager") / "run"
    run(_eager_args(images) + ["--output_dir", str(out)], out.parent / "log.txt")
    return out


def _scalars(logdir: Path, tag: str):
    return list(logged_scalars(logdir, tag).values())


def test_bf16_trains_like_fp32_and_saves_an_fp32_diffusers_pipeline(images, eager, tmp_path):
    run(_eager_args(images) + ["--mixed_precision", "bf16", "--output_dir", str(tmp_path / "bf16")],
        tmp_path / "bf16.log")
    losses = {"no": _scalars(eager / "logs", "loss"), "bf16": _scalars(tmp_path / "bf16" / "logs", "loss")}
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    # bf16 keeps 8 bits of mantissa: the same batches give losses within a few percent, step by step
    torch.testing.assert_close(torch.tensor(losses["bf16"]), torch.tensor(losses["no"]), rtol=0.05, atol=0.02)
    # and bf16 did round: the fp32 run's losses, with its batches, t and ε, come out the same to the last bit
    assert (torch.tensor(losses["bf16"]) - torch.tensor(losses["no"])).abs().max() > 1e-5, "bf16 was not used"
    with safe_open(str(tmp_path / "bf16" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "bf16")
    assert type(pipe).__name__ == "DDPMPipeline" and pipe.unet.dtype == torch.float32


@pytest.mark.slow  # 50-170 s of inductor compilation on 2 cores: bench/gpu.sh runs --compile for real
def test_compiled_training_matches_and_its_checkpoints_are_plain(images, eager, tmp_path):
    """--compile: the same losses as eager to float tolerance; checkpoints and the pipeline hold plain keys and load
    in plain diffusers; an eager run resumes the compiled checkpoint and ends on the eager weights (the reverse is
    the slow test below)."""
    args = _eager_args(images)
    run(args + ["--compile", "--output_dir", str(tmp_path / "compiled")], tmp_path / "compiled.log")
    torch.testing.assert_close(torch.tensor(_scalars(tmp_path / "compiled" / "logs", "loss")),
                               torch.tensor(_scalars(eager / "logs", "loss")), rtol=1e-4, atol=1e-5)
    for folder in (tmp_path / "compiled" / "checkpoint-3", tmp_path / "compiled" / "unet"):
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                assert not [k for k in f.keys() if "_orig_mod" in k], file
    from diffusers import UNet2DModel

    UNet2DModel.from_pretrained(tmp_path / "compiled" / "unet")
    _resume_and_compare(tmp_path / "compiled" / "checkpoint-3", [], eager, tmp_path / "c2e", args)


def test_accelerates_dynamo_settings_compile_the_unet_in_place(images, eager, tmp_path):
    """`accelerate launch --dynamo_backend B --dynamo_use_fullgraph` (here accelerate's environment for them, with
    dynamo's eager backend: its tracing without inductor's minutes of compilation) compiles the U-Net in place with
    exactly those settings, where prepare() would wrap it: the eager run's losses, and plain keys in the checkpoints
    and the pipeline (which plain diffusers loads; resuming a compiled run's checkpoint is the slow test above)."""
    out = tmp_path / "dynamo"
    env = child_env(ACCELERATE_DYNAMO_BACKEND="EAGER", ACCELERATE_DYNAMO_MODE="default",  # as accelerate launch
                    ACCELERATE_DYNAMO_USE_FULLGRAPH="True", ACCELERATE_DYNAMO_USE_DYNAMIC="False",  # sets them
                    ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION="False", TORCH_LOGS="dynamo")
    run(_eager_args(images) + ["--output_dir", str(out)], tmp_path / "dynamo.log", env=env)
    log = (tmp_path / "dynamo.log").read_text()
    # the U-Net's forward traced by dynamo in the training process (its INFO log, asked by TORCH_LOGS)
    assert re.search(r"torchdynamo start tracing forward \S*ddpm_hf/unet\.py", log), log[-3000:]
    asked = "asked by accelerate's dynamo settings (eager): {'backend': 'eager', 'fullgraph': True, 'dynamic': False}"
    assert asked in log, log[-3000:]
    torch.testing.assert_close(torch.tensor(_scalars(out / "logs", "loss")),
                               torch.tensor(_scalars(eager / "logs", "loss")), rtol=1e-6, atol=1e-7)
    for folder in (out / "checkpoint-3", out / "checkpoint-6", out / "unet"):
        files = list(folder.glob("*.safetensors"))
        assert files, f"no weights in {folder}"
        for file in files:
            with safe_open(str(file), "pt") as f:
                assert not [k for k in f.keys() if "_orig_mod" in k], file
    from diffusers import UNet2DModel

    UNet2DModel.from_pretrained(out / "unet")


@pytest.mark.slow
def test_an_eager_checkpoint_resumes_compiled(images, eager, tmp_path):
    _resume_and_compare(eager / "checkpoint-3", ["--compile"], eager, tmp_path / "e2c", _eager_args(images))


def _resume_and_compare(checkpoint: Path, flags, eager: Path, out: Path, args):
    out.mkdir()
    shutil.copytree(checkpoint, out / checkpoint.name)
    run(args + flags + ["--resume_from_checkpoint", "latest", "--output_dir", str(out)], out.parent / "resume.log")
    reference, resumed = final_weights(eager), final_weights(out)
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"{out.name} {key}")


@pytest.mark.slow  # about 40 s: inductor tries its compilers before failing
def test_a_compiler_failure_stops_before_training(images, tmp_path):
    out = tmp_path / "run"
    env = child_env(CXX="/bin/false", CC="/bin/false", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    code = run(FAST + ["--dataset_name", str(images), "--max_train_steps", "4", "--compile", "--output_dir", str(out)],
               tmp_path / "log.txt", env=env, expect_ok=False)
    log = (tmp_path / "log.txt").read_text()
    assert code != 0 and "--compile: torch.compile of the U-Net failed" in log and "without --compile" in log
    assert not list(out.glob("checkpoint-*")) and "training:" not in log


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a loss scaler needs a CUDA GPU")
def test_fp16_on_cuda_trains_and_counts_overflow_steps(images, tmp_path):
    args = FAST + ["--dataset_name", str(images), "--max_train_steps", "20", "--checkpointing_steps", "0",
                   "--mixed_precision", "fp16", "--logger", "tensorboard", "--output_dir", str(tmp_path / "fp16")]
    run(args, tmp_path / "log.txt")
    losses = _scalars(tmp_path / "fp16" / "logs", "loss")
    assert len(losses) == 20 and all(v == v for v in losses)
    assert "fp16 overflow steps" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("fused", [True, False])
def test_an_fp16_overflow_is_counted_whatever_the_optimizer(fused):
    """A fused AdamW (train.py's on CUDA) takes the loss scaler's found_inf and skips an overflowing update in its
    own kernel, so accelerate, which watches whether the scaler called step(), never sees the skip; train.py reads
    the scaler's decision on the device. Real accelerate, GradScaler and AdamW: accelerate makes no scaler on a CPU,
    so the test gives it the CPU's GradScaler, as accelerate makes the CUDA one."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from runs import load_train_script

    train = load_train_script()
    AcceleratorState._reset_state(reset_partial_state=True)  # this process's earlier Accelerators were not fp16
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)
    model, optimizer = accelerator.prepare(net, torch.optim.AdamW(net.parameters(), lr=0.1, fused=fused))
    x = torch.ones(2, 4)

    def step(loss_scale: float):
        before = [p.detach().clone() for p in net.parameters()]
        loss = model(x).square().mean() * loss_scale
        accelerator.backward(loss)
        update = train.optimizer_step(accelerator, model, optimizer, loss, 1.0)
        changed = any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))
        return update.finite(), update.overflow(), changed

    try:
        assert step(1.0) == (True, False, True)
        # A finite loss whose scaled value (× 2^16) overflows float32: the scaler skips the update, halves its scale.
        assert step(1e36) == (True, True, False)
        assert float(accelerator.scaler.get_scale()) == 2.0**15
        assert step(1.0) == (True, False, True)
        assert step(float("nan")) == (False, False, False)  # a non-finite loss: a bad step, not an overflow

        # Two micro-steps per update: a NaN loss in the first makes NaN gradients, which the scaler takes for an
        # overflow; the update is still a bad step (it was counted as an overflow: a diverged run never stopped).
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=True, mixed_precision="fp16", gradient_accumulation_steps=2)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        net = torch.nn.Linear(4, 4)
        model, optimizer = accelerator.prepare(net, torch.optim.AdamW(net.parameters(), lr=0.1, fused=fused))

        def update(*loss_scales):
            for loss_scale in loss_scales:
                with accelerator.accumulate(model):
                    loss = model(x).square().mean() * loss_scale
                    accelerator.backward(loss)
                    result = train.optimizer_step(accelerator, model, optimizer, loss, 1.0)
            return result.finite(), result.overflow()

        assert update(1.0, 1.0) == (True, False)
        assert update(float("nan"), 1.0) == (False, False)
        assert update(1.0, 1e36) == (True, True)  # an overflow in the last micro-step is one
        assert update(1.0, 1.0) == (True, False)  # each update's micro-steps alone
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the next test's Accelerator is not fp16


def test_accumulated_gradients_add_into_buffers_made_before_the_first_step(images, tmp_path, monkeypatch):
    """With --gradient_accumulation_steps 2, every micro-step's backward adds into the same gradient buffers, made
    before the first step and zeroed in place after each update. A first micro-step's gradients must not become the
    buffers: a U-Net compiled with CUDA graphs hands them out in the graphs' memory, which the next micro-step's
    replay overwrites (test_gradient_accumulation_with_cuda_graphs runs that on a GPU). train.py in this process, on
    one thread. Its --record_example_ids, with no checkpoint to write it, is written at the end."""
    from runs import load_train_script, train_in_process

    train = load_train_script()
    buffers, zeroed, seen = [], [], []
    real_start_run, real_optimizer_step = train.start_run, train.optimizer_step

    def start_run(accelerator, args, model, *rest):
        buffers.extend(p.grad for p in model.parameters())
        zeroed.append(all(g is not None and not g.any() for g in buffers))
        return real_start_run(accelerator, args, model, *rest)

    def optimizer_step(accelerator, model, *rest):
        seen.append((accelerator.sync_gradients, [p.grad for p in model.parameters()]))
        return real_optimizer_step(accelerator, model, *rest)

    monkeypatch.setattr(train, "start_run", start_run)
    monkeypatch.setattr(train, "optimizer_step", optimizer_step)
    train_in_process(train, FAST + ["--dataset_name", str(images), "--max_train_steps", "3", "--checkpointing_steps",
                                    "0", "--gradient_accumulation_steps", "2", "--dataloader_num_workers", "0",
                                    "--record_example_ids", "--output_dir", str(tmp_path / "run")])
    assert buffers and zeroed == [True]
    assert [sync for sync, _ in seen] == [False, True] * 3  # 3 updates of 2 micro-steps
    for _, grads in seen:
        assert all(g is b for g, b in zip(grads, buffers))
    weights = final_weights(tmp_path / "run")
    assert all(torch.isfinite(w).all() for w in weights.values())
    ids = (tmp_path / "run" / "logs" / "example_ids_rank0.txt").read_text().split()
    assert len(ids) == 3 * 2 * 4 == len(set(ids))  # 3 updates of 2 micro-steps of 4 images, each image once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_gradient_accumulation_with_cuda_graphs(images, tmp_path):
    """`accelerate launch --dynamo_mode reduce-overhead` with --gradient_accumulation_steps 2: the second
    micro-step's replay would overwrite the first one's gradients if they were the accumulation's buffers (see
    test_accumulated_gradients_add_into_buffers_made_before_the_first_step); the run must finish, finite."""
    out = tmp_path / "graphs"
    env = child_env(ACCELERATE_DYNAMO_BACKEND="INDUCTOR", ACCELERATE_DYNAMO_MODE="reduce-overhead",
                    ACCELERATE_DYNAMO_USE_FULLGRAPH="False", ACCELERATE_DYNAMO_USE_DYNAMIC="False",
                    ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION="False")
    run(FAST + ["--dataset_name", str(images), "--max_train_steps", "4", "--checkpointing_steps", "0",
                "--gradient_accumulation_steps", "2", "--mixed_precision", "bf16", "--output_dir", str(out)],
        tmp_path / "log.txt", env=env)
    assert all(torch.isfinite(w).all() for w in final_weights(out).values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_dropout_masks_follow_their_seed_under_cuda_graphs():
    """train.LoopState seeds the dropout masks with torch.manual_seed before each batch. Under reduce-overhead the
    network's kernels are replayed as CUDA graphs, whose random numbers come from the generator's seed and offset at
    each replay: the same seed must give the same masks at every replay, another seed other masks (were the seed
    ignored by the replays, the masks would move on with the offset instead)."""
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Dropout(0.5)).cuda().train()
    compiled = torch.compile(net, mode="reduce-overhead")
    x = torch.ones(8, 64, device="cuda")

    def masks(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return (compiled(x) != 0).clone()

    for _ in range(3):  # cudagraph trees: warm-up, recording, then replays
        masks(0)
    first, again, other = masks(1), masks(1), masks(2)
    assert 0.4 < first.float().mean() < 0.6
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_ema_update_is_the_update_rule():
    """EMA with foreach ops against θ_ema ← d θ_ema + (1 − d) θ written out, decay warm-up (1 + n) / (10 + n)."""
    from ddpm_hf.ema import EMA

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
    ema = EMA(params, max_decay=0.999, warmup=True)
    shadow = [p.detach().clone().double() for p in params]
    for n in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g))
        d = min(0.999, (1 + n) / (10 + n))
        assert ema.update(params) == pytest.approx(d)
        shadow = [d * s + (1 - d) * p.detach().double() for s, p in zip(shadow, params)]
    for s, e in zip(shadow, ema.shadow):
        torch.testing.assert_close(e.double(), s, rtol=0, atol=1e-6)


def test_diffusers_ema_ramp_is_its_ema_models():
    """--ema_inv_gamma/--ema_power: diffusers' example's EMA (EMAModel with use_ema_warmup, its inv_gamma and power),
    the oracle, step by step: the same decays and the same averaged weights; a checkpoint keeps the ramp."""
    from diffusers.training_utils import EMAModel

    from ddpm_hf.ema import EMA

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
    for inv_gamma, power, max_decay in ((1.0, 0.75, 0.9999), (2.5, 2 / 3, 0.9)):
        ours = EMA(params, max_decay=max_decay, power_ramp=(inv_gamma, power))
        theirs = EMAModel(params, decay=max_decay, use_ema_warmup=True, inv_gamma=inv_gamma, power=power)
        for _ in range(40):
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn(p.shape, generator=g))
            decay = ours.update(params)
            theirs.step(params)
            assert decay == pytest.approx(theirs.cur_decay_value, abs=1e-12)
        for mine, other in zip(ours.shadow, theirs.shadow_params):
            torch.testing.assert_close(mine, other, rtol=0, atol=1e-5)
        assert 0.3 < decay < max_decay  # (still ramping: the ramp, not the cap, was compared)
        resumed = EMA(params, max_decay=0.5)
        resumed.load_state_dict(ours.state_dict())
        assert resumed.decay() == ours.decay() and resumed.power_ramp == [inv_gamma, power]
    with pytest.raises(ValueError, match="power ramp"):
        EMA(params, warmup=True, power_ramp=(1.0, 0.75))


def test_both_upsampling_formulations_agree():
    """The per-device choice in Upsample (phases on CPU, diffusers' interpolate-then-convolve elsewhere) is a choice
    of speed only."""
    from ddpm_hf.unet import Upsample

    up = Upsample(8)
    x = torch.randn(2, 8, 6, 5)
    phases = up(x)
    Upsample.phases_on = set()
    try:
        plain = up(x)
    finally:
        Upsample.phases_on = {"cpu"}
    torch.testing.assert_close(phases, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0)), rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_both_activation_layouts_agree(device, monkeypatch):
    """The per-device layout choice in DDPMUNet (channels-last activations on CPU, contiguous elsewhere until a GPU
    measurement says otherwise) is a choice of speed only: the same output, returned contiguous, either way."""
    from ddpm_hf import DDPMUNet
    from ddpm_hf.presets import unet_config

    # cuDNN's convolutions in float32, not TF32 (torch's default there): TF32's rounding, whose kernels differ by
    # layout, moved outputs by up to 1e-3 on an H100, the size of a layout bug in a small corner of the image
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    # 3 channels: a 1-channel output is contiguous in either layout, which would hide a channels-last return
    unet = DDPMUNet(**unet_config("tiny-16", in_channels=3, out_channels=3)).eval().to(device)
    x, t = torch.randn(2, unet.config.in_channels, 16, 16, device=device), torch.tensor([3, 700], device=device)
    outputs = []
    for layout_on in ({device}, set()):
        monkeypatch.setattr(DDPMUNet, "channels_last_on", layout_on)
        with torch.no_grad():
            outputs.append(unet(x, t).sample)
    assert all(out.is_contiguous() for out in outputs)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variance_type, loss, prediction_type, snr_gamma", [
    ("fixed_small", "simple", "epsilon", None), ("fixed_small", "simple", "epsilon", 5.0),
    ("fixed_large", "simple", "v_prediction", None), ("fixed_small", "simple", "mean", None),
    ("learned_range", "hybrid", "epsilon", None), ("fixed_large", "vlb", "epsilon", None)])
def test_the_training_step_never_reads_the_device_back(variance_type, loss, prediction_type, snr_gamma):
    """The step up to the optimizer (t, ε and eq. 4, the U-Net forward and backward, every loss) on tensors of the
    meta device, which hold no values: any read of t or of the batch on the host (a `.cpu()`, `int()`, `bool()`, a
    table indexed on the CPU) raises there, as it would stall a GPU at every step. The same calls on CPU tensors are
    the numbers the parity tests check."""
    from ddpm_hf import DDPMScheduler, DDPMUNet
    from ddpm_hf.losses import make_loss
    from ddpm_hf.presets import unet_config

    scheduler = DDPMScheduler(variance_type=variance_type, prediction_type=prediction_type)
    config = unet_config("tiny-16")
    channels = config["in_channels"]
    config["out_channels"] = 2 * channels if variance_type.startswith("learned") else channels
    model = DDPMUNet(**config).to("meta")
    x0 = noise = torch.empty(4, channels, 16, 16, device="meta")
    t = torch.empty(4, dtype=torch.long, device="meta")
    x_t = scheduler.add_noise(x0, noise, t)
    loss_fn = make_loss(loss, scheduler, config["out_channels"], channels, snr_gamma)
    per_example = loss_fn(model(x_t, t).sample, x0, x_t, t, noise)
    per_example.mean().backward()
    assert per_example.shape == (4,) and per_example.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())


def test_timesteps_off_the_cpu_are_still_checked():
    """Timesteps on a device other than the CPU are checked there (an assertion the device raises at its next
    synchronisation) instead of indexing ᾱ from the end. The meta device runs no kernels, so the device-side check
    is run here on CPU tensors, where the same assertion raises at once; on the CPU the host check names them."""
    from ddpm_hf import DDPMScheduler

    scheduler = DDPMScheduler()
    for bad in ([-1, 5], [0, 1000], [2.5, 3.0]):
        with pytest.raises(RuntimeError, match="timesteps must"):
            scheduler._assert_timesteps(torch.tensor(bad))
        with pytest.raises(ValueError, match="timesteps must"):
            scheduler.add_noise(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.tensor(bad))
    assert torch.equal(scheduler._assert_timesteps(torch.tensor([0.0, 999.0])), torch.tensor([0, 999]))


def test_timesteps_on_the_device_go_through_the_device_check(monkeypatch):
    """Timesteps that stay on the device (meta here, like CUDA) are checked by the device-side assertion, 0-dim ones
    included, and never read back: the recorded assertions are the range check of every call."""
    from ddpm_hf import DDPMScheduler

    checks = []
    monkeypatch.setattr(torch, "_assert_async", lambda condition, message: checks.append(message))
    scheduler = DDPMScheduler()
    x = torch.empty(4, 1, 8, 8, device="meta")
    for t in (torch.empty(4, dtype=torch.long, device="meta"), torch.tensor(3, device="meta")):
        checks.clear()
        assert scheduler.add_noise(x, x, t).shape == x.shape
        assert checks == ["timesteps must lie in [0, 999] (num_train_timesteps=1000)"]
    variance, _ = scheduler.p_variance(x, torch.tensor(3, device="meta"))  # a 0-dim t indexes the table as it is
    assert variance.device.type == "meta" and variance.ndim == 0


def test_the_ema_pipeline_samples_on_the_training_device():
    """The grids, the bits/dim estimate and the saved pipeline of a GPU run come from a copy of the model on the GPU.
    The meta device stands in for it here: a copy built on the host would be a CPU module."""
    from ddpm_hf import DDPMScheduler, DDPMUNet
    from ddpm_hf.ema import EMA
    from runs import load_train_script

    train = load_train_script()
    model = DDPMUNet(**train.unet_config("tiny-16")).to("meta")
    pipe = train.ema_pipeline(model, EMA(model.parameters()), DDPMScheduler().config)
    assert pipe.device.type == "meta" and {p.device.type for p in pipe.unet.parameters()} == {"meta"}


def test_sampling_hands_the_network_its_timestep_on_the_device():
    """The reverse chain gives the network t on the sample's device, copied there once per chain: a host t would be
    copied to a GPU at every call, each copy waiting for every queued kernel, and keeps a compiled network's CUDA
    graphs out. The meta device stands in for the GPU: the pipeline runs there, and the network sees where t is."""
    from helpers import tiny_pipeline

    pipe = tiny_pipeline(num_train_timesteps=20)
    pipe.unet.to("meta")
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append((args[1].device.type, args[1].ndim)))
    for generator in (None, torch.Generator().manual_seed(0), [torch.Generator().manual_seed(i) for i in range(2)]):
        seen.clear()
        images = pipe(batch_size=2, num_inference_steps=5, generator=generator, output_type="pt").images
        assert images.device.type == "meta" and seen == [("meta", 0)] * 5


def test_sampling_keeps_no_reference_to_the_networks_output():
    """A network compiled with CUDA graphs overwrites its output tensor at its next call: what the chain hands on
    (the sample, and x̂_0 to callbacks) must not be that tensor. With x_0-prediction and no clipping, x̂_0 is the
    network's output as is, the case where it would be."""
    from helpers import tiny_pipeline

    pipe = tiny_pipeline(num_train_timesteps=20, prediction_type="sample", clip_sample=False)
    outputs, handed = [], []  # the tensors themselves: kept alive, their memory is not reused
    pipe.unet.register_forward_hook(lambda module, args, out: outputs.append(out.sample))

    def callback(pipe, i, t, tensors):
        handed.extend(tensors.values())
        return {}

    pipe(batch_size=2, num_inference_steps=5, callback_on_step_end=callback, output_type="pt",
         callback_on_step_end_tensor_inputs=["sample", "pred_original_sample"])
    memory = lambda tensors: {x.untyped_storage().data_ptr() for x in tensors}  # noqa: E731
    assert len(outputs) == 5 and len(handed) == 10 and not memory(outputs) & memory(handed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="checks CUDA synchronisations")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sampling_on_cuda_never_waits_for_the_gpu(dtype):
    """A chain on a GPU queues its work without waiting for it: torch's synchronisation debug mode turns every wait
    (a copy from pageable host memory, a read of a device value) into an error, for each way of drawing the noise
    (none, a host generator, one host generator per image as `ddpm-hf evaluate` draws them, a CUDA generator). With
    the network's output made exactly 0 the chain is the scheduler's arithmetic on the noise, so the host
    generators' samples must be the CPU chain's to float rounding: noise read before its copy arrived would not."""
    from helpers import tiny_pipeline

    from ddpm_hf.evaluation import prepare_sampling

    pipe = tiny_pipeline(num_train_timesteps=20)
    pipe.unet.conv_out.weight.data.zero_()
    pipe.unet.conv_out.bias.data.zero_()
    generators = {"host": lambda: torch.Generator().manual_seed(0),
                  "per image": lambda: [torch.Generator().manual_seed(i) for i in range(4)],
                  "none": lambda: None, "cuda": lambda: torch.Generator("cuda").manual_seed(0)}

    def sample(name):
        return pipe(batch_size=4, num_inference_steps=20, generator=generators[name](), output_type="pt").images

    on_cpu = {name: sample(name) for name in ("host", "per image")}
    pipe.to("cuda")
    prepare_sampling(pipe, dtype)
    for name in generators:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            images = sample(name)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert images.device.type == "cuda" and bool(torch.isfinite(images).all()), name
        if name in on_cpu:
            torch.testing.assert_close(images.cpu(), on_cpu[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the device's table lookup with the host's")
def test_noising_on_the_gpu_matches_the_cpu():
    """Eq. 4 and the bound's posterior with t on the GPU (ᾱ looked up in the device's copy of the table) give the
    CPU's numbers."""
    from ddpm_hf import DDPMScheduler

    scheduler = DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 3, 8, 8, generator=g), torch.randn(64, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    on_gpu = scheduler.add_noise(x0.cuda(), noise.cuda(), t.cuda())
    torch.testing.assert_close(on_gpu.cpu(), scheduler.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
    mean, variance, _ = scheduler.q_posterior_mean_variance(x0.double().cuda(), noise.double().cuda(), t.cuda())
    expected_mean, expected_variance, _ = scheduler.q_posterior_mean_variance(x0.double(), noise.double(), t)
    torch.testing.assert_close(mean.cpu(), expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(variance.cpu(), expected_variance, rtol=1e-12, atol=1e-12)
    with_first = torch.cat([torch.tensor([0]), t[1:]])  # the first step's variance is a special case
    for kind in ("fixed_small", "fixed_large"):
        on_gpu, _ = scheduler.p_variance(x0.cuda(), with_first.cuda(), variance_type=kind)
        torch.testing.assert_close(on_gpu.cpu(), scheduler.p_variance(x0, with_first, variance_type=kind)[0])
    one = torch.tensor(500)  # one timestep for the whole batch, as sampling passes it
    torch.testing.assert_close(scheduler.add_noise(x0.cuda(), noise.cuda(), one.cuda()).cpu(),
                               scheduler.add_noise(x0, noise, one), rtol=1e-6, atol=1e-6)


def test_group_norm_in_the_autocast_dtype(monkeypatch):
    """The speed choice of ddpm_hf.unet.GroupNorm: on a device type in ``autocast_dtype_on``, under autocast, the
    norm runs in the autocast dtype: its output is group norm of the input rounded to bf16, computed in float32 and
    rounded once more (to within one bf16 rounding of it). Off that list, under autocast or not, it is
    ``nn.GroupNorm`` exactly. (CPU autocast leaves a float32 input in float32, as CUDA autocast does for every
    group norm: the case the choice is for.)"""
    from ddpm_hf.unet import GroupNorm

    torch.manual_seed(0)
    norm = GroupNorm(4, 16, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 16, 8, 8) * 3 + 1
    exact = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, 1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(norm(x), exact)
    monkeypatch.setattr(GroupNorm, "autocast_dtype_on", {"cpu"})
    assert torch.equal(norm(x), exact)  # outside autocast: unchanged
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = norm(x)
    assert fast.dtype == torch.bfloat16
    rounded = lambda v: v.bfloat16().float()  # noqa: E731
    expected = rounded(torch.nn.functional.group_norm(rounded(x), 4, rounded(norm.weight), rounded(norm.bias), 1e-6))
    torch.testing.assert_close(fast.float(), expected, rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast computes group norm in float32")
def test_group_norm_in_the_autocast_dtype_keeps_the_unet_output(monkeypatch):
    """The whole U-Net in bf16 autocast on the GPU, its norms given random affine maps: with the norms in bf16 its
    output is as close to the float32 network's as with autocast's float32 norms (within twice their error), where
    a norm with the wrong groups, or one that dropped its affine map, lands far off."""
    from ddpm_hf import DDPMUNet
    from ddpm_hf.presets import unet_config
    from ddpm_hf.unet import GroupNorm

    torch.manual_seed(0)
    config = unet_config("small-32")
    model = DDPMUNet(**config).cuda().eval()  # no dropout: every call sees the same network
    for norm in (m for m in model.modules() if isinstance(m, GroupNorm)):
        torch.nn.init.normal_(norm.weight, 1.0, 0.5)
        torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    x = torch.randn(8, config["in_channels"], 32, 32, device="cuda")
    t = torch.randint(0, 1000, (8,), device="cuda")
    exact = model(x, t).sample
    with torch.autocast("cuda", dtype=torch.bfloat16):
        autocast_error = (model(x, t).sample.float() - exact).abs().max()
        monkeypatch.setattr(GroupNorm, "autocast_dtype_on", {"cuda"})
        fast_error = (model(x, t).sample.float() - exact).abs().max()
    assert 0 < autocast_error and fast_error <= 2 * autocast_error
