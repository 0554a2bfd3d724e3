"""Faults injected into real training runs: SIGKILLs at random points (during a step, a checkpoint write, a Hub
upload) with a resume after each, a kill at every step of the final save, a real full disk (tmpfs) during a
checkpoint, a sample grid and the final pipeline, a file-size limit, and NaN losses."""

import datetime
import gc
import hashlib
import logging
import random
import re
import resource
import shutil
import sys
from pathlib import Path

import pytest
import torch

from runs import (FAST, KILL_POINTS, check_checkpoints, child_env, final_weights, hold_publishing, kill_at, launch, run,
                  write_images)

HERE = Path(__file__).resolve().parent
ALICE = "hf_test_alice"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.hub
def test_five_random_kills_with_resume_end_with_the_uninterrupted_weights(images, tmp_path, hub):
    # (96 steps: a kill is to land before the run's end, also on a loaded machine where an upload's requests are slow)
    args = FAST + ["--dataset_name", str(images), "--max_train_steps", "96", "--checkpointing_steps", "12",
                   "--checkpoints_total_limit", "2"]
    run(args + ["--output_dir", str(tmp_path / "straight")], tmp_path / "straight.log")

    # The Hub holds every upload for a moment, so that a kill can land in the middle of one.
    upload = hub.inject("POST", "/commit/", "stall", times=-1, seconds=1.0)
    out = tmp_path / "killed"
    hub_args = ["--push_to_hub", "--push_checkpoints", "--hub_model_id", "alice/killed", "--hub_token", ALICE]
    rng = random.Random(8)
    points = rng.sample(KILL_POINTS * 2, 5)
    hits, after_kill = [], []
    for i, point in enumerate(points):
        (out / "run_info.json").unlink(missing_ok=True)
        resume = ["--resume_from_checkpoint", "latest"] if i else []
        log = tmp_path / f"killed-{i}.log"
        proc = launch(args + hub_args + resume + ["--output_dir", str(out)], log)
        hits.append(kill_at(proc, point, out, rng, upload_fault=upload))
        if i:  # each relaunch resumed from the newest visible checkpoint, not from scratch (same final weights!)
            latest = after_kill[-1][-1] if after_kill[-1] else None
            expected = (f"resumed from {out / latest} at step {latest.split('-')[1]}" if latest
                        else f"no checkpoint in {out}: starting from scratch")
            assert expected in log.read_text(), f"launch {i}: expected {expected!r} in {log}"
        after_kill.append(check_checkpoints(out))  # the visible checkpoints all load, whatever the kill hit
        assert not (out / "model_index.json").exists()
    assert hits == points, f"runs ended before their kill: {hits} (log: {tmp_path / 'killed.log'})"
    assert any(after_kill), "no checkpoint was ever written"

    run(args + hub_args + ["--resume_from_checkpoint", "latest", "--output_dir", str(out)], tmp_path / "killed.log")
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(out)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)
    assert check_checkpoints(out) == ["checkpoint-84", "checkpoint-96"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no half-written leftovers

    leaks = [f for f in [*tmp_path.glob("killed*.log"), *out.rglob("*")] if f.is_file() and ALICE.encode() in f.read_bytes()]
    assert not leaks, f"the token was written to {leaks}"

    # What the Hub ended with is the final pipeline, whole
    from ddpm_hf import DDPMPipeline

    pushed = DDPMPipeline.from_pretrained("alice/killed", token=ALICE, cache_dir=tmp_path / "cache")
    for key, value in pushed.unet.state_dict().items():
        torch.testing.assert_close(value, resumed[key], rtol=0, atol=0, msg=key)


@pytest.mark.hub
def test_a_kill_during_the_final_upload_is_finished_by_the_resume(images, tmp_path, hub):
    # The last checkpoint is written, then the process dies while uploading: resuming at the end must still publish.
    upload = hub.inject("POST", "/commit/", "stall", times=1, seconds=3.0)
    out = tmp_path / "run"
    args = FAST + ["--dataset_name", str(images), "--max_train_steps", "4", "--checkpointing_steps", "2",
                   "--push_to_hub", "--hub_model_id", "alice/final", "--hub_token", ALICE, "--output_dir", str(out)]
    proc = launch(args, tmp_path / "run.log")
    assert kill_at(proc, "upload", out, random.Random(0), upload_fault=upload) == "upload"
    assert check_checkpoints(out)[-1] == "checkpoint-4"
    run(args + ["--resume_from_checkpoint", "latest"], tmp_path / "run.log")
    assert "checkpoint-4 at step 4" in (tmp_path / "run.log").read_text()
    from ddpm_hf import DDPMPipeline

    pushed = DDPMPipeline.from_pretrained("alice/final", token=ALICE, cache_dir=tmp_path / "cache")
    local = final_weights(out)
    for key, value in pushed.unet.state_dict().items():
        torch.testing.assert_close(value, local[key], rtol=0, atol=0, msg=key)


def _file_size_limit(limit_bytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_why(images, tmp_path, train_here, caplog):
    args = FAST + ["--dataset_name", str(images), "--checkpointing_steps", "4", "--output_dir", str(tmp_path / "run")]
    train_here(args + ["--max_train_steps", "8"])
    before = _digest(tmp_path / "run" / "checkpoint-8")
    pipeline_before = _digest(tmp_path / "run" / "unet")

    # Files may grow to 1 MiB: the model (0.7 MB) is written, the optimizer state (1.4 MB) is not. (A launched run:
    # the limit would hold for the test process too.)
    log = tmp_path / "full.log"
    code = run(args + ["--max_train_steps", "16", "--resume_from_checkpoint", "latest"], log,
               preexec_fn=_file_size_limit(2**20), expect_ok=False)
    text = log.read_text()
    assert code != 0
    assert f"could not write {tmp_path / 'run' / 'checkpoint-12'}" in text, text[-3000:]
    assert "may not write files over 1048576 bytes (ulimit -f)" in text
    assert "checkpoint-8 is intact" in text and "--resume_from_checkpoint latest" in text
    assert _digest(tmp_path / "run" / "checkpoint-8") == before
    assert check_checkpoints(tmp_path / "run") == ["checkpoint-4", "checkpoint-8"]
    assert not (tmp_path / "run" / ".checkpoint-12.tmp").exists()
    assert _digest(tmp_path / "run" / "unet") == pipeline_before  # the first run's result, untouched

    # With space again, the run resumes from checkpoint-8 and finishes (exactness of resuming: the kill test above).
    with caplog.at_level("INFO", logger="ddpm_hf.train"):
        train_here(args + ["--max_train_steps", "16", "--resume_from_checkpoint", "latest"])
    assert f"resumed from {tmp_path / 'run' / 'checkpoint-8'} at step 8" in caplog.text
    assert check_checkpoints(tmp_path / "run") == ["checkpoint-8", "checkpoint-12", "checkpoint-16"]


def test_a_checkpoint_is_published_while_the_next_steps_train(images, tmp_path, train_here, monkeypatch):
    """The main process saves the checkpoint's pipeline, flushes and publishes each checkpoint in a thread of its own
    while training goes on. The publishing of checkpoint-4 is held from its start until the run has made two more
    steps (counted by the EMA's updates): were the publishing in the training loop, the steps could not come and the
    hold would time out (20 s). The published checkpoint holds step 4 all the same: its pipeline (copied before the
    thread starts, not by it after the steps) equals the final pipeline of a 4-step run, weight for weight."""
    args = FAST + ["--dataset_name", str(images), "--checkpointing_steps", "4"]
    train_here(args + ["--max_train_steps", "4", "--output_dir", str(tmp_path / "four")])

    held = hold_publishing(monkeypatch, "checkpoint-4", until_step=6)
    out = tmp_path / "eight"
    train_here(args + ["--max_train_steps", "8", "--output_dir", str(out)])
    assert held == [True], "the training loop waited for the checkpoint's flush"
    assert check_checkpoints(out) == ["checkpoint-4", "checkpoint-8"]
    four = final_weights(tmp_path / "four")
    published = final_weights(out / "checkpoint-4" / "pipeline")
    assert four.keys() == published.keys() and all(torch.equal(published[k], v) for k, v in four.items())


def test_a_checkpoint_whose_publishing_fails_stops_the_run_naming_it(images, tmp_path, train_here, monkeypatch):
    """A flush that fails in the publishing thread (ENOSPC, as a full disk's delayed write gives it) stops the run by
    the next checkpoint at the latest, with the path, the reason and the checkpoint intact; the half-written folder is
    removed and no final pipeline is written."""
    import errno

    import ddpm_hf.checkpoints

    flush = ddpm_hf.checkpoints.fsync_tree

    def failing_flush(folder):
        if folder.name == ".checkpoint-8.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        return flush(folder)

    monkeypatch.setattr(ddpm_hf.checkpoints, "fsync_tree", failing_flush)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train_here(FAST + ["--dataset_name", str(images), "--checkpointing_steps", "4", "--max_train_steps", "12",
                           "--output_dir", str(out)])
    message = str(stop.value.code)
    assert message.startswith(f"could not write {out / 'checkpoint-8'} (") and "the disk is full" in message, message
    assert "The checkpoint checkpoint-4 is intact" in message, message
    assert check_checkpoints(out) == ["checkpoint-4"] and not [p for p in out.glob(".*")]
    assert not (out / "model_index.json").exists()


def test_sigterm_while_a_checkpoint_is_published_finishes_it_then_stops(images, tmp_path):
    """A scheduler's SIGTERM, or torch's launcher ending the other processes once one has failed, arrives while the
    main process publishes a checkpoint in the background (its flush held 3 s, tests/faults/slow_publish.py): the
    process unwinds, the interpreter finishes the publishing before it exits (status 143 = 128 + SIGTERM), and the
    checkpoint is there to resume from, nothing half written left. (SIGTERM's default killed the process at once,
    the checkpoint with it.)"""
    import os
    import signal
    import subprocess
    import time

    out, publishing = tmp_path / "run", tmp_path / "publishing"
    env = child_env(DDPM_HF_SLOW_PUBLISH="4", DDPM_HF_SLOW_PUBLISH_S="3", DDPM_HF_PUBLISHING=str(publishing))
    with open(tmp_path / "run.log", "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, str(HERE / "slow_publish.py"), *FAST, "--dataset_name", str(images), "--max_train_steps",
             "100000", "--checkpointing_steps", "4", "--dataloader_num_workers", "0", "--output_dir", str(out)],
            stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not publishing.exists():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        process.kill()
    assert code == 128 + signal.SIGTERM, (code, (tmp_path / "run.log").read_text()[-3000:])
    assert check_checkpoints(out) == ["checkpoint-4"] and not [p for p in out.glob(".*")]
    assert not (out / "model_index.json").exists()


def test_an_old_checkpoint_that_cannot_be_removed_is_said_and_the_run_goes_on(images, tmp_path, train_here, monkeypatch,
                                                                              caplog):
    """With --checkpoints_total_limit 1, removing checkpoint-4 fails once checkpoint-8 is in place (EBUSY, as a file
    held open on a network filesystem gives it): a warning says so and the run finishes; it is not reported as a
    failed write of checkpoint-8, which is whole."""
    import errno

    import ddpm_hf.checkpoints

    delete = ddpm_hf.checkpoints.delete_folder

    def busy(folder):
        if folder.name == "checkpoint-4":
            raise OSError(errno.EBUSY, "Device or resource busy", str(folder))
        return delete(folder)

    monkeypatch.setattr(ddpm_hf.checkpoints, "delete_folder", busy)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="ddpm_hf.checkpoints"):
        train_here(FAST + ["--dataset_name", str(images), "--checkpointing_steps", "4", "--checkpoints_total_limit",
                           "1", "--max_train_steps", "8", "--output_dir", str(out)])
    assert "could not remove an old checkpoint" in caplog.text and "could not write" not in caplog.text
    assert check_checkpoints(out) == ["checkpoint-4", "checkpoint-8"] and (out / "model_index.json").exists()


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous(images, tmp_path):
    args = FAST + ["--dataset_name", str(images), "--checkpointing_steps", "4", "--output_dir", str(tmp_path / "run")]
    run(args + ["--max_train_steps", "8"], tmp_path / "first.log")
    optimizer = tmp_path / "run" / "checkpoint-8" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])  # a disk error after the fact
    log = tmp_path / "resume.log"
    run(args + ["--max_train_steps", "10", "--resume_from_checkpoint", "latest"], log)
    text = log.read_text()
    assert "checkpoint-8 is unreadable" in text and "resumed from" in text and "checkpoint-4 at step 4" in text
    assert check_checkpoints(tmp_path / "run") == ["checkpoint-4", "checkpoint-8", "checkpoint-10"]  # 8 rewritten

    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    code = run(args + ["--max_train_steps", "12", "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-8")],
               tmp_path / "named.log", expect_ok=False)
    assert code != 0 and "checkpoint-8 is unreadable" in (tmp_path / "named.log").read_text()


