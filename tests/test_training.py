"""training/train.py run for real: 2 DDP processes over gloo against a 1-process run with the same global batches,
a SIGKILL and an exact resume, and the data pipeline's split, shuffle and error handling."""

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # (accelerate requires it)
import pytest
import torch
from datasets import Dataset, Features, Image as ImageFeature

from ddpm_hf.data import TrainStream, find_image_column, load_image_dataset
from runs import FAST, TRAIN, child_env, final_weights, free_port, kill_everything, png_bytes, write_images


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    """64 distinct 20×20 images in 8 parquet shards."""
    return write_images(tmp_path_factory.mktemp("data"), count=64)


def _all_ids():
    return {hashlib.sha1(png_bytes(i)).hexdigest() for i in range(64)}


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _ids(run_dir: Path, rank: int):
    return (run_dir / "logs" / f"example_ids_rank{rank}.txt").read_text().split()


@pytest.mark.distributed
def test_two_rank_ddp_equals_one_process_with_the_same_global_batch(parquet_dir, tmp_path):
    # The preset's batch of 16: from there on oneDNN returned channels-last gradients for the 1×1 convolutions
    args = FAST + ["--dataset_name", str(parquet_dir), "--train_batch_size", "16", "--max_train_steps", "2",
                   "--lr_warmup_steps", "0", "--checkpointing_steps", "1", "--record_example_ids",
                   "--logging_steps", "1"]
    two = tmp_path / "two"

    def two_processes(*extra, launch_options=()):
        result = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--main_process_port", str(free_port()), *launch_options, TRAIN, *args, *extra],
                      env=child_env(ACCELERATE_USE_CPU="1"), cwd=tmp_path)
        # DDP's warning when a gradient's layout differs from its bucket's (a copy at every step)
        assert "Grad strides do not match bucket view strides" not in result.stdout + result.stderr
        return result.stdout + result.stderr

    # each rank reads in a reader process with a decoding worker (as on a GPU machine); the resume below reads in a
    # thread of each rank (0 workers: the default of two processes on 2 cores)
    said = two_processes("--output_dir", str(two), "--dataloader_num_workers", "1")
    # each process's images/s counts the images of both: step 2's 2 × 16 (the first logging interval left out)
    assert len(re.findall(r"images/s, data_wait [\d.]+ % over [\d.]+ s \(32 images of all processes", said)) == 2, said
    info = json.loads((two / "run_info.json").read_text())
    assert info["num_processes"] == 2 and info["distributed_type"].endswith("MULTI_CPU")
    assert info["backend"] == "gloo" and info["model_wrapper"] == "DistributedDataParallel"
    assert info["dataloader_num_workers"] == 1
    rank0, rank1 = _ids(two, 0), _ids(two, 1)
    assert len(rank0) == len(rank1) == 32
    assert not set(rank0) & set(rank1)  # disjoint
    assert set(rank0) | set(rank1) == _all_ids()  # 2 steps × 2 ranks × 16 = one epoch, covered exactly

    one = tmp_path / "one"
    _run([sys.executable, TRAIN, *args, "--data_streams", "2", "--output_dir", str(one)], env=child_env(), cwd=tmp_path)
    assert sorted(_ids(one, 0)) == sorted(rank0 + rank1)
    a, b = final_weights(two), final_weights(one)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    # --output_dir is the pipeline, as after diffusers' train_unconditional.py: plain diffusers loads it
    from diffusers import DDPMPipeline as DiffusersDDPMPipeline, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(two)
    assert type(pipe) is DiffusersDDPMPipeline
    for key, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(value, a[key], rtol=0, atol=0, msg=key)

    # Both processes resume exactly from a 2-process checkpoint: each finds its own streams' data position and
    # noise in it (accelerate writes it from the main process alone)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-1", resumed / "checkpoint-1")
    two_processes("--output_dir", str(resumed), "--resume_from_checkpoint", "latest", "--dataloader_num_workers", "0")
    assert json.loads((resumed / "run_info.json").read_text())["dataloader_num_workers"] == 0
    assert _ids(resumed, 0) == rank0[16:] and _ids(resumed, 1) == rank1[16:]
    c = final_weights(resumed)
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=0, atol=1e-6, msg=key)

    # The U-Net compiled in place inside DDP, as `accelerate launch --multi_gpu --dynamo_backend inductor` has it,
    # with AOT autograd's separate forward and backward graphs (dynamo's aot_eager backend: inductor's path without
    # its code generation): the gradients are still averaged across the ranks. Ranks that stepped on their own half
    # batch would differ by up to twice the learning rate per weight after the first Adam step.
    compiled = tmp_path / "compiled"
    log = two_processes("--output_dir", str(compiled), "--dataloader_num_workers", "0",
                        launch_options=("--dynamo_backend", "aot_eager"))
    assert "asked by accelerate's dynamo settings (aot_eager)" in log, log[-3000:]
    d = final_weights(compiled)
    for key in a:
        torch.testing.assert_close(d[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.distributed
def test_a_run_begun_on_one_process_goes_on_with_two(parquet_dir, tmp_path):
    """One GPU, then two: a one-process run (1 data stream) resumed by a two-process launch with
    --next_epoch_on_resume goes on at its step, its optimiser's state loaded on both ranks, and the data begins the
    next epoch as 2 streams: the 2 steps after the resume (2 ranks × 16) take the 64 images once each, the ranks'
    shares disjoint (the record starts again: another number of processes)."""
    out = tmp_path / "run"
    args = FAST + ["--dataset_name", str(parquet_dir), "--train_batch_size", "16", "--checkpointing_steps", "2",
                   "--record_example_ids", "--output_dir", str(out), "--dataloader_num_workers", "0"]
    _run([sys.executable, TRAIN, *args, "--max_train_steps", "2"], env=child_env(), cwd=tmp_path)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--main_process_port", str(free_port()), TRAIN, *args, "--max_train_steps", "4", "--resume_from_checkpoint",
          "latest", "--next_epoch_on_resume"], env=child_env(ACCELERATE_USE_CPU="1"), cwd=tmp_path)
    assert json.loads((out / "run_info.json").read_text())["num_processes"] == 2
    assert json.loads((out / "training_config.json").read_text())["data_streams"] == 2
    rank0, rank1 = _ids(out, 0), _ids(out, 1)
    assert len(rank0) == len(rank1) == 32 and not set(rank0) & set(rank1)
    assert set(rank0) | set(rank1) == _all_ids()
    optimizer = torch.load(out / "checkpoint-4" / "optimizer.bin", weights_only=True)
    assert {int(state["step"]) for state in optimizer["state"].values()} == {4}


@pytest.mark.distributed
def test_multi_process_launch_without_ddp_is_refused(parquet_dir, tmp_path):
    # --multi_gpu on a machine without CUDA and without ACCELERATE_USE_CPU: two processes that would train alone.
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(free_port()), TRAIN, *FAST, "--dataset_name", str(parquet_dir),
         "--max_train_steps", "2", "--output_dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, env=child_env(), cwd=tmp_path)
    assert result.returncode != 0
    assert (result.stderr + result.stdout).count("each would train alone") == 1  # said by one process of the two
    assert "ACCELERATE_USE_CPU=1" in result.stderr + result.stdout
    assert not (tmp_path / "run" / "model_index.json").exists()