def _inject_nan(args, log, steps, ranks="0", processes=1, expect_ok=True):
    """train.py with the loss made NaN at the given loss evaluations on the given ranks (tests/faults/inject_nan.py)."""
    env = child_env(DDPM_HF_NAN_AT=",".join(map(str, steps)), DDPM_HF_NAN_RANKS=ranks)
    command = [str(HERE / "inject_nan.py"), *args]
    if processes > 1:
        from runs import free_port

        env["ACCELERATE_USE_CPU"] = "1"
        command = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--main_process_port", str(free_port()), *command]
    import subprocess

    with open(log, "ab") as sink:
        code = subprocess.run([sys.executable, *command], stdout=sink, stderr=subprocess.STDOUT, env=env,
                              cwd=log.parent, timeout=600).returncode
    if expect_ok and code != 0:
        raise AssertionError(f"exited {code}:\n{log.read_text()[-6000:]}")
    return code, log.read_text()


def test_nan_losses_are_skipped_and_counted(images, tmp_path):
    out = tmp_path / "run"
    args = FAST + ["--dataset_name", str(images), "--max_train_steps", "10", "--checkpointing_steps", "5",
                   "--output_dir", str(out)]
    _, text = _inject_nan(args, tmp_path / "nan.log", steps=[3, 7, 8])
    assert "non-finite loss or gradient at step 3: update skipped (1 in a row, 1 in all)" in text
    assert "non-finite loss or gradient at step 6: update skipped (2 in a row, 3 in all)" in text
    assert check_checkpoints(out) == ["checkpoint-5", "checkpoint-10"]  # 10 real updates in 13 batches
    weights = final_weights(out)
    assert all(torch.isfinite(w).all() for w in weights.values())
    optimizer = torch.load(out / "checkpoint-10" / "optimizer.bin", weights_only=False)
    assert all(torch.isfinite(v).all() for s in optimizer["state"].values() for v in s.values()
               if isinstance(v, torch.Tensor)), "a NaN reached Adam's moments"