def test_a_launch_says_a_bad_flag_once(tmp_path):
    """Every process parses the same command line: a bad flag is said by the machine's first process only (8 GPUs
    printed it 8 times), and every process exits with argparse's status 2."""
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(free_port()), TRAIN, *FAST, "--num_epochs", "3", "--output_dir",
         str(tmp_path / "run")], capture_output=True, text=True, timeout=600, env=child_env(ACCELERATE_USE_CPU="1"),
        cwd=tmp_path)
    text = result.stderr + result.stdout
    assert result.returncode != 0 and text.count("--num_epochs is a flag of diffusers'") == 1, text[-3000:]
    assert text.count("usage: train.py") == 1 and "failed (exitcode: 2) local_rank: 0 " in text, text[-3000:]


def test_only_processes_torchs_launcher_started_leave_a_failure_to_the_first(monkeypatch, capsys):
    """A process with LOCAL_RANK 1 that torch's launcher did not start (started by a training process, or another
    launcher) says its failure itself: nothing would end it while it waits for another to speak."""
    from ddpm_hf import processes

    monkeypatch.setattr(processes, "SAY_FIRST_S", 0.0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert processes.stop_all("bad flag").code == "bad flag"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert processes.stop_all("bad flag").code == 1
    with pytest.raises(SystemExit) as quiet:  # a bad flag: argparse's status, said by the first process only
        processes.ArgumentParser(prog="train.py").error("bad flag")
    assert quiet.value.code == 2 and not capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert processes.stop_all("bad flag").code == "bad flag"


@pytest.mark.distributed
@pytest.mark.parametrize("apart", ["own disk", "other working folder"])
def test_two_machines_without_a_shared_output_dir_stop_before_training(parquet_dir, tmp_path, apart):
    """Two machines, one process each (two launchers with --num_machines 2 on this host), whose --output_dir is not
    one folder: the second one's own disk there (a mount namespace of its own with a tmpfs over it), or a relative
    --output_dir launched from another working folder on each. Both stop at once, naming the process that cannot see
    the main one's folder and the fix, and leave nothing behind; without the check they would resume differently
    later and wait on each other in mismatched collectives."""
    port = free_port()
    if apart == "own disk":
        out = tmp_path / "run"
        out.mkdir()
        probe = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=1m",
                                "tmpfs", str(out)], capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"a mount in a namespace of its own was refused (root needed): {probe.stderr.strip()}")
        folders, output_dir = [tmp_path, tmp_path], str(out)
    else:  # not created yet: the check looks in the folder above, the working folder, which differs
        folders, output_dir = [tmp_path / "m0", tmp_path / "m1"], "run"
        for folder in folders:
            folder.mkdir()

    def machine(rank: int) -> subprocess.Popen:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                  "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                  "--num_processes", "2", TRAIN, *FAST, "--dataset_name", str(parquet_dir), "--max_train_steps", "2",
                  "--output_dir", output_dir]
        if rank == 1 and apart == "own disk":
            launch = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                      f'mount -t tmpfs -o size=1m tmpfs "{out}" && exec "$0" "$@"', *launch]
        return subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=folders[rank], env=child_env(ACCELERATE_USE_CPU="1"), start_new_session=True)

    machines = [machine(0), machine(1)]
    try:
        outputs = [m.communicate(timeout=300)[0] for m in machines]
    finally:
        for m in machines:
            kill_everything(m)
    for m, output in zip(machines, outputs):
        assert m.returncode != 0, output[-3000:]
        assert (f"--output_dir {output_dir} is not one folder for every process: process(es) 1 (on " in output and
                "pass an --output_dir on a filesystem they all mount" in output), output[-3000:]
    main_folder = Path(folders[0], output_dir)
    left = sorted(p.name for p in (main_folder if main_folder.exists() else folders[0]).iterdir())
    assert left == [], f"the check's file was left behind, or training began: {left}"