def test_nan_losses_in_a_row_stop_the_run_with_the_last_checkpoint_intact(images, tmp_path):
    out = tmp_path / "run"
    args = FAST + ["--dataset_name", str(images), "--max_train_steps", "10", "--checkpointing_steps", "2",
                   "--max_nonfinite_steps", "3", "--output_dir", str(out)]
    code, text = _inject_nan(args, tmp_path / "nan.log", steps=[5, 6, 7], expect_ok=False)
    assert code != 0
    assert "3 non-finite losses in a row at step 5" in text and "lower --learning_rate" in text
    assert check_checkpoints(out) == ["checkpoint-2", "checkpoint-4"] and not (out / "model_index.json").exists()


def _count_on_the_device(train, monkeypatch, nan_at):
    """train.py with AdamW fused on the CPU too (as on CUDA: a non-finite update is skipped on the device and
    counted by the host later) and NaN losses at the loss evaluations ``nan_at`` of each run (a set the caller may
    change between runs); returns the log of events: "l" a loss evaluation, "r" the host reading an outcome."""
    monkeypatch.setattr(train, "FUSED_ADAMW_ON", {"cpu", "cuda"})
    events, real_make_loss, real_finite = [], train.make_loss, train.Update.finite

    def make_loss(*args, **kwargs):
        loss, calls = real_make_loss(*args, **kwargs), [0]

        def poisoned(*inputs):
            calls[0] += 1
            events.append("l")
            value = loss(*inputs)
            return value * float("nan") if calls[0] in nan_at else value

        return poisoned

    monkeypatch.setattr(train, "make_loss", make_loss)
    monkeypatch.setattr(train.Update, "finite", lambda update: events.append("r") or real_finite(update))
    return events