def test_sigkill_then_resume_equals_an_uninterrupted_run(parquet_dir, tmp_path):
    # with dropout, and a sample grid at each checkpoint, drawn after it from the generator of the dropout masks
    args = FAST + ["--dataset_name", str(parquet_dir), "--max_train_steps", "30", "--dropout", "0.1",
                   "--save_images_steps", "5", "--checkpointing_steps", "5", "--checkpoints_total_limit", "2",
                   "--record_example_ids"]
    straight = tmp_path / "straight"
    _run([sys.executable, TRAIN, *args, "--output_dir", str(straight)], env=child_env(), cwd=tmp_path)

    crashed = tmp_path / "crashed"
    for _ in range(3):  # a test process held off the CPU for seconds may kill too late: the run finished, start again
        shutil.rmtree(crashed, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, TRAIN, *args, "--output_dir", str(crashed)], env=child_env(),
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not any(crashed.glob("checkpoint-*")) and proc.poll() is None:
            assert time.time() < deadline, "no checkpoint in 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() in (0, -signal.SIGKILL), "the run failed before its kill"
        if not (crashed / "model_index.json").exists():
            break
    assert not (crashed / "model_index.json").exists(), "three runs finished before their kill"
    resumed_from = max(int(p.name.split("-")[1]) for p in crashed.glob("checkpoint-*"))

    _run([sys.executable, TRAIN, *args, "--output_dir", str(crashed), "--resume_from_checkpoint", "latest"],
         env=child_env(), cwd=tmp_path)
    a, b = final_weights(straight), final_weights(crashed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # the resumed process trained on exactly the examples that followed the checkpoint, none twice, none skipped: the
    # record of the whole run (the killed launch's up to its checkpoint, then the resumed one's) is the straight one's
    assert resumed_from * 4 < len(_ids(straight, 0)) and _ids(crashed, 0) == _ids(straight, 0)
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == ["checkpoint-25", "checkpoint-30"]
    assert not list(crashed.glob(".checkpoint-*"))


def test_inference_steps_default_to_the_training_steps():
    from ddpm_hf.training_args import parse_args

    assert parse_args(["--ddpm_num_steps", "50"]).ddpm_num_inference_steps == 50  # was refused: 1000 > 50
    assert parse_args([]).ddpm_num_inference_steps == 1000
    assert parse_args(["--ddpm_num_steps", "50", "--ddpm_num_inference_steps", "4"]).ddpm_num_inference_steps == 4


def test_a_recipe_lies_between_the_preset_and_the_flags():
    from ddpm_hf.training_args import parse_args

    paper, short = parse_args(["--preset", "small-28"]), parse_args(["--preset", "small-28", "--recipe", "short"])
    assert (paper.learning_rate, paper.lr_warmup_steps, paper.snr_gamma) == (2e-4, 100, None)  # the paper's Adam
    assert (short.learning_rate, short.lr_warmup_steps, short.snr_gamma) == (1e-3, 100, None)  # the preset's warm-up
    mine = parse_args(["--recipe", "short", "--learning_rate", "3e-4", "--snr_gamma", "2"])
    assert (mine.learning_rate, mine.snr_gamma) == (3e-4, 2.0)  # a flag beats the recipe


@pytest.mark.parametrize("workers", [0, 2])
def test_streams_split_by_shards_disjoint_and_reshuffled_each_epoch(parquet_dir, workers):
    ds = load_image_dataset(str(parquet_dir))
    column = find_image_column(ds.features)

    def epochs(rank, world, n_batches):
        stream = TrainStream(ds, column, 16, 1, 4, world, rank, world, seed=3, shuffle_buffer_size=16, record_ids=True,
                             num_workers=workers)
        for _ in range(n_batches):
            stream.next_batch()
        stream.close()
        return stream.seen_ids

    r0, r1 = epochs(0, 2, 16), epochs(1, 2, 16)  # two epochs each
    for epoch in (slice(0, 32), slice(32, 64)):  # each epoch: disjoint across streams, covering the data once
        assert set(r0[epoch]).isdisjoint(r1[epoch]) and set(r0[epoch]) | set(r1[epoch]) == _all_ids()
    assert r0[32:] + r1[32:] != r0[:32] + r1[:32]  # reshuffled for the second epoch


def test_the_example_id_record_spans_a_resume_and_drops_what_followed_its_checkpoint(parquet_dir, tmp_path, caplog):
    """--record_example_ids over a run killed and resumed: the ids are written with each checkpoint's state; a resume
    from an earlier checkpoint than the last written drops the lines after it (trained again), so the record equals
    a run's never stopped. A record that cannot continue starts again, said: its lines lost, or started again since
    the checkpoint (the line where it ends is another id), or a checkpoint written by another number of processes
    (its counts are per process), whose other processes' records are removed. A failed write stops the checkpoint."""
    ds = load_image_dataset(str(parquet_dir))
    logs = tmp_path / "logs"
    record = logs / "example_ids_rank0.txt"

    def stream(world=1):  # two streams, served by one process (world 1) or by two (this is rank 0 of 2)
        return TrainStream(ds, "image", 16, 1, 4, 2, 0, world, seed=3, shuffle_buffer_size=16, record_ids=True)

    def take(s, batches):
        for _ in range(batches):
            s.next_batch()

    def resumed(state, step, world=1):
        caplog.clear()
        s = stream(world)
        with caplog.at_level(logging.WARNING, logger="ddpm_hf"):
            s.load_state_dict(state)
            s.record_ids_in(logs, step)
        return s

    reference = stream()
    take(reference, 6)
    reference.close()
    every = reference.seen_ids  # 6 batches of 8 (4 from each stream)

    first = stream()
    first.record_ids_in(logs, 0)
    take(first, 2)
    at_step_2 = first.state_dict()  # a checkpoint: 16 ids written
    take(first, 2)
    first.state_dict()  # a later one, unreadable (say): 32 written
    take(first, 1)  # killed before the next checkpoint: not written
    first.close()
    assert record.read_text().split() == every[:32]

    second = resumed(at_step_2, 2)
    take(second, 4)
    second.write_ids()  # the run's end
    second.close()
    assert record.read_text().split() == every and not caplog.text

    record.unlink()  # the record lost (another --output_dir, say): it starts again at the resume
    third = resumed(at_step_2, 2)
    assert (f"{record} does not hold the 16 example ids the checkpoint counted, ending with {every[15]} (lost, or "
            "started again since): the record starts again at step 2") in caplog.text
    take(third, 3)
    third.state_dict()
    third.close()
    assert record.read_text().split() == every[16:40] and third.state_dict()["ids_recorded"] == {0: (24, every[39])}

    # resumed from step 2 again: the 24 lines would hold 16, but they start at step 2, not at step 0
    resumed(at_step_2, 2).close()
    assert "does not hold the 16 example ids the checkpoint counted" in caplog.text and record.read_text() == ""

    record.write_text("".join(f"{example}\n" for example in every))  # a record that would continue...
    for rank in (1, 2):
        (logs / f"example_ids_rank{rank}.txt").write_text(f"{every[0]}\n")
    fourth = resumed(at_step_2, 2, world=2)  # ...but the count was this process's of one; as rank 0 of 2 it reads
    assert "kept no count of the example ids this process recorded" in caplog.text  # stream 0 alone
    assert record.read_text() == ""
    assert sorted(p.name for p in logs.iterdir()) == ["example_ids_rank0.txt", "example_ids_rank1.txt"]
    assert f"removing {logs / 'example_ids_rank2.txt'}: this run has 2 processes" in caplog.text
    take(fourth, 1)
    record.unlink()
    record.mkdir()  # a write that fails: the checkpoint fails, naming the record
    with pytest.raises(OSError, match=r"could not write the example ids \(--record_example_ids\): process 0: "
                                      r"IsADirectoryError"):
        fourth.state_dict()
    fourth.close()


def test_a_resumes_replayed_order_is_the_streams_order_whatever_the_row_groups_buffer_and_split(tmp_path,
                                                                                                 monkeypatch):
    """A parquet resume skips to its position by replaying the epoch's order over stand-ins of (shard, row) pairs
    (see Replay.order), read as whole arrow tables. Against the oracle, the stream itself read row by
    row: the same (shard, row) order for 12 shards (datasets reads up to 10 at a time) of unequal sizes and row groups,
    buffers smaller and larger than a row group, no shuffle, 1, 3 and 5 streams (5 does not divide the 12 shards:
    split by examples), an empty shard, and two epochs. Then the resumed stream itself (``Replay.rows_from``) from a few
    positions, against the stream's rows from there, with the order handed out in blocks of 3 rows."""
    import ddpm_hf.data.replay as replay_module
    from ddpm_hf.data import row_fingerprint

    monkeypatch.setattr(replay_module, "REPLAY_BATCH_ROWS", 3)
    sizes, groups = [7, 13, 20, 5, 11, 9, 3, 8, 6, 12, 0, 10], [3, 5, 20, 2, 4, 9, 1, 8, 5, 7, 1, 3]
    where = {}
    for k, (size, group) in enumerate(zip(sizes, groups)):
        images = [png_bytes(1000 * k + row, 4) for row in range(size)]
        where.update({hashlib.sha1(image).hexdigest(): (k, row) for row, image in enumerate(images)})
        Dataset.from_dict({"image": [{"bytes": image, "path": None} for image in images]},
                          features=Features({"image": ImageFeature()})).to_parquet(
            str(tmp_path / f"train-{k:05d}-of-00012.parquet"), batch_size=group)
    ds = load_image_dataset(str(tmp_path), check_shards=False)
    for streams in (1, 3, 5):
        for buffer in (1, 4, 16, 64):
            stream = TrainStream(ds, "image", 4, 1, 2, streams, 0, 1, seed=11, shuffle_buffer_size=buffer)
            row_groups = stream.replay.shard_row_groups()
            assert [sum(g) for g in row_groups] == sizes
            for v in range(streams):
                for epoch in (0, 1):
                    stream.datasets[v].set_epoch(epoch)
                    cells = [row["image"] for row in stream.datasets[v]]
                    truth = [where[hashlib.sha1(cell["bytes"]).hexdigest()] for cell in cells]
                    shards, rows = stream.replay.order(v, epoch, row_groups)
                    assert list(zip(shards.tolist(), rows.tolist())) == truth, (streams, buffer, v, epoch)
                    for start in {1, len(cells) // 2, len(cells) - 1} if buffer in (1, 16) else ():
                        resumed = stream.replay.rows_from(v, epoch, start, row_fingerprint(cells[start - 1]), None)
                        assert [(index, row["image"]["bytes"]) for index, row in resumed] == [
                            (index, cell["bytes"]) for index, cell in enumerate(cells)][start:], (streams, v, start)
            stream.close()


def test_a_resume_whose_order_is_not_the_checkpoints_stops_naming_why_and_the_ways_on(tmp_path):
    """A resume reads its epoch again up to the position where it cannot replay it; the row it reaches there was not
    compared with the one the checkpoint saw, so data rewritten since (or a datasets release that shuffles otherwise)
    went on in another order, silently: examples seen twice, others never. The row is compared now and the resume
    stops, naming the cause (the datasets releases where they differ) and the ways on; the epoch's first row is
    compared too, so that most such resumes stop at once, not after hours of reading again. Parquet shards rewritten with
    other images of the same row counts (the parquet replay falls back, then the reading again finds it), an image
    folder whose first files went and others came (its rows are paths: the reading again alone), and, as controls, the same image folder moved to
    another place and the unchanged data, which resume as the uninterrupted stream goes on (the oracle)."""
    from ddpm_hf.data.shards import is_row
    from ddpm_hf.errors import ResumeMismatch

    def parquet(folder, offset):
        for k in range(4):
            Dataset.from_dict({"image": [{"bytes": png_bytes(offset + 16 * k + i, 8), "path": None} for i in range(16)]},
                              features=Features({"image": ImageFeature()})).to_parquet(
                str(folder / f"train-{k:05d}-of-00004.parquet"))
        return folder

    def image_folder(folder, names):
        (folder / "train").mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            (folder / "train" / name).write_bytes(png_bytes(i, 8))
        return folder

    def stream(folder):
        return TrainStream(load_image_dataset(str(folder), check_shards=False), "image", 8, 1, 4, 1, 0, 1, seed=0,
                           shuffle_buffer_size=8)

    def checkpoint_then_rest(folder):
        """The state after 3 batches, and the next 2 batches of the uninterrupted stream."""
        uninterrupted = stream(folder)
        for _ in range(3):
            uninterrupted.next_batch()
        state = uninterrupted.state_dict()
        rest = [uninterrupted.next_batch() for _ in range(2)]
        uninterrupted.close()
        return state, rest

    (tmp_path / "shards").mkdir()
    state, rest = checkpoint_then_rest(parquet(tmp_path / "shards", 0))
    assert state["datasets_version"] == __import__("datasets").__version__
    resumed = stream(tmp_path / "shards")
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(), batch) for batch in rest)  # the control: unchanged data
    resumed.close()

    parquet(tmp_path / "shards", 1000)  # rewritten: other images, the same row counts
    assert set(state["first_row"]) == {0} and state["first_row"][0] != state["last_row"][0]
    for written_by, why in ((None, "the data changed since the checkpoint"),
                            ("0.0.1", "the checkpoint's order was datasets 0.0.1's and this is datasets ")):
        # the epoch's first row differs: stopped there, not after reading again up to the position; a checkpoint
        # that kept no first row (written before it was kept) is stopped at the position
        for kept, found in ((state["first_row"], "the epoch's first row is not the one the checkpoint saw"),
                            ({}, "the row before it is not the one the checkpoint saw")):
            resumed = stream(tmp_path / "shards")
            resumed.load_state_dict(dict(state, datasets_version=written_by, first_row=kept))
            with pytest.raises(ResumeMismatch, match=f"the checkpoint's position is epoch 0, row 12, and {found}") \
                    as stopped:
                resumed.next_batch()
            assert why in str(stopped.value) and "--next_epoch_on_resume" in str(stopped.value), stopped.value
            resumed.close()
    for old in (tmp_path / "shards").glob("*.parquet"):  # fewer rows than the position: 8
        old.unlink()
    Dataset.from_dict({"image": [{"bytes": png_bytes(i, 8), "path": None} for i in range(8)]},
                      features=Features({"image": ImageFeature()})).to_parquet(str(tmp_path / "shards" / "train.parquet"))
    resumed = stream(tmp_path / "shards")
    resumed.load_state_dict(dict(state, first_row={}))
    with pytest.raises(ResumeMismatch, match="the checkpoint's position is epoch 0, row 12, and epoch 0 now has 8 rows"):
        resumed.next_batch()
    resumed.close()

    names = [f"{i:03d}.png" for i in range(40)]
    state, rest = checkpoint_then_rest(image_folder(tmp_path / "images", names))
    shutil.move(tmp_path / "images", tmp_path / "moved")  # the same files elsewhere: the same rows
    resumed = stream(tmp_path / "moved")
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(), batch) for batch in rest)
    resumed.close()
    shutil.rmtree(tmp_path / "moved")
    image_folder(tmp_path / "moved", [f"{i + 5:03d}.png" for i in range(40)])  # 5 files gone, 5 new: the order moves
    resumed = stream(tmp_path / "moved")
    resumed.load_state_dict(state)
    with pytest.raises(ResumeMismatch, match="the data changed since the checkpoint"):
        resumed.next_batch()
    resumed.close()
    # read again after a failed read during the run (no resume): the message says the data changed meanwhile
    reading = stream(tmp_path / "moved")
    with pytest.raises(ResumeMismatch, match=r"stream 0, after a failed read: the position is epoch 0, row 12, and "
                                             r"the row before it is not the one read there before: the data changed "
                                             r"while the run read it") as stopped:
        list(reading._epoch_rows(0, 0, 12, state["last_row"][0], None, retried=True))
    assert "datasets" not in str(stopped.value)
    reading.close()
    # a file is known by its name: of an archive's member, the member's (the archive's path is every member's)
    assert is_row({"path": "/elsewhere/renamed/001.png"}, "path:/data/images/001.png")
    assert not is_row({"path": "zip://cat/1.png::hf://datasets/u/r@0123/train.zip"},
                      "path:zip://cat/2.png::hf://datasets/u/r@0123/train.zip")