def test_updates_skipped_on_the_device_are_counted_as_on_the_host(images, tmp_path, train, train_here, monkeypatch,
                                                                   caplog):
    """A fused optimizer (CUDA's) skips a non-finite update on the device; the host reads the outcome after queueing
    the next step, or at once when something is due after the step (logs, a checkpoint, the end). Oracle: the same
    run with every outcome read at once (--logging_steps 1): the same warnings, checkpoints and weights bit for bit,
    with NaN losses at three loss evaluations, two of them in a row; and a resume from the late-read run's
    checkpoint ends with its weights (a checkpoint written while an outcome was still unread would not). The order
    of events shows the late readings: a loss, the next loss, then the first one's outcome."""
    nan_at = {3, 7, 8}
    events = _count_on_the_device(train, monkeypatch, nan_at)
    args = FAST + ["--dataset_name", str(images), "--max_train_steps", "10", "--checkpointing_steps", "5"]
    runs = {}
    for logging_steps in (1, 4):
        events.clear()
        caplog.clear()
        out = tmp_path / f"logging-{logging_steps}"
        train_here(args + ["--logging_steps", str(logging_steps), "--output_dir", str(out)])
        warnings = [r.getMessage() for r in caplog.records if "non-finite loss" in r.getMessage()]
        runs[logging_steps] = (final_weights(out), warnings, "".join(events), check_checkpoints(out))
    (weights, warnings, order, checkpoints), (late_weights, late_warnings, late_order, late_checkpoints) = runs.values()
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "logging-4" / "checkpoint-5", resumed / "checkpoint-5")
    nan_at.clear()
    nan_at.update({1, 2})  # the 7th and 8th loss evaluations of the run, counted from the checkpoint at step 5
    train_here(args + ["--logging_steps", "4", "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    resumed_weights = final_weights(resumed)
    # bit for bit on the CPU; on CUDA (bench/gpu.sh runs this test there) to float rounding, cuDNN choosing its
    # algorithms by timing them
    close = {"rtol": 0, "atol": 1e-5 if torch.cuda.is_available() else 0}
    for key in late_weights:
        torch.testing.assert_close(resumed_weights[key], late_weights[key], **close, msg=key)
        torch.testing.assert_close(weights[key], late_weights[key], **close, msg=key)
    assert warnings == late_warnings and len(warnings) == 3
    assert "non-finite loss or gradient at step 3: update skipped (1 in a row, 1 in all)" in warnings[0]
    assert "non-finite loss or gradient at step 6: update skipped (2 in a row, 3 in all)" in warnings[2]
    assert checkpoints == late_checkpoints == ["checkpoint-5", "checkpoint-10"]  # 10 updates in 13 batches
    assert weights.keys() == late_weights.keys() == resumed_weights.keys()
    assert order == "lr" * 13 and late_reads(late_order) >= 6, late_order


def late_reads(order: str) -> int:
    """How many outcomes were read after a later loss had been computed ("l": a loss, "r": a reading)."""
    losses = reads = late = 0
    for event in order:
        losses, reads = losses + (event == "l"), reads + (event == "r")
        late += event == "r" and losses > reads
    return late


def test_nan_losses_in_a_row_counted_late_stop_the_run_at_the_same_step(images, tmp_path, train, train_here,
                                                                        monkeypatch):
    """The stop after --max_nonfinite_steps non-finite updates in a row comes at the same step when the device
    decides them and the host counts them late, and the last checkpoint is intact."""
    events = _count_on_the_device(train, monkeypatch, nan_at={5, 6, 7})
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="3 non-finite losses in a row at step 5"):
        train_here(FAST + ["--dataset_name", str(images), "--max_train_steps", "10", "--checkpointing_steps", "2",
                           "--logging_steps", "10", "--max_nonfinite_steps", "3", "--output_dir", str(out)])
    assert check_checkpoints(out) == ["checkpoint-2", "checkpoint-4"] and not (out / "model_index.json").exists()
    assert late_reads("".join(events)) >= 3  # the three skips at step 5 were counted late


@pytest.mark.distributed
def test_a_nan_on_one_rank_is_skipped_by_every_rank(images, tmp_path):
    out = tmp_path / "run"
    args = FAST + ["--dataset_name", str(images), "--max_train_steps", "6", "--checkpointing_steps", "0",
                   "--output_dir", str(out)]
    _, text = _inject_nan(args, tmp_path / "nan.log", steps=[3], ranks="1", processes=2)
    # the warning is logged by both processes, for the same step: they skipped the same update and stayed in sync
    assert text.count("non-finite loss or gradient at step 3: update skipped (1 in a row, 1 in all)") == 2, text[-4000:]
    assert all(torch.isfinite(w).all() for w in final_weights(out).values())


def test_leftovers_of_a_crash_are_cleaned_and_a_swapped_out_folder_restored(train, tmp_path):
    # The states a kill can leave behind, made by hand: a half-written checkpoint, a half-deleted one, and a pipeline
    # folder moved aside for a swap whose new version never arrived.
    (tmp_path / ".checkpoint-12.tmp").mkdir()
    (tmp_path / ".checkpoint-12.tmp" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".checkpoint-4.trash").mkdir()
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / ".pipeline.old").mkdir()
    (tmp_path / ".pipeline.old" / "model_index.json").write_text("{}")
    (tmp_path / ".checkpoint-8.old").mkdir()  # checkpoint-8 exists: the old copy is stale
    (tmp_path / ".cache.tmp").mkdir()  # not ours: left alone
    (tmp_path / ".shared-0123456789abcdef").write_text("host")  # the shared-folder check's marker of a killed start
    (tmp_path / ".shared-notes").write_text("mine")  # not ours: left alone
    (tmp_path / ".shared-fedcba9876543210").mkdir()  # named like a marker, but a folder: not ours
    train.recover_folders(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.tmp", ".shared-fedcba9876543210", ".shared-notes",
                                                          "checkpoint-8", "pipeline"]
    assert (tmp_path / "pipeline" / "model_index.json").read_text() == "{}"