def test_passes_end_and_close_without_datasets_exit_pause(parquet_dir, monkeypatch):
    """datasets pauses config.SLEEP_TIME_ON_THREADS_SHUTDOWN (5 s) after every pass over shuffled parquet shards, for
    scans left part-way at interpreter exit, which pyarrow before 25 turned into an abort (setup.py requires 25). A
    training stream pauses neither at the end of its epochs nor when it closes one part-way: three epochs and a part of
    the fourth, then close, take no pause. Oracle: datasets' own pauses, counted; a plain shuffled stream of the same
    shards takes one per pass (the control). That nothing aborts at exit is checked by every train.py run of the
    suite, each of which closes its stream part-way and must exit with 0 (an older pyarrow is refused at import)."""
    import datasets

    pause, pauses, sleep = 5.25, [], time.sleep  # a sleep of exactly this length is the pause, in whichever thread
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", pause)
    monkeypatch.setattr(time, "sleep", lambda seconds: pauses.append(seconds) if seconds == pause else sleep(seconds))
    plain = datasets.load_dataset("parquet", data_files=str(parquet_dir / "*.parquet"), split="train", streaming=True)
    assert sum(1 for _ in plain.shuffle(seed=0, buffer_size=16)) == 64 and pauses == [pause]  # the control
    pauses.clear()
    stream = TrainStream(load_image_dataset(str(parquet_dir)), "image", 16, 1, 8, 1, 0, 1, seed=0,
                         shuffle_buffer_size=16)
    for _ in range(3 * 64 // 8 + 1):  # three epochs, into the fourth
        stream.next_batch()
    assert stream.position[0][0] == 3 and pauses == []
    stream.close()
    assert pauses == []  # no pause of our own either (until 2026-11-27 d, one when closing a pass part-way)


def test_diffusers_pipeline_module_is_loaded_only_to_sample_or_save():
    """diffusers' pipeline module imports every model family of diffusers (about 5 s of a launch's 13 here): a run
    loads it when it first samples or saves a pipeline, so that a refused command, a kill before the end and every
    process of a launch pay it no earlier. Oracle: sys.modules of a fresh interpreter that loads train.py and the
    package. (That ddpm_hf.DDPMPipeline then resolves, every test importing it shows.)"""
    code = ("import sys\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from runs import load_train_script\n"
            "load_train_script()\n"
            "import ddpm_hf, ddpm_hf.cli, ddpm_hf.evaluation\n"
            "print('DDPMPipeline' in dir(ddpm_hf), 'diffusers.pipelines.pipeline_utils' in sys.modules)\n")
    assert _run([sys.executable, "-c", code]).stdout.split("\n")[0] == "True False"


def test_dataset_without_image_column_lists_its_columns(tmp_path):
    Dataset.from_dict({"text": ["a", "b"], "n": [1, 2]}).to_parquet(str(tmp_path / "train-0.parquet"))
    ds = load_image_dataset(str(tmp_path))
    with pytest.raises(ValueError, match=r"no image column \(columns: \['text', 'n'\]\)"):
        find_image_column(ds.features)
    with pytest.raises(ValueError, match="--image_column 'img'"):
        find_image_column(ds.features, "img")


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_rows_are_skipped_and_counted(tmp_path, workers):
    images = [{"bytes": png_bytes(i), "path": None} for i in range(12)]
    for bad in (2, 7, 8):  # decoded by different workers
        images[bad] = {"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": None}
    Dataset.from_dict({"image": images}, features=Features({"image": ImageFeature()})).to_parquet(
        str(tmp_path / "train-0.parquet"))
    ds = load_image_dataset(str(tmp_path))
    stream = TrainStream(ds, "image", 16, 1, 3, 1, 0, 1, seed=0, shuffle_buffer_size=0, record_ids=True,
                         num_workers=workers)
    batches = [stream.next_batch() for _ in range(3)]
    stream.close()
    assert all(b.shape == (3, 1, 16, 16) and b.dtype == torch.uint8 for b in batches)
    assert stream.skipped_rows == 3  # counted once each, whichever worker met them
    good = [i for i in range(12) if i not in (2, 7, 8)]
    assert stream.seen_ids == [hashlib.sha1(png_bytes(i)).hexdigest() for i in good[:9]]
    assert stream.state_dict()["position"] == {0: (0, 12)}  # row 11 was the last one used
    if workers:
        return
    # the count goes on across a resume (oracle: the uninterrupted stream's), and into --next_epoch_on_resume's
    # first stream, the other streams' counts added
    def stream_of(**options):
        return TrainStream(ds, "image", 16, 1, 3, 1, 0, 1, seed=0, shuffle_buffer_size=0, **options)

    first = stream_of()
    first.next_batch(), first.next_batch()
    state = first.state_dict()
    first.close()
    resumed = stream_of()
    resumed.load_state_dict(state)
    resumed.next_batch()
    resumed.close()
    assert resumed.skipped_rows == 3 and resumed.state_dict()["skipped_rows"] == {0: 3}
    anew = stream_of(next_epoch_on_resume=True)
    anew.load_state_dict(dict(state, position={0: (0, 6), 1: (0, 6)}, skipped_rows={0: 1, 1: 2}))
    assert anew.skipped_rows == 3 and anew.state_dict()["position"] == {0: (1, 0)}
    anew.close()


def test_many_undecodable_rows_are_said_one_by_one_then_counted(tmp_path, caplog):
    """A web-scale dataset with 1 % of broken images has a million of them an epoch: a stream says its first ten
    with their rows, then only its count at each power of ten; every one is skipped and counted."""
    good, bad = png_bytes(0), b"\x89PNG\r\n\x1a\n truncated"
    images = [{"bytes": good if i % 2 else bad, "path": None} for i in range(240)]  # 120 undecodable
    Dataset.from_dict({"image": images}, features=Features({"image": ImageFeature()})).to_parquet(
        str(tmp_path / "train-0.parquet"))
    stream = TrainStream(load_image_dataset(str(tmp_path)), "image", 16, 1, 40, 1, 0, 1, seed=0,
                         shuffle_buffer_size=0)
    with caplog.at_level(logging.WARNING, logger="ddpm_hf.data"):
        for _ in range(3):
            stream.next_batch()
        stream.close()
    said = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert stream.skipped_rows == 120
    assert [m.split(":")[0] for m in said] == ["skipping an undecodable image (stream 0, epoch 0, row %d)" % row
                                               for row in range(0, 20, 2)] + [
        "stream 0 has skipped 100 undecodable images (epoch 0, row 198)"], said
    assert said[9].endswith("(the next ones of this stream are counted, not said one by one)")


@pytest.mark.hub
def test_push_to_hub_uploads_only_the_pipeline_and_a_token_that_cannot_write_stops_the_run_first(parquet_dir,
                                                                                                 tmp_path, hub):
    args = FAST + ["--dataset_name", str(parquet_dir), "--max_train_steps", "4",
                     "--checkpointing_steps", "2", "--push_to_hub", "--hub_model_id", "alice/trained"]
    _run([sys.executable, TRAIN, *args, "--hub_token", "hf_test_alice", "--output_dir", str(tmp_path / "ok")],
         env=child_env(), cwd=tmp_path)
    # the pipeline, its card and a sample grid; not the checkpoints, logs, samples/ or run files beside it locally
    assert set(hub.repos["alice/trained"].files("main")[1]) == {
        ".gitattributes", "README.md", "samples.png", "model_index.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"}
    assert {"checkpoint-4", "samples", "run_info.json", "training_config.json", "model_index.json"} <= {
        p.name for p in (tmp_path / "ok").iterdir()}

    # bob may not write in alice's namespace: said before training (as diffusers' example creates the repo first),
    # not found at the upload after the last step, with the run ending "successfully"
    result = subprocess.run([sys.executable, TRAIN, *args, "--hub_token", "hf_test_bob", "--output_dir",
                             str(tmp_path / "denied")], env=child_env(), cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode != 0 and "--push_to_hub: --hub_model_id alice/trained: the Hub token's account, bob, " \
        "cannot write in 'alice' (it writes in bob): push to bob/trained" in log, log[-3000:]
    assert "hf_test_bob" not in log and "training:" not in log  # (the progress bar's name: no step was taken)
    assert not (tmp_path / "denied").exists() or not list((tmp_path / "denied").glob("checkpoint-*"))


@pytest.mark.distributed
def test_evaluate_spreads_sampling_over_two_processes(tmp_path):
    from helpers import tiny_pipeline

    tiny_pipeline(num_train_timesteps=10).save_pretrained(tmp_path / "pipe")
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--main_process_port", str(free_port()), "-m", "ddpm_hf.cli", "evaluate", str(tmp_path / "pipe"),
          "--metrics", "fid,kid", "--num_samples", "10", "--num_reference", "32", "--out", str(tmp_path / "eval")],
         env=child_env(ACCELERATE_USE_CPU="1"), cwd=tmp_path)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["num_processes"] == 2 and results["sample_quality"]["num_samples"] == 10
    # the same images in the same order as one process makes them: the same files, FID and KID (whose subsets are
    # drawn by index)
    from ddpm_hf.cli import main as cli

    assert cli(["evaluate", str(tmp_path / "pipe"), "--metrics", "fid,kid", "--num_samples", "10", "--num_reference",
                "32", "--out", str(tmp_path / "one")]) == 0
    alone = json.loads((tmp_path / "one" / "results.json").read_text())
    for metric in ("fid", "kid", "kid_std"):
        # (features computed with other thread counts differ in their last bits; another order changes KID by %)
        assert results["sample_quality"][metric] == pytest.approx(alone["sample_quality"][metric], rel=1e-6), metric
    for name in [f"{i:05d}.png" for i in range(10)] + ["samples.json"]:
        assert (tmp_path / "eval" / "samples" / name).read_bytes() == (tmp_path / "one" / "samples" / name).read_bytes()
    # the grid gathered from both processes' rows in image order
    assert (tmp_path / "eval" / "samples.png").read_bytes() == (tmp_path / "one" / "samples.png").read_bytes()