class Killed(BaseException):
    """The process dies here: nothing after it runs (not an Exception, so no handler of ours sees it)."""


def test_a_kill_at_any_step_of_the_final_save_leaves_the_old_pipeline_the_new_one_or_none(tmp_path, monkeypatch):
    import json
    import os
    import shutil

    from ddpm_hf import DDPMPipeline
    from ddpm_hf.checkpoints import recover_folders, save_pipeline
    from helpers import tiny_pipeline

    # the old pipeline is a remote-code folder, the new one a plain diffusers folder: the old module file must go too
    old_variance, new_variance = "fixed_large_log", "fixed_small"
    old, new = tiny_pipeline(seed=0, variance_type=old_variance), tiny_pipeline(seed=1, variance_type=new_variance)
    weights = {name: p.unet.state_dict() for name, p in (("old", old), ("new", new))}

    def which(out):
        """The pipeline that --output_dir loads as: 'old' or 'new' (all of it), or None without model_index.json."""
        if not (out / "model_index.json").exists():
            return None
        index = json.loads((out / "model_index.json").read_text())
        if isinstance(index["_class_name"], list):  # remote code: its module must be there
            assert (out / index["_class_name"][0]).with_suffix(".py").is_file()
        loaded = DDPMPipeline.from_pretrained(out)
        for name, state in weights.items():
            if all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in state.items()):
                assert loaded.scheduler.config.variance_type == (old_variance if name == "old" else new_variance)
                assert json.loads((out / "training_config.json").read_text()) == {"run": name}
                return name
        raise AssertionError(f"{out} loads weights that are neither the old nor the new pipeline's")

    # Every rename and deletion is a point where a kill can land: count them in an undisturbed save, then kill at each.
    calls = []
    real = {"replace": os.replace, "unlink": os.unlink, "rmdir": os.rmdir, "rmtree": shutil.rmtree}

    def watch(name, kill_at):
        def operation(*args, **kwargs):
            calls.append(name)
            if len(calls) == kill_at:
                raise Killed
            return real[name](*args, **kwargs)
        return operation

    def save_new(out, kill_at=None):
        for module, name in ((os, "replace"), (os, "unlink"), (os, "rmdir"), (shutil, "rmtree")):
            monkeypatch.setattr(module, name, watch(name, kill_at))
        try:
            save_pipeline(new, out, {"run": "new"})
        finally:
            monkeypatch.undo()

    reference = tmp_path / "undisturbed"
    save_pipeline(old, reference, {"run": "old"})
    calls.clear()
    save_new(reference)
    assert which(reference) == "new"
    kill_points = len(calls)
    save_pipeline(old, tmp_path / "old", {"run": "old"})
    listing = {name: [p.name for p in (tmp_path / folder).iterdir()] for name, folder in (("old", "old"),
                                                                                          ("new", "undisturbed"))}
    seen = set()
    for kill_at in range(1, kill_points + 1):
        out = tmp_path / f"killed-{kill_at}"
        save_pipeline(old, out, {"run": "old"})
        (out / "checkpoint-4").mkdir()
        (out / "checkpoint-4" / "model.safetensors").write_bytes(b"weights")
        calls.clear()
        with pytest.raises(Killed):
            save_new(out, kill_at)
        seen.add(which(out))  # the old pipeline, the new one, or nothing that loads: never a mixture
        complete = (out / ".pipeline.ready").exists() or (out / ".pipeline.moving").exists()
        recover_folders(out)  # the next start: a new pipeline that was whole on disk is moved in, else the old stays
        expected = "new" if complete else "old"
        assert which(out) == expected, f"killed at operation {kill_at} ({calls[-1]}): not {expected} after a restart"
        assert sorted(p.name for p in out.iterdir()) == sorted(listing[expected] + ["checkpoint-4"])
        assert (out / "checkpoint-4" / "model.safetensors").read_bytes() == b"weights"
    assert seen == {"old", None, "new"}, seen  # the kills landed before, during and after the switch


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs mounted for the test: a real disk that fills up (ENOSPC from the kernel). Mounting needs root;
    where it is refused the test is skipped, saying why. Always unmounted afterwards."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True,
                                 text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("no mount command here: a real full disk needs a tmpfs")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs was refused (a real full disk needs root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        gc.collect()  # files a failed write left open, held by the traceback of the error the test caught
        if subprocess.run(["umount", str(disk)], capture_output=True, timeout=60).returncode != 0:
            # still in use (a failed test's traceback holds a file): detached now, freed when the file closes
            subprocess.run(["umount", "--lazy", str(disk)], check=True, timeout=60)


def _link(fd: Path) -> str:
    """Where an entry of /proc/self/fd points, or '' when it closed in the meantime."""
    import os

    try:
        return os.readlink(fd)
    except OSError:
        return ""


def _leave_room(disk: Path, room: int) -> None:
    """Fill ``disk`` with a ballast file until the kernel refuses (ENOSPC), then give ``room`` bytes back."""
    import errno
    import os

    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, bytes(2**16))
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)
    os.truncate(ballast, max(ballast.stat().st_size - room, 0))