@pytest.mark.distributed
@pytest.mark.parametrize("processes", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_the_time_budget_ends_every_process_at_the_same_step(parquet_dir, tmp_path, processes):
    """--max_train_minutes ends a run that could never reach its --max_train_steps: every process stops at the same
    step (each saw exactly that many batches), a logged one, with the checkpoint of that step and the final pipeline
    written. Process 1's clock says it started 2.5 s before process 0 (of a budget of 3 s): it is out of time first,
    and the others stop with it. (One process: 20 s more of the suite for what
    test_one_process_decides_the_time_budget_alone shows in-process.)"""
    out = tmp_path / "run"
    args = FAST + ["--dataset_name", str(parquet_dir), "--max_train_steps", "1000000", "--max_train_minutes", "0.05",
                   "--checkpointing_steps", "100000", "--logging_steps", "3", "--record_example_ids",
                   "--ddp_timeout", "60", "--output_dir", str(out)]
    launcher = [TRAIN] if processes == 1 else [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
        str(free_port()), str(Path(__file__).with_name("skewed_clock.py"))]
    result = _run([sys.executable, *launcher, *args],
                  env=child_env(ACCELERATE_USE_CPU="1", DDPM_HF_CLOCK_SKEW_S="2.5"), cwd=tmp_path)
    stops = {int(step) for step in re.findall(r"time budget of 0.05 minutes reached at step (\d+)",
                                              result.stdout + result.stderr)}
    assert len(stops) == 1, result.stderr[-3000:]
    step = stops.pop()
    assert step > 1 and step % 3 == 0 and [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert (out / "model_index.json").exists()
    for rank in range(processes):
        assert len(_ids(out, rank)) == step * 4  # --train_batch_size 4 per process


def test_the_time_budget_leaves_the_steps_between_logs_to_the_device():
    """Where nothing is due after a step, the host queues the next one before it learns how the step went (see
    train.Update): --max_train_minutes, checked only at the logged steps, keeps it so. It made every step wait."""
    from runs import load_train_script

    train = load_train_script()
    args = train.parse_args(FAST + ["--max_train_steps", "100", "--max_train_minutes", "5", "--logging_steps", "10",
                                    "--checkpointing_steps", "50", "--output_dir", "unused"])
    assert [step for step in range(1, 101) if train.count_at_once(args, step)] == list(range(10, 101, 10))


def test_the_logged_losses_are_the_means_over_each_quarter_of_the_timesteps():
    """loss_logs of the sums of an interval's micro-batches (read back from the device once) against numpy's means
    over all their examples: the mean loss, and per quarter of t ∈ [0, T) the mean of its examples' losses, a
    quarter without examples left out."""
    import numpy as np
    from accelerate import Accelerator
    from runs import load_train_script

    train, T = load_train_script(), 1000
    rng = np.random.default_rng(0)
    t = np.concatenate([rng.integers(0, 500, 40), [749, 250, 499, 0]])  # no example in the last quarter
    losses = rng.exponential(size=len(t)) * 10.0 ** -rng.integers(0, 3, len(t))
    batches = [slice(0, 16), slice(16, 20), slice(20, None)]  # micro-batches of unequal sizes: not a mean of means
    sums = sum(train.loss_sums(torch.tensor(losses[b], dtype=torch.float32), torch.tensor(t[b]), T) for b in batches)
    logs = train.loss_logs(Accelerator(cpu=True), sums)
    expected = {"loss": losses.mean(), **{f"loss_q{q}": losses[(t * 4) // T == q].mean() for q in range(3)}}
    assert logs.keys() - {"grad_norm"} == expected.keys()
    for key, value in expected.items():
        assert logs[key] == pytest.approx(value, rel=1e-5), key
    assert logs["loss_q2"] == pytest.approx(losses[(t >= 500) & (t < 750)].mean(), rel=1e-5)  # t = 749 only
    assert logs["grad_norm"] == 0.0  # none computed (a micro-step, or --max_grad_norm 0)
    assert train.loss_logs(Accelerator(cpu=True), sums, torch.tensor(3.25))["grad_norm"] == 3.25
    # What the logs read is made on the device, with no read back on the host before the one of loss_logs: on the
    # meta device, which holds no values, a read (bincount sizing its output, or float() of a count) raises.
    meta = train.loss_sums(torch.empty(44, device="meta"), torch.empty(44, dtype=torch.long, device="meta"), T)
    assert meta.shape == (8,) and meta.device.type == "meta"


def test_the_loss_logged_every_n_steps_is_the_intervals_mean(tmp_path):
    """--logging_steps 2 logs the mean loss of its 2 steps, as transformers' --logging_steps does (it logged the
    second step's alone, so a curve logged every 50 steps showed 1 step in 50). Oracle: the same run logged every
    step (equal batches: the interval's mean is the mean of its steps' means), read with TensorBoard's reader."""
    from runs import FAST_LOGGED, load_train_script, logged_scalars, train_in_process, write_images

    train, images = load_train_script(), write_images(tmp_path / "images", count=16, shards=2, size=16)
    logged = {}
    for every in (1, 2):
        out = tmp_path / f"every-{every}"
        train_in_process(train, FAST_LOGGED + ["--dataset_name", str(images), "--max_train_steps", "4",
                                               "--logging_steps", str(every), "--checkpointing_steps", "0",
                                               "--output_dir", str(out)])
        logged[every] = logged_scalars(out / "logs", "loss")
    assert sorted(logged[2]) == [2, 4]
    for step in (2, 4):
        assert logged[2][step] == pytest.approx((logged[1][step - 1] + logged[1][step]) / 2, rel=1e-5), step
    assert logged[2][4] != pytest.approx(logged[1][4], rel=1e-3)  # (the steps' losses differ: the test can fail)


def test_one_process_decides_the_time_budget_alone(monkeypatch):
    """With one process, whether --max_train_minutes is used up is its own clock's answer: no collective, so no
    device round trip at every step (the collective is made to fail here)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from runs import load_train_script

    train = load_train_script()
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(cpu=True)
        monkeypatch.setattr(accelerator, "reduce", lambda *a, **k: pytest.fail("one process asked the others"))
        assert train.out_of_time(accelerator, time.perf_counter() - 61, 1) is True
        assert train.out_of_time(accelerator, time.perf_counter() - 59, 1) is False  # minutes, not seconds
        assert train.out_of_time(accelerator, time.perf_counter() - 31, 0.5) is True
        assert train.out_of_time(accelerator, time.perf_counter(), 1) is False
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.distributed
def test_training_processes_end_with_a_launcher_killed_by_sigkill(parquet_dir, tmp_path):
    """torchrun starts the training processes in sessions of their own: a launcher killed by SIGKILL (with its
    process group, as a job scheduler or `kill -9 -- -PGID` does) left them training, checkpointing and pushing to
    the end, beside whatever was started next in the same --output_dir. They now end with it."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    with open(log, "wb") as sink:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--main_process_port", str(free_port()), TRAIN, *FAST, "--dataset_name", str(parquet_dir),
             "--max_train_steps", "100000", "--checkpointing_steps", "2", "--dataloader_num_workers", "0",
             "--output_dir", str(out)],
            stdout=sink, stderr=subprocess.STDOUT, env=child_env(ACCELERATE_USE_CPU="1"), cwd=tmp_path,
            start_new_session=True)
    workers = []
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-2").is_dir():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        workers = [p for p in psutil.Process(launcher.pid).children() if TRAIN in " ".join(p.cmdline())]
        assert len(workers) == 2, workers
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"training processes left running: {alive}\n{log.read_text()[-3000:]}"
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()


def _loads_torch(pid: int) -> bool:
    """Whether process ``pid`` has torch's library mapped (Linux's /proc)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.distributed
def test_training_processes_end_with_a_launcher_killed_while_they_import(parquet_dir, tmp_path):
    """The launcher killed by SIGKILL while its processes still import torch and the rest (seconds on this machine):
    they found themselves orphans only once imported, took their new parent (the reaper) for the launcher, and went
    on to wait for a rendezvous whose store had gone with the launcher (up to --ddp_timeout). Each now compares its
    parent with the one it had as it started."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    with open(log, "wb") as sink:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--main_process_port", str(free_port()), TRAIN, *FAST, "--dataset_name", str(parquet_dir),
             "--max_train_steps", "4", "--dataloader_num_workers", "0", "--output_dir", str(out)],
            stdout=sink, stderr=subprocess.STDOUT, env=child_env(ACCELERATE_USE_CPU="1"), cwd=tmp_path,
            start_new_session=True)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 or not all(_loads_torch(p.pid) for p in workers):
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            workers = psutil.Process(launcher.pid).children()
            time.sleep(0.005)
        # killed as both load torch's library (the first of their imports after ddpm_hf's own), seconds before
        # they are ready to train
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, f"training processes left running: {alive}\n{log.read_text()[-3000:]}"
        assert not out.exists(), "a process got past its imports before the kill: the test did not test the window"
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()


def test_each_checkpoint_holds_its_ema_pipeline_which_plain_diffusers_loads(parquet_dir, tmp_path):
    """checkpoint-N/pipeline/ is the EMA pipeline of step N (as diffusers' example keeps its checkpoints' U-Nets):
    `ddpm-hf sample`/`evaluate` and diffusers load it, e.g. for FID along training; at the last step it is the final
    pipeline, weight for weight."""
    from helpers import run_without_ddpm_hf
    from runs import load_train_script, train_in_process

    out = tmp_path / "run"
    train_in_process(load_train_script(), FAST + ["--dataset_name", str(parquet_dir), "--max_train_steps", "4",
                                                  "--checkpointing_steps", "2", "--dataloader_num_workers", "0",
                                                  "--output_dir", str(out)])
    final, last = final_weights(out), final_weights(out / "checkpoint-4" / "pipeline")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert not all(torch.equal(final[k], final_weights(out / "checkpoint-2" / "pipeline")[k]) for k in final)
    run_without_ddpm_hf(f"""
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(out / 'checkpoint-2' / 'pipeline')!r})
        assert type(pipe).__name__ == "DDPMPipeline", type(pipe)
        pipe(batch_size=1, num_inference_steps=2)
    """, cwd=tmp_path)


def test_without_ema_the_pipelines_hold_the_training_weights(parquet_dir, tmp_path):
    """--no-use_ema: the final pipeline and the checkpoint's pipeline are the network's own weights, as accelerate
    saved them in the checkpoint (model.safetensors). (The pipelines' U-Nets are made without drawing initial weights,
    every one copied from the network: one left out would be uninitialised memory.)"""
    from safetensors.torch import load_file

    from runs import load_train_script, train_in_process

    out = tmp_path / "run"
    no_ema = FAST[:FAST.index("--ema_max_decay")] + FAST[FAST.index("--ema_max_decay") + 2:]  # (refused without EMA)
    train_in_process(load_train_script(), no_ema + ["--dataset_name", str(parquet_dir), "--max_train_steps", "2",
                                                    "--checkpointing_steps", "2", "--dataloader_num_workers", "0",
                                                    "--no-use_ema", "--output_dir", str(out)])
    trained = load_file(out / "checkpoint-2" / "model.safetensors")
    for pipeline in (out, out / "checkpoint-2" / "pipeline"):
        weights = final_weights(pipeline)
        assert weights.keys() == trained.keys() and all(torch.equal(weights[k], trained[k]) for k in trained), pipeline


def test_the_precision_accelerate_chose_is_the_runs_and_fp16_without_a_gpu_stops(tmp_path, monkeypatch, caplog):
    """Without --mixed_precision, accelerate's setting (`accelerate config`, `accelerate launch --mixed_precision`,
    ACCELERATE_MIXED_PRECISION) decides: training_config.json said null, and fp16 on the CPU went through (accelerate
    reports fp16 and trains in float32, with no loss scaler) where the flag is refused. Oracle: accelerate's own
    Accelerator.mixed_precision, and the refusal of the flag."""
    from runs import FAST, load_train_script, train_in_process, write_images

    train, images = load_train_script(), write_images(tmp_path / "images", count=16, shards=2, size=16)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level("INFO"):
        train_in_process(train, FAST + ["--dataset_name", str(images), "--max_train_steps", "1",
                                        "--output_dir", str(tmp_path / "bf16")])
    assert json.loads((tmp_path / "bf16" / "training_config.json").read_text())["mixed_precision"] == "bf16"
    assert "mixed precision: bf16 (from accelerate's setting (ACCELERATE_MIXED_PRECISION=bf16))" in caplog.text
    if torch.cuda.is_available():  # (fp16 runs there)
        return
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(SystemExit, match=r"mixed precision fp16, from accelerate's setting "
                                         r"\(ACCELERATE_MIXED_PRECISION=fp16\): this script trains fp16 with CUDA's"):
        train_in_process(train, FAST + ["--dataset_name", str(images), "--max_train_steps", "1",
                                        "--output_dir", str(tmp_path / "fp16")])
    assert not (tmp_path / "fp16" / "checkpoint-1").exists()


def test_checkpoints_of_diffusers_example_are_named_not_called_corrupt(tmp_path):
    """An --output_dir of diffusers' train_unconditional.py holds checkpoint-N/unet/ and unet_ema/, no state of this
    script's: a resume said "unreadable ... files that are cut short or corrupt may be removed" of intact checkpoints,
    and a new run was told to resume them. Both now say whose they are, and leave them as they are."""
    import diffusers
    from runs import FAST, load_train_script, train_in_process, write_images

    from ddpm_hf.presets import unet_config

    train, images = load_train_script(), write_images(tmp_path / "images", count=16, shards=2, size=16)
    out = tmp_path / "from-diffusers"
    for step in (500, 1000):  # as diffusers' example saves them: accelerate's state hooks write the two U-Nets
        for name in ("unet", "unet_ema"):
            diffusers.UNet2DModel(**unet_config("tiny-16")).save_pretrained(out / f"checkpoint-{step}" / name)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    argv = FAST + ["--dataset_name", str(images), "--max_train_steps", "1", "--output_dir", str(out)]
    for extra in ([], ["--resume_from_checkpoint", "latest"], ["--resume_from_checkpoint", "checkpoint-500"]):
        with pytest.raises(SystemExit) as stopped:
            train_in_process(train, argv + extra)
        message = str(stopped.value.code)
        assert "holds checkpoints of diffusers' train_unconditional.py (checkpoint-" in message, (extra, message)
        assert "corrupt" not in message and "--resume_from_checkpoint latest" not in message, (extra, message)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing removed or added
    # beside this run's own checkpoints they are not skipped either: --checkpoints_total_limit would count them, and
    # prune the run's newest checkpoint, the one just written
    mixed = tmp_path / "mixed"
    train_in_process(train, FAST + ["--dataset_name", str(images), "--max_train_steps", "1", "--checkpointing_steps",
                                    "1", "--output_dir", str(mixed)])
    diffusers.UNet2DModel(**unet_config("tiny-16")).save_pretrained(mixed / "checkpoint-500" / "unet")
    with pytest.raises(SystemExit, match=r"holds checkpoints of diffusers' train_unconditional.py \(checkpoint-500"):
        train_in_process(train, FAST + ["--dataset_name", str(images), "--max_train_steps", "2", "--output_dir",
                                        str(mixed), "--resume_from_checkpoint", "latest"])
    assert (mixed / "checkpoint-1").is_dir() and not (mixed / "checkpoint-2").exists()


def test_the_sample_grids_reach_tensorboard(tmp_path):
    """As diffusers' example logs its test samples, each sample grid goes to the tracker too (TensorBoard's images),
    at its step: a run watched in TensorBoard showed losses only. Oracle: TensorBoard's own reader of the events,
    in the folder of --tracker_project_name (accelerate's run name)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from runs import FAST_LOGGED, load_train_script, train_in_process, write_images

    train, images = load_train_script(), write_images(tmp_path / "images", count=16, shards=2, size=16)
    out = tmp_path / "run"
    train_in_process(train, FAST_LOGGED + ["--dataset_name", str(images), "--max_train_steps", "4",
                                           "--save_images_steps", "2", "--output_dir", str(out),
                                           "--tracker_project_name", "fmnist-ddpm"])
    events = sorted((out / "logs").rglob("events.out.tfevents.*"))
    assert events and all(out / "logs" / "fmnist-ddpm" in path.parents for path in events)  # (diffusers' flag)
    accumulator = EventAccumulator(str(events[-1].parent), size_guidance={"images": 0})
    accumulator.Reload()
    logged = accumulator.Images("samples")
    assert [event.step for event in logged] == [2, 4]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    assert all(event.width >= 16 and event.height >= 16 for event in logged)


def test_diffusers_ema_ramp_reaches_the_runs_ema(tmp_path, caplog):
    """--ema_power alone: the run's EMA ramps as diffusers' example's does (the EMA given the ramp), and
    the checkpoint keeps the ramp; the flags as filled in are in training_config.json."""
    from runs import FAST, load_train_script, train_in_process, write_images

    train, images = load_train_script(), write_images(tmp_path / "images", count=16, shards=2, size=16)
    out = tmp_path / "run"
    argv = [a for a in FAST]
    argv[argv.index("--ema_max_decay") + 1] = "0.9999"
    train_in_process(train, argv + ["--dataset_name", str(images), "--max_train_steps", "3", "--checkpointing_steps",
                                    "3", "--ema_power", "0.5", "--output_dir", str(out)])
    config = json.loads((out / "training_config.json").read_text())
    assert (config["ema_inv_gamma"], config["ema_power"]) == (1.0, 0.5)
    states = [torch.load(path, weights_only=False) for path in (out / "checkpoint-3").glob("custom_checkpoint_*.pkl")]
    ema = [state for state in states if "power_ramp" in state]  # (the EMA's, among accelerate's custom states)
    assert len(ema) == 1 and ema[0]["power_ramp"] == [1.0, 0.5] and ema[0]["num_updates"] == 3
    # resumed without the flags, the run goes on with its checkpoint's ramp, says so, and records what it does
    with caplog.at_level("WARNING"):
        train_in_process(train, argv + ["--dataset_name", str(images), "--max_train_steps", "4", "--output_dir",
                                        str(out), "--resume_from_checkpoint", "latest"])
    assert "resuming with the checkpoint's EMA settings, not the flags': --ema_inv_gamma 1.0 (flag: None), " \
           "--ema_power 0.5 (flag: None)" in caplog.text
    config = json.loads((out / "training_config.json").read_text())
    assert (config["ema_inv_gamma"], config["ema_power"], config["max_train_steps"]) == (1.0, 0.5, 4)


def test_the_sample_grid_shows_its_progress(tmp_path, capsys):
    """The grid sampled after training (16 images of the full chain by default: minutes on a CPU) shows a bar of its
    own: after 'training 100%' nothing was printed while it ran."""
    from runs import FAST, load_train_script, train_in_process, write_images

    train, images = load_train_script(), write_images(tmp_path / "images", count=16, shards=2, size=16)
    train_in_process(train, FAST + ["--dataset_name", str(images), "--max_train_steps", "1", "--output_dir",
                                    str(tmp_path / "run")])
    bar = re.findall(r"sample grid of step 1: +\d+%\|[^|]*\| \d/4 ", capsys.readouterr().err)  # (cleared when done)
    assert bar, "no progress bar of the sample grid"


def test_a_failed_read_in_the_epoch_after_a_resume_goes_on_exactly(tmp_path, monkeypatch):
    """A resumed image-folder stream (no replay: the epoch read again up to the position, its first row checked
    against the checkpoint's) goes on into the next epoch, where a read fails once and is retried: the examples are
    the uninterrupted stream's, in its order. The epoch's first row the retry checks is that epoch's, not the
    checkpoint's (another epoch, another first row: the stream would stop, saying the data changed)."""
    (tmp_path / "train").mkdir()
    for i in range(16):
        (tmp_path / "train" / f"{i:02d}.png").write_bytes(png_bytes(i, 8))
    monkeypatch.setattr(TrainStream, "READ_RETRY_PAUSE_S", 0.01)

    def stream():
        return TrainStream(load_image_dataset(str(tmp_path), check_shards=False), "image", 8, 1, 4, 1, 0, 1, seed=0,
                           shuffle_buffer_size=8, record_ids=True)

    uninterrupted = stream()
    for _ in range(8):  # two epochs
        uninterrupted.next_batch()
    uninterrupted.close()
    first = stream()
    first.next_batch(), first.next_batch()
    state = first.state_dict()
    first.close()

    real_epoch_rows, failed = TrainStream._epoch_rows, []

    def failing_once(self, v, epoch, start, *args, **kwargs):
        rows = real_epoch_rows(self, v, epoch, start, *args, **kwargs)
        for index, row in rows:
            if (epoch, index) == (1, 6) and not failed:
                failed.append(start)
                raise ConnectionError("the connection was reset")
            yield index, row

    monkeypatch.setattr(TrainStream, "_epoch_rows", failing_once)
    resumed = stream()
    resumed.load_state_dict(state)
    for _ in range(6):
        resumed.next_batch()
    resumed.close()
    assert failed == [0]  # the read of epoch 1 from its start failed at row 6, and was retried from there
    assert first.seen_ids + resumed.seen_ids == uninterrupted.seen_ids