def test_a_full_disk_at_a_checkpoint_a_sample_grid_and_the_final_pipeline_then_an_exact_resume(
        train_here, images, small_disk, tmp_path):
    """Each write hits a real ENOSPC in the middle: the run stops naming the path and the free space, leaves no
    partial file or folder, keeps the last checkpoint; with room again it resumes to the uninterrupted weights."""
    import os
    import shutil

    from ddpm_hf.checkpoints import size_text

    args = FAST + ["--dataset_name", str(images), "--max_train_steps", "8", "--checkpointing_steps", "4",
                   "--save_images_steps", "6"]
    straight = tmp_path / "straight"
    train_here(args + ["--output_dir", str(straight)])

    block = os.statvfs(small_disk).f_frsize  # what the tmpfs charges a file: whole blocks

    def used(*paths):
        files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
        return sum(-(-f.stat().st_size // block) * block for f in files)

    checkpoint, grid = used(straight / "checkpoint-8"), used(straight / "samples" / "step-0000006.png")
    pipeline = used(*[straight / part for part in ("model_index.json", "unet", "scheduler", "training_config.json")])
    out = small_disk / "run"

    def stops(room: int, path: str, intact: str) -> None:
        _leave_room(small_disk, room)
        with pytest.raises(SystemExit) as stop:
            train_here(args + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
        message = str(stop.value.code)
        free = shutil.disk_usage(small_disk).free  # the oracle: the room left once the run has stopped
        assert message.startswith(f"could not write {path} ("), message
        assert f"the disk is full ({size_text(free)} free in {out}" in message, message
        assert f"The checkpoint {intact} is intact: make room, then resume" in message, message
        assert not [p for p in out.rglob(".*")], "a partial file or folder was left behind"
        assert not (out / "model_index.json").exists()
        # torch.save leaves its file open when the disk fills (its zip writer's exit fails before the close): the
        # caught error's traceback holds it, deleted but still charged to the disk, in a cycle through this frame's
        # `stop`. A stopped run's process exits and frees it; here, in-process, free it now, or a garbage collection
        # at a random moment of the next run gives that run the room of half a checkpoint (CI saw it).
        del stop
        gc.collect()
        held = [target for target in map(_link, Path("/proc/self/fd").iterdir()) if str(small_disk) in target]
        assert not held, f"files on the small disk still open: {held}"

    # 1. checkpoint-8 finds room for half of itself (after run_info.json, checkpoint-4 and the grid of step 6)
    stops(block + checkpoint + grid + checkpoint // 2, str(out / "checkpoint-8"), "checkpoint-4")
    assert check_checkpoints(out) == ["checkpoint-4"]
    kept = _digest(out / "checkpoint-4")
    # 2. no room at all: the grid of step 6 (resumed from checkpoint-4) cannot be written; the earlier one stays whole
    grid_before = (out / "samples" / "step-0000006.png").read_bytes()
    stops(0, str(out / "samples" / "step-0000006.png"), "checkpoint-4")
    assert (out / "samples" / "step-0000006.png").read_bytes() == grid_before and _digest(out / "checkpoint-4") == kept
    # 3. room for checkpoint-8 and the grids, half the pipeline: the final save fails, checkpoint-8 is whole
    stops(checkpoint + 2 * grid + pipeline // 2, f"the final pipeline into {out}", "checkpoint-8")
    assert check_checkpoints(out) == ["checkpoint-4", "checkpoint-8"] and _digest(out / "checkpoint-4") == kept
    # 4. space freed: the resume (at the end) writes the final pipeline, bit for bit the uninterrupted run's
    (small_disk / "ballast").unlink()
    train_here(args + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    expected, resumed = final_weights(straight), final_weights(out)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(resumed[k], v) for k, v in expected.items()), "the resumed weights differ"
    assert not [p for p in out.rglob(".*")]


def test_a_resume_with_other_data_streams_or_shuffle_stops_naming_the_flag(images, tmp_path, train_here):
    """A checkpoint written with --data_streams 2 is readable but resumes no run of 1 stream, nor one of another
    --seed or --shuffle_buffer_size: the resume stops with the flag to pass, instead of calling the checkpoints
    unreadable one after the other, or going on with other rows."""
    out = tmp_path / "run"
    args = FAST + ["--dataset_name", str(images), "--checkpointing_steps", "1", "--output_dir", str(out)]
    train_here(args + ["--max_train_steps", "2", "--data_streams", "2"])
    with pytest.raises(SystemExit, match=r"cannot resume from .*checkpoint-2: the checkpoint read the data as 2 data "
                                         r"streams, this run as 1: resume with --data_streams 2"):
        train_here(args + ["--max_train_steps", "3", "--data_streams", "1", "--resume_from_checkpoint", "latest"])
    # another shuffle: the checkpoint's positions would name other rows (examples seen twice, others never)
    for flag, value in (("--seed", "1"), ("--shuffle_buffer_size", "8")):
        with pytest.raises(SystemExit, match=rf"cannot resume from .*checkpoint-2: the checkpoint's run shuffled the "
                                             rf"data with {flag} \d+, this run with {value}: resume with {flag} \d+"):
            train_here(args + ["--max_train_steps", "3", "--data_streams", "2", flag, value,
                               "--resume_from_checkpoint", "latest"])
    assert check_checkpoints(out) == ["checkpoint-1", "checkpoint-2"]


def test_the_processes_wait_for_each_other_as_long_as_ddp_timeout_says(train, tmp_path):
    """The other processes wait for the main one at a barrier while it samples, estimates bits/dim, saves and uploads;
    torch gives NCCL 10 minutes before it stops them, less than an upload with retries may take. The process group is
    made with --ddp_timeout (30 minutes by default), the handler accelerate passes to init_process_group."""
    for argv, seconds in (([], 1800), (["--ddp_timeout", "7200"], 7200)):
        accelerator = train.make_accelerator(train.parse_args(argv + ["--output_dir", str(tmp_path)]))
        assert accelerator.init_handler.to_kwargs() == {"timeout": datetime.timedelta(seconds=seconds)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_a_gpu_checkpoints_noise_state_resumed_without_a_gpu_is_refused_naming_why(train):
    """A GPU run's diffusion noise comes from CUDA generators, whose state (seed and offset, 16 bytes) no CPU
    generator can take: the resume stops saying so (before, set_state failed and the checkpoint was called
    unreadable). A CPU generator's state still resumes, exactly."""
    from ddpm_hf.errors import ResumeMismatch

    loop = train.LoopState([0, 1], 4, 0, torch.device("cpu"))
    saved = {"step": 7, "noise": {0: torch.zeros(16, dtype=torch.uint8), 1: torch.zeros(16, dtype=torch.uint8)}}
    with pytest.raises(ResumeMismatch, match="came from a GPU's generator.*resume it on a GPU"):
        loop.load_state_dict(saved)
    other = train.LoopState([0, 1], 4, 3, torch.device("cpu"))
    other.generators[0].manual_seed(11)
    loop.load_state_dict(other.state_dict())
    assert torch.equal(loop.generators[0].get_state(), other.generators[0].get_state()) and loop.step == 0


def test_the_bits_per_dim_estimate_reads_its_split_before_training(tmp_path, train_here):
    """--eval_steps estimates bits/dim on the first 64 images of --eval_split (test by default), read once before
    training: a dataset without that split stops the run before its first step, naming the flag (it ended the run at
    step --eval_steps, and at each one after a resume). With a split it has, the estimate is logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_images(tmp_path / "dataset" / "data", count=96)  # data/train-*.parquet: a train split only
    out = tmp_path / "no-test-split"
    args = FAST + ["--dataset_name", str(tmp_path / "dataset"), "--max_train_steps", "2", "--checkpointing_steps", "1",
                   "--eval_steps", "2"]
    with pytest.raises(SystemExit, match=r"--eval_steps 2 estimates bits/dim on the 'test' split: .* Pass "
                                         r"--eval_split with a split of the dataset, or --eval_steps 0"):
        train_here(args + ["--output_dir", str(out)])
    assert not list(out.glob("checkpoint-*"))
    out = tmp_path / "train-split"
    train_here(args + ["--eval_split", "train", "--logger", "tensorboard", "--output_dir", str(out)])
    logged = {}
    for file in (out / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(file))
        accumulator.Reload()
        if "eval_bpd_estimate" in accumulator.Tags()["scalars"]:
            logged.update({e.step: e.value for e in accumulator.Scalars("eval_bpd_estimate")})
    assert list(logged) == [2] and 0 < logged[2] < 100, logged


def test_a_resume_with_another_network_stops_naming_the_flags_not_calling_the_checkpoints_broken(images, tmp_path,
                                                                                                 train_here):
    """Resuming with flags that build another network (here the preset small-28 for tiny-16) loads no checkpoint of
    the run; the resume stops at the newest naming the flags, and does not advise removing
    checkpoints that are intact."""
    out = tmp_path / "run"
    args = FAST + ["--dataset_name", str(images), "--checkpointing_steps", "1", "--output_dir", str(out)]
    train_here(args + ["--max_train_steps", "2"])
    with pytest.raises(SystemExit) as stop:
        train_here(args + ["--max_train_steps", "3", "--preset", "small-28", "--resume_from_checkpoint", "latest"])
    message = str(stop.value.code)
    assert re.search(r"cannot resume from .*checkpoint-2: it was written by a run with other settings \((size mismatch "
                     r"for|Missing key|Unexpected key).*\): resume with the flags that run had", message), message
    assert "remove" not in message and check_checkpoints(out) == ["checkpoint-1", "checkpoint-2"]


def test_a_presets_batch_multiplied_by_the_streams_is_warned_about(images, tmp_path, train_here, caplog):
    """A preset's batch is its recipe's global batch (the paper's 128 on one accelerator), but --train_batch_size is
    per data stream, as in diffusers' scripts: a run of several streams without the flag trains at a multiple of it,
    and says so, naming the flag's value for the recipe's batch."""
    at = FAST.index("--train_batch_size")
    args = FAST[:at] + FAST[at + 2:]  # tiny-16's batch: 16
    train_here(args + ["--dataset_name", str(images), "--max_train_steps", "1", "--checkpointing_steps", "0",
                       "--data_streams", "2", "--output_dir", str(tmp_path / "preset")])
    assert "--preset tiny-16's batch, 16, is per data stream: 2 streams make 32 examples per step" in caplog.text
    assert "pass --train_batch_size 8" in caplog.text
    caplog.clear()
    train_here(FAST + ["--dataset_name", str(images), "--max_train_steps", "1", "--checkpointing_steps", "0",
                       "--data_streams", "2", "--output_dir", str(tmp_path / "explicit")])
    assert "is per data stream" not in caplog.text


def test_tensorboard_shows_each_step_once_after_a_resume(images, tmp_path, train_here):
    """A launch stopped after its checkpoint at step 2 had logged steps 3 and 4; the resumed launch logs them again.
    TensorBoard shows each step once: the resumed writer purges what came after its checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = FAST + ["--dataset_name", str(images), "--checkpointing_steps", "2", "--logger", "tensorboard",
                   "--output_dir", str(out)]
    train_here(args + ["--max_train_steps", "4"])
    shutil.rmtree(out / "checkpoint-4")  # as if stopped between step 4's log and its checkpoint
    train_here(args + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    run = out / "logs" / "ddpm_hf"  # both launches' scalars, a file each, in one run: TensorBoard reads them as one
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("loss")] == [1, 2, 3, 4]


def test_a_checkpoint_upload_samples_its_grid_once_whatever_its_attempts(images, tmp_path, train_here, hub,
                                                                          monkeypatch, caplog):
    """--push_checkpoints uploads the EMA pipeline with a sample grid at each checkpoint. The grid is sampled once,
    kept in samples/, and every attempt of a failing upload (the Hub answers 500 to each upload's first attempt: 6
    tries of huggingface_hub's) sends that one: it was sampled again at each attempt (the full chain)."""
    from ddpm_hf.pipelines import DDPMPipeline

    calls = []
    real_call = DDPMPipeline.__call__
    monkeypatch.setattr(DDPMPipeline, "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    out = tmp_path / "run"
    hub.inject("POST", "/commit/", "status", times=6, status=500, retry_after=0)
    with caplog.at_level(logging.INFO, logger="ddpm_hf"):
        train_here(FAST + ["--dataset_name", str(images), "--max_train_steps", "4", "--checkpointing_steps", "2",
                           "--push_to_hub", "--push_checkpoints", "--hub_model_id", "alice/pushed", "--hub_token",
                           "hf_test_alice", "--hub_push_attempts", "2", "--output_dir", str(out)])
    assert "push to alice/pushed failed (attempt 1/2)" in caplog.text
    assert "pushed the EMA pipeline of step 4" in caplog.text
    assert len(calls) == 2  # steps 2 and 4, one grid each
    assert sorted(path.name for path in (out / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]


def test_a_checkpoint_is_never_visible_before_its_pipeline_nor_while_it_is_deleted(images, tmp_path, train_here,
                                                                                  monkeypatch):
    """A kill may come at any moment: a checkpoint-N folder must be complete whenever it is visible. So its
    pipeline/ is written into the hidden folder before it is published, and --checkpoints_total_limit removes an old
    one only once it is hidden (renamed first). Every pipeline written and every folder removed is watched here:
    none may be a visible checkpoint's."""
    from ddpm_hf import DDPMPipeline, checkpoints

    out = tmp_path / "run"
    seen, real_rmtree, real_save = [], shutil.rmtree, DDPMPipeline.save_pretrained

    def watched_rmtree(path, *args, **kwargs):
        seen.append(("removed", Path(path).name))
        return real_rmtree(path, *args, **kwargs)

    def watched_save(self, folder, *args, **kwargs):
        seen.append(("pipeline in", Path(folder).parent.name))
        return real_save(self, folder, *args, **kwargs)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", watched_rmtree)
    monkeypatch.setattr(DDPMPipeline, "save_pretrained", watched_save)
    train_here(FAST + ["--dataset_name", str(images), "--max_train_steps", "3", "--checkpointing_steps", "1",
                       "--checkpoints_total_limit", "1", "--output_dir", str(out)])
    assert [p.name for p in checkpoints.published_checkpoints(out)] == ["checkpoint-3"]
    assert [folder for what, folder in seen if what == "pipeline in" and folder.startswith(".checkpoint")] == [
        f".checkpoint-{step}.tmp" for step in (1, 2, 3)]
    assert ("removed", ".checkpoint-1.trash") in seen and ("removed", ".checkpoint-2.trash") in seen
    assert not [s for s in seen if re.fullmatch(r"checkpoint-\d+", s[1])], seen
    check_checkpoints(out)


def test_a_limit_of_0_keeps_every_checkpoint(images, tmp_path, train_here):
    """--checkpoints_total_limit 0 keeps them all, as diffusers' example does without the flag."""
    from ddpm_hf.checkpoints import published_checkpoints

    out = tmp_path / "run"
    train_here(FAST + ["--dataset_name", str(images), "--max_train_steps", "3", "--checkpointing_steps", "1",
                       "--checkpoints_total_limit", "0", "--output_dir", str(out)])
    assert [p.name for p in published_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    check_checkpoints(out)
