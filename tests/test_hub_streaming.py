"""Training data streamed from a Hub dataset repo, as users do it, against the local Hub server (tests/fakehub.py)
with the unmodified datasets and huggingface_hub clients: shards split between real DDP processes (the server's log
says which process read which bytes), equality with the same data as local files, a SIGKILL and an exact resume,
network faults mid-stream, private repos, configs and splits, and bad repos named before training."""

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
import torch
from datasets import Array3D, Dataset, Features, Image as ImageFeature, Value
from huggingface_hub import HfApi
from PIL import Image

from runs import (FAST, TRAIN, child_env, final_weights, free_port, kill_everything, load_train_script, png_bytes,
                  read_batches, train_in_process, write_images)

from ddpm_hf.data import TrainStream, load_image_dataset

pytestmark = pytest.mark.hub
TOKEN = "hf_test_alice"


def publish(folder: Path, repo_id: str, private: bool = False) -> str:
    """``folder``'s files as the dataset repo ``repo_id`` (alice's), as `HfApi.upload_folder` sends them."""
    api = HfApi(token=TOKEN)
    api.create_repo(repo_id, repo_type="dataset", private=private)
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder))
    return repo_id


@pytest.fixture(scope="module")
def sixteen_shards(tmp_path_factory):
    """256 distinct 96×96 images in 16 parquet shards of about 150 KB: a shard's first rows lie outside what the
    main process's footer check reads (pyarrow's last 64 KB), so the server's log tells the two apart. 16 steps of
    2 × 4 examples, prefetch included, stay within the first epoch (shards are dealt to the streams anew each epoch)."""
    root = tmp_path_factory.mktemp("hub_data")
    write_images(root / "data", count=256, shards=16, size=96)
    return root


def _ids(run_dir: Path, rank: int):
    return (run_dir / "logs" / f"example_ids_rank{rank}.txt").read_text().split()


def _two_processes(args, log: Path, env_extra=None) -> subprocess.Popen:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), TRAIN, *args]
    with open(log, "ab") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=log.parent, start_new_session=True,
                                env=child_env(ACCELERATE_USE_CPU="1", **(env_extra or {})))


@pytest.mark.distributed
def test_two_processes_stream_a_private_repo_shard_by_shard_and_resume_a_kill_exactly(dataset_hub, sixteen_shards, tmp_path):
    repo = publish(sixteen_shards, "alice/sixteen", private=True)
    args = FAST + ["--max_train_steps", "16", "--checkpointing_steps", "4", "--record_example_ids",
                   "--logger", "tensorboard"]

    # The reference: the same files read locally by one process serving both data streams, never interrupted.
    local = tmp_path / "local"
    subprocess.run([sys.executable, TRAIN, *args, "--dataset_name", str(sixteen_shards), "--data_streams", "2",
                    "--output_dir", str(local)], env=child_env(), cwd=tmp_path, check=True, capture_output=True)

    # Two DDP processes stream the private repo (token given by flag), are SIGKILLed after their first checkpoint
    # and resumed: they must end on the reference's weights.
    out, log = tmp_path / "hub", tmp_path / "hub.log"
    hub_args = args + ["--dataset_name", repo, "--hub_token", TOKEN, "--output_dir", str(out)]
    proc = _two_processes(hub_args, log)
    deadline = time.time() + 300
    while not (out / "checkpoint-4").is_dir():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.02)
    kill_everything(proc)
    assert not (out / "model_index.json").exists(), "killed too late: the run had finished"
    killed_at = time.monotonic()
    resumed_from = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    proc = _two_processes(hub_args + ["--resume_from_checkpoint", "latest"], log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-6000:]

    a, b = final_weights(local), final_weights(out)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    # The local run's batches are stream 0's 4 examples then stream 1's; rank r serves stream r.
    reference = _ids(local, 0)
    per_stream = [[i for step in range(16) for i in reference[8 * step + 4 * r: 8 * step + 4 * r + 4]] for r in (0, 1)]
    assert _ids(out, 0) == per_stream[0] and _ids(out, 1) == per_stream[1]  # the killed launch's, then the resumed one's

    # Each shard's rows went to exactly one process: who read its first KB (the main process's footer check before
    # training reads only the tail)
    files = sorted(p.relative_to(sixteen_shards).as_posix() for p in (sixteen_shards / "data").glob("*.parquet"))
    size = {f: (sixteen_shards / f).stat().st_size for f in files}
    assert min(size.values()) > 80 * 1024
    readers = {f: set() for f in files}
    for read in dataset_hub.reads:
        if read.repo_id == repo and read.path in readers and read.sent and read.start < 1024:
            readers[read.path].add(read.rank)
    assert all(len(ranks) <= 1 for ranks in readers.values()), readers
    assert {rank for ranks in readers.values() for rank in ranks} == {"0", "1"}
    # What the resume downloaded again (reported: it re-reads the epoch up to the checkpoint's position)
    after_kill = sum(read.sent for read in dataset_hub.reads if read.time > killed_at and read.repo_id == repo)
    print(f"resume from step {resumed_from}: {after_kill} bytes read after the kill, dataset {sum(size.values())} "
          "bytes")
    # The resume's replay needs every shard's row groups: process 1 was given those the main process's check read,
    # and read no shard it does not stream but the first, whose schema datasets reads as it opens the stream (it read
    # all 16 footers again: 1 request per shard and process)
    resumed = [read for read in dataset_hub.reads if read.time > killed_at and read.repo_id == repo and read.sent]
    streamed_by_1 = {read.path for read in resumed if read.rank == "1" and read.start < 1024}
    assert streamed_by_1 and {read.path for read in resumed if read.rank == "1"} - streamed_by_1 <= {files[0]}
    assert {read.path for read in resumed if read.rank == "0"} == set(files)  # (the main process's check)

    # The token is nowhere: not in the logs, run_info.json, the model card, tensorboard or the checkpoints
    assert TOKEN not in log.read_text()
    assert "HTTP Request:" not in log.read_text()  # (the HTTP client's line per request, on every process)
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_a_resume_downloads_only_the_shards_that_still_hold_rows_of_the_epoch(dataset_hub, tmp_path):
    """A stream over 24 shards (datasets feeds its shuffle buffer from 10 at a time) is stopped after 64 of its 96
    rows, its state taken as a checkpoint does, and resumed: the examples continue exactly, and no shard whose rows
    were all used is downloaded again. Shards of about 80 KB: the footer reads (the last 64 KB) start after the
    rows' first KB, so the server's log tells them apart."""
    root = tmp_path / "many"
    write_images(root / "data", count=96, shards=24, size=144)
    repo = publish(root, "alice/many")
    dataset = load_image_dataset(repo, check_shards=False)

    def stream():
        return TrainStream(dataset, "image", 16, 1, 4, 1, 0, 1, seed=5, shuffle_buffer_size=8, record_ids=True)

    def read(s, batches):
        try:
            for _ in range(batches):
                s.next_batch()
        finally:
            s.close()

    reference = stream()
    read(reference, 19)  # 76 rows; with the prefetch the reading stays in the first epoch
    first = stream()
    read(first, 16)
    second = stream()
    second.load_state_dict(first.state_dict())
    resumed_at = time.monotonic()
    read(second, 3)
    assert first.seen_ids + second.seen_ids == reference.seen_ids

    shard_of = {hashlib.sha1(png_bytes(i, 144)).hexdigest(): f"data/train-{i // 4:05d}-of-00024.parquet"
                for i in range(96)}
    used = {}
    for example in first.seen_ids:
        used[shard_of[example]] = used.get(shard_of[example], 0) + 1
    finished = {shard for shard, n in used.items() if n == 4}
    assert min((root / shard).stat().st_size for shard in shard_of.values()) > 66 * 1024
    downloaded_again = {read.path for read in dataset_hub.reads if read.time > resumed_at and read.repo_id == repo
                        and read.sent and read.start < 1024}
    print(f"resumed after 64 of 96 rows: {len(finished)} shards finished, {len(downloaded_again)} downloaded again")
    assert len(finished) >= 8 and downloaded_again and not finished & downloaded_again, (finished, downloaded_again)


def test_the_row_groups_a_resume_needs_are_those_the_check_read(dataset_hub, tmp_path):
    """The check before training reads every shard's footer; a resume's replay, which needs every shard's row groups,
    takes them from it instead of asking the Hub again (a request per shard, in every process, at every resume). They
    are those of the files themselves."""
    import pyarrow.parquet as pq

    root = tmp_path / "groups"
    write_images(root / "data", count=24, shards=3, size=16)
    repo = publish(root, "alice/groups")
    dataset = load_image_dataset(repo)  # checked
    checked = len(dataset_hub.reads)
    stream = TrainStream(dataset, "image", 16, 1, 4, 1, 0, 1, seed=0)
    files = sorted((root / "data").glob("*.parquet"))
    assert stream.replay.shard_row_groups() == [
        [pq.read_metadata(f).row_group(i).num_rows for i in range(pq.read_metadata(f).num_row_groups)] for f in files]
    assert len(dataset_hub.reads) == checked
    stream.close()


def test_a_resume_after_the_dataset_changed_on_the_hub_is_refused_then_exact_at_the_old_commit(dataset_hub, tmp_path):
    """A stream keeps the commit it read in its checkpoint state. After the owner pushes other data, a resume that
    opens the repo's main branch is refused, naming --dataset_revision and the old commit; opened at that commit it
    continues with exactly the examples the uninterrupted stream gave."""
    from ddpm_hf.errors import ResumeMismatch

    root = tmp_path / "v1"
    write_images(root / "data", count=32, shards=4)
    repo = publish(root, "alice/changing")
    commit = HfApi(token=TOKEN).dataset_info(repo).sha

    def stream(revision=None):
        return TrainStream(load_image_dataset(repo, check_shards=False, revision=revision), "image", 16, 1, 4, 1, 0, 1,
                           seed=5, shuffle_buffer_size=8, record_ids=True)

    reference, first = stream(), stream()
    assert reference.revision == first.revision == commit
    reference_ids, first_ids = read_batches(reference, 6), read_batches(first, 3)
    state = first.state_dict()
    assert state["dataset_revision"] == commit

    changed = tmp_path / "v2"
    write_images(changed / "data", count=40, shards=5, size=24)
    HfApi(token=TOKEN).upload_folder(repo_id=repo, repo_type="dataset", folder_path=str(changed),
                                     delete_patterns=["data/*"])
    moved_on = stream()
    assert moved_on.revision not in (None, commit)
    with pytest.raises(ResumeMismatch, match=f"resume with --dataset_revision {commit}"):
        moved_on.load_state_dict(state)
    second = stream(revision=commit)
    second.load_state_dict(state)
    assert first_ids + read_batches(second, 3) == reference_ids


def test_a_checkpoint_of_other_data_streams_is_refused_naming_the_flag(tmp_path):
    """A stream's state read as 2 data streams does not resume a stream of 1 or of 4: its positions name other
    rows. The refusal names --data_streams with the checkpoint's count."""
    from ddpm_hf.errors import ResumeMismatch

    images = write_images(tmp_path / "data", count=16, shards=4)

    def stream(streams):
        return TrainStream(load_image_dataset(str(images)), "image", 16, 1, 2, streams, 0, 1, seed=5,
                           shuffle_buffer_size=4)

    two = stream(2)
    read_batches(two, 1)
    for streams in (1, 4):
        with pytest.raises(ResumeMismatch, match="as 2 data streams, this run as .*--data_streams 2"):
            stream(streams).load_state_dict(two.state_dict())
    stream(2).load_state_dict(two.state_dict())


@pytest.fixture
def four_shards(tmp_path):
    root = tmp_path / "four"
    write_images(root / "data", count=16, shards=4)
    return root


def _read_ids(dataset, batches: int, streams: int = 1, per_stream_batch: int = 4, workers: int = 0) -> list:
    """The example ids of ``batches`` batches of a stream over ``dataset``, all ``streams`` served here."""
    return read_batches(TrainStream(dataset, "image", 16, 1, per_stream_batch, streams, 0, 1, seed=5,
                                    shuffle_buffer_size=8, record_ids=True, num_workers=workers), batches)


@pytest.fixture
def fast_retries(monkeypatch):
    """datasets' own pause between read retries (5 s) and ours, shortened; the read timeout lowered to 2 s."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "STREAMING_READ_RETRY_INTERVAL", 0.01)
    monkeypatch.setattr(datasets.config, "STREAMING_READ_SERVER_UNAVAILABLE_RETRY_INTERVAL", 0.01)
    monkeypatch.setattr(datasets.config, "STREAMING_READ_MAX_RETRIES", 2)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DOWNLOAD_TIMEOUT", 2)
    monkeypatch.setattr(TrainStream, "READ_RETRY_PAUSE_S", 0.01)


@pytest.mark.parametrize("fault", ["status", "cut", "stall"])
def test_a_fault_mid_stream_continues_at_the_same_row(dataset_hub, four_shards, fast_retries, fault):
    """An HTTP 500, a connection cut in the middle of a shard, a server that stops answering: the stream goes on
    with exactly the examples of a fault-free read (two epochs, 16 rows)."""
    repo = publish(four_shards, "alice/four")
    reference = _read_ids(load_image_dataset(repo), 8)
    assert sorted(reference[:16]) == sorted(reference[16:]) and len(set(reference[:16])) == 16
    dataset = load_image_dataset(repo)  # its footer checks done before the fault is armed
    third = sorted(p.name for p in (four_shards / "data").glob("*.parquet"))[2]
    injected = dataset_hub.inject("GET", third, fault, times=2, status=500, seconds=4)
    assert _read_ids(dataset, 8) == reference
    assert injected.hits, "the fault never fired"


def test_a_shard_missing_for_a_moment_mid_epoch_is_retried_by_the_stream_at_the_same_row(dataset_hub, tmp_path,
                                                                                          fast_retries):
    """Shards that answer 404 twice once a third of the epoch is read (no library retries a 404: the stream's own
    retry does, re-opening the epoch at its position): exactly the examples of a fault-free read."""
    root = tmp_path / "many"
    write_images(root / "data", count=48, shards=24)  # 24 shards: datasets opens 10 at a time, the rest later
    repo = publish(root, "alice/many")
    dataset = load_image_dataset(repo)
    reference = _read_ids(dataset, 12)
    stream = TrainStream(dataset, "image", 16, 1, 4, 1, 0, 1, seed=5, shuffle_buffer_size=8, record_ids=True)
    assert _read_with_404s(dataset_hub, stream, 12, 4, "data/train-") == reference


def _read_with_404s(hub, stream: TrainStream, batches: int, at: int, path_part: str) -> list:
    """The example ids of ``batches`` batches of ``stream``, the files whose path holds ``path_part`` answering 404
    twice from batch ``at`` on (checked to have fired)."""
    try:
        for batch in range(batches):
            if batch == at:
                injected = hub.inject("GET", path_part, "status", times=2, status=404)
            stream.next_batch()
    finally:
        stream.close()
    assert injected.hits, "the fault never fired"
    return stream.seen_ids


@pytest.mark.parametrize("workers", [0, 1])  # read by a thread of this process, or by a reader process
def test_a_source_that_keeps_failing_stops_the_stream_naming_the_row(dataset_hub, four_shards, fast_retries, workers,
                                                                     monkeypatch, caplog):
    """Five retries, each after twice the pause of the one before (said where the stream reads in this process),
    then the run stops naming the row."""
    monkeypatch.setattr(TrainStream, "READ_RETRY_PAUSE_S", 0.05)
    repo = publish(four_shards, "alice/four")
    dataset = load_image_dataset(repo)
    third = sorted(p.name for p in (four_shards / "data").glob("*.parquet"))[2]
    # a shard gone from the repo (404): neither huggingface_hub nor datasets retry it, so the test measures our
    # retries alone (a persistent 5xx takes huggingface_hub's own 5 retries, 23 s, per attempt)
    dataset_hub.inject("GET", third, "status", times=-1, status=404)
    with pytest.raises(RuntimeError) as failure, caplog.at_level(logging.WARNING, logger="ddpm_hf.data"):
        _read_ids(dataset, 8, workers=workers)
    message = str(failure.value)
    assert "reading the dataset failed at stream 0, epoch 0, row" in message and "after 5 retries" in message
    if not workers:
        assert re.findall(r"retry (\d)/5 in ([\d.]+) s", caplog.text) == [
            (str(k + 1), f"{0.05 * 2 ** k:.1f}") for k in range(5)]
    assert "resume with --resume_from_checkpoint latest" in message


def test_shards_that_do_not_divide_are_read_by_every_stream_with_a_warning(dataset_hub, tmp_path, caplog):
    root = tmp_path / "three"
    write_images(root / "data", count=12, shards=3)
    repo = publish(root, "alice/three")
    with caplog.at_level(logging.WARNING, logger="ddpm_hf.data"):
        ids = _read_ids(load_image_dataset(repo, check_shards=False), 2, streams=2, per_stream_batch=3)
    warning = caplog.text
    assert "3 shards, not a multiple of 2 streams" in warning and "2× the reading" in warning
    # one epoch of 12 rows = 2 batches of (2 streams × 3): every row once, whichever stream had it
    assert len(set(ids)) == len(ids) == 12
    totals = dataset_hub.bytes_read(repo)
    for path in (p.relative_to(root).as_posix() for p in (root / "data").glob("*.parquet")):
        assert totals[path][1] >= 2 * (root / path).stat().st_size  # both streams downloaded every shard


def _png_rgb(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_configs_splits_and_image_folders_stream_like_local_files(dataset_hub, tmp_path, caplog):
    # two configs, the second with a non-default split, laid out and declared as the Hub does (README configs:)
    root = tmp_path / "multi"
    for config, split, seeds in (("grey", "train", range(0, 4)), ("colour", "holdout", range(10, 13))):
        folder = root / config
        folder.mkdir(parents=True)
        Dataset.from_dict({"image": [{"bytes": png_bytes(s) if config == "grey" else _png_rgb(s), "path": None}
                                     for s in seeds], "label": [str(s) for s in seeds]},
                          features=Features({"image": ImageFeature(), "label": Value("string")})
                          ).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: grey\n  data_files:\n  - split: train\n    path: grey/train-*.parquet\n"
        "  default: true\n- config_name: colour\n  data_files:\n  - split: holdout\n    path: colour/holdout-*.parquet\n"
        "---\n")
    repo = publish(root, "alice/multi")
    grey = [row["label"] for row in load_image_dataset(repo)]
    colour = list(load_image_dataset(repo, "colour", split="holdout"))
    assert grey == ["0", "1", "2", "3"] and [row["label"] for row in colour] == ["10", "11", "12"]
    assert colour[0]["image"].mode == "RGB"
    assert colour[0]["image"].tobytes() == Image.open(io.BytesIO(_png_rgb(10))).tobytes()
    # without a default config, datasets asks for one: the message names them (it said "pass one of them")
    readme = (root / "README.md").read_text()
    (root / "README.md").write_text(readme.replace("  default: true\n", ""))
    with pytest.raises(ValueError, match=re.escape("Its configs: ['grey', 'colour']. Pass one of them with "
                                                   "--dataset_config_name.")):
        load_image_dataset(publish(root, "alice/no-default"))

    # an image folder with its metadata
    folder = tmp_path / "folder"
    (folder / "train").mkdir(parents=True)
    for s in range(3):
        (folder / "train" / f"{s}.png").write_bytes(png_bytes(s))
    (folder / "train" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{s}.png", "label": str(s)})
                                                             + "\n" for s in range(3)))
    repo = publish(folder, "alice/folder")
    rows = sorted(load_image_dataset(repo), key=lambda row: row["label"])
    assert [row["label"] for row in rows] == ["0", "1", "2"]
    assert rows[2]["image"].tobytes() == Image.open(io.BytesIO(png_bytes(2))).tobytes()
    # its splits named as names (not NamedSplit('train')), and two streams over its one shard not warned about as
    # if each downloaded everything: each reads only its own images
    with pytest.raises(ValueError, match=re.escape("has no split 'holdout'; its splits: ['train']. Pass one")):
        load_image_dataset(repo, split="holdout")
    with caplog.at_level(logging.INFO, logger="ddpm_hf.data"):
        TrainStream(load_image_dataset(repo), "image", 16, 1, 1, 2, 0, 1, seed=0).close()
    said = [record for record in caplog.records if "shard" in record.getMessage()]
    assert [record.levelname for record in said] == ["INFO"] and "reading only those images" in said[0].getMessage()


def test_a_hub_image_folder_trains_like_the_same_local_folder(dataset_hub, tmp_path):
    """A Hub repo of image files (an "imagefolder": datasets decodes its images on threads of its own, and its cells
    point at hf:// paths, not local files) streams the same examples as the same folder on disk, decoded by us:
    with 0 and 1 decoding workers, and its first image read before training."""
    from ddpm_hf.data import first_images

    folder = tmp_path / "folder"
    (folder / "train").mkdir(parents=True)
    for s in range(8):
        (folder / "train" / f"{s}.png").write_bytes(png_bytes(s))
    repo = publish(folder, "alice/images", private=True)
    assert first_images(load_image_dataset(repo, token="hf_test_alice"), "image", token="hf_test_alice")[0].tobytes() == \
        Image.open(io.BytesIO(png_bytes(0))).tobytes()
    for workers in (0, 1):
        stream = TrainStream(load_image_dataset(repo, token="hf_test_alice"), "image", 16, 1, 4, 1, 0, 1, seed=5,
                             shuffle_buffer_size=8, record_ids=True, num_workers=workers, token="hf_test_alice")
        assert stream.revision == HfApi(token=TOKEN).dataset_info(repo).sha  # kept in the checkpoints
        try:
            batches = [stream.next_batch() for _ in range(2)]
        finally:
            stream.close()
        reference = TrainStream(load_image_dataset(train_data_dir=str(folder)), "image", 16, 1, 4, 1, 0, 1, seed=5,
                                shuffle_buffer_size=8, record_ids=True, num_workers=0)
        try:
            expected = [reference.next_batch() for _ in range(2)]
        finally:
            reference.close()
        assert len(batches) == len(expected) == 2 and all(torch.equal(a, b) for a, b in zip(batches, expected))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def _tar_of(path: Path, names: List[str], size: int = 20, first: int = 0) -> Path:
    """A tar of members ``names`` in that order: a label (``.cls``) holds ``3``, any other member the image
    ``png_bytes(first + its index, size)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for s, name in enumerate(names):
            _add_member(tar, name, b"3" if name.endswith(".cls") else png_bytes(first + s, size))
    return path


def _write_tars(folder: Path, sizes: List[int], labels: bool = False) -> Path:
    """WebDataset shards as tools write them: ``train-0000k.tar`` files of ``sizes[k]`` samples, each sample its files
    sharing a key (``000012.png``, with ``labels`` ``000012.cls`` too), the image of sample s ``png_bytes(s)``; with
    ``labels`` the last shard ends with a sample without its image (``000999.cls`` alone)."""
    folder.mkdir(parents=True)
    for k, size in enumerate(sizes):
        with tarfile.open(folder / f"train-{k:05d}.tar", "w") as tar:
            for s in range(sum(sizes[:k]), sum(sizes[:k + 1])):
                _add_member(tar, f"{s:06d}.png", png_bytes(s))
                if labels:
                    _add_member(tar, f"{s:06d}.cls", str(s % 10).encode())
            if labels and k == len(sizes) - 1:
                _add_member(tar, "000999.cls", b"0")
    return folder


def test_a_hub_webdataset_trains_like_the_same_tar_files_on_disk_and_resumes_exactly(dataset_hub, tmp_path, caplog):
    """A repo of WebDataset tar shards (big image datasets often come so) streams, shard by shard, the same batches
    as the same tars in a local folder, with 0 and 1 decoding workers; an epoch holds every image once, a sample
    without its image is skipped and counted, saying so; a stream
    resumed from its state continues
    with the uninterrupted stream's batches, across the end of the epoch; a truncated local tar is named at once."""
    folder = _write_tars(tmp_path / "tars", [8] * 4, labels=True)
    repo = publish(folder, "alice/tars", private=True)

    def stream(source, workers=0):
        dataset = (load_image_dataset(repo, token=TOKEN) if source == "hub" else
                   load_image_dataset(train_data_dir=str(folder)))
        assert dataset.num_shards == 4 and "png" in dataset.features
        return TrainStream(dataset, "png", 16, 1, 4, 2, 0, 1, seed=5, shuffle_buffer_size=8, record_ids=True,
                           num_workers=workers, token=TOKEN)

    local = stream("local")
    try:
        expected = [local.next_batch() for _ in range(6)]  # 2 streams × 4 = 8 examples a batch: 1½ epochs of 32
    finally:
        local.close()
    every_image = {hashlib.sha1(png_bytes(s)).hexdigest() for s in range(32)}
    assert len(local.seen_ids[:32]) == 32 and set(local.seen_ids[:32]) == every_image  # the first epoch: each once
    assert local.skipped_rows in (1, 2), local.skipped_rows  # once per epoch of its stream: 1½ epochs read
    assert "row has no image (its image column is empty)" in caplog.text
    for workers in (0, 1):
        hub = stream("hub", workers)
        try:
            batches = [hub.next_batch() for _ in range(3)]
            state = hub.state_dict()
        finally:
            hub.close()
        resumed = stream("hub", workers)
        resumed.load_state_dict(state)
        try:
            batches += [resumed.next_batch() for _ in range(3)]
        finally:
            resumed.close()
        assert all(torch.equal(a, b) for a, b in zip(batches, expected)), f"{workers} workers"

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    whole = (folder / "train-00001.tar").read_bytes()
    (truncated / "train-00000.tar").write_bytes(whole[:len(whole) // 3])
    with pytest.raises(ValueError, match=r"train-00000.tar is not a readable webdataset file \(its member 0000\d\d\.\w+ "
                                         r"ends at byte \d+ of a file of \d+\); it is truncated or corrupt"):
        load_image_dataset(train_data_dir=str(truncated))
    # on the Hub, before any training: a tar cut short (its end is not the end of archive), a file that is no tar
    (truncated / "train-00001.tar").write_bytes(whole)
    publish(truncated, "alice/cut-tars")
    with pytest.raises(ValueError, match=r"Hub dataset alice/cut-tars: train-00000.tar is not a readable webdataset "
                                         r"file \(it does not end with a tar's end of archive"):
        load_image_dataset("alice/cut-tars", token=TOKEN)
    (truncated / "train-00000.tar").write_bytes(b"<html>not found</html>" * 100 + bytes(1024))  # a tar's end, no tar
    publish(truncated, "alice/no-tars")
    with pytest.raises(ValueError, match=r"Hub dataset alice/no-tars: train-00000.tar is not a readable webdataset "
                                         r"file \((bad checksum|invalid header|.*header.*)\); it is truncated or not "
                                         r"webdataset"):
        load_image_dataset("alice/no-tars", token=TOKEN)
    (truncated / "train-00000.tar").write_bytes(whole)  # an empty tar (a shard of an export left empty) is one
    (truncated / "train-00001.tar").write_bytes(bytes(10240))
    publish(truncated, "alice/empty-tar")
    assert len(list(load_image_dataset("alice/empty-tar", token=TOKEN))) == 8


def _tar_batches(dataset, batches: int, state: Optional[dict] = None, workers: int = 0):
    """``batches`` batches of 4 images of one stream over ``dataset`` (a shuffle buffer of 8), from ``state``, and
    the stream."""
    stream = TrainStream(dataset, "png", 16, 1, 4, 1, 0, 1, seed=5, shuffle_buffer_size=8, record_ids=True,
                         num_workers=workers)
    if state is not None:
        stream.load_state_dict(state)
    try:
        return [stream.next_batch() for _ in range(batches)], stream
    finally:
        stream.close()


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("stop", [12, 63], ids=["first-epoch", "second-epoch"])
def test_a_resumed_webdataset_downloads_only_the_tars_that_still_hold_rows(dataset_hub, tmp_path, caplog, stop,
                                                                           workers):
    """A tar has no footer that counts its samples: the stream counts them as it reads each tar whole, keeps the
    counts in its state, and a resume stands in for the counted tars' rows while it skips to its position: the tars
    all of whose rows were used are not downloaded again, in the first epoch (only the tars it had not read whole
    are) as in a later one, the batches equal to an uninterrupted stream's; with 0 and 1 decoding workers (then the
    counts come back from the reader process). Tars of unequal sizes: an order computed from wrong counts differs."""
    # 206 samples in 48 tars (datasets reads 10 at a time, interleaved)
    sizes = [3, 5, 4, 6, 2, 7, 4, 3, 5, 6, 4, 2, 5, 3, 6, 4, 7, 3, 4, 5, 2, 6, 3, 4] * 2
    folder = _write_tars(tmp_path / "tars", sizes)
    shard_of = {hashlib.sha1(png_bytes(s)).hexdigest(): f"train-{k:05d}.tar"  # each image's tar
                for k in range(len(sizes)) for s in range(sum(sizes[:k]), sum(sizes[:k + 1]))}
    repo = publish(folder, f"alice/counted-tars-{stop}-{workers}")
    dataset = load_image_dataset(repo, check_shards=False)

    def read(batches, state=None):
        return _tar_batches(dataset, batches, state, workers)

    # The reader runs ahead of the batches handed out (by up to 35 rows with 1 worker, bounded by its queues): the
    # resumed stream must stop reading before the next epoch, which would open finished tars again.
    epoch, row = divmod(4 * stop, 206)
    expected, reference = read(stop + 10)
    first, stopped = read(stop)
    # each stream counts through a copy of the dataset: the caller's is left as it was
    assert type(dataset._ex_iterable.generate_examples_fn).__name__ != "TarSampleCounter"
    state = stopped.state_dict()
    known = state["tar_rows_known"]
    assert state["position"] == {0: (epoch, row)} and known and known.items() <= dict(enumerate(sizes)).items()
    assert len(known) == len(sizes) or epoch == 0, known
    caplog.set_level(logging.INFO, logger="ddpm_hf.data")
    resumed_at = time.monotonic()
    second, resumed = read(10, state)
    assert stopped.seen_ids + resumed.seen_ids == reference.seen_ids
    assert all(torch.equal(a, b) for a, b in zip(first + second, expected))

    used = {}
    for example in stopped.seen_ids[206 * epoch:]:  # this epoch's
        used[shard_of[example]] = used.get(shard_of[example], 0) + 1
    finished = {shard for shard, n in used.items() if n == sizes[int(shard[6:11])]}
    checked = shard_of[stopped.seen_ids[-1]]  # the row before the position is read and compared: its tar too
    sent = {}  # bytes of each tar sent since the resume
    for read in dataset_hub.reads:
        if read.time > resumed_at and read.repo_id == repo and read.sent:
            sent[read.path] = sent.get(read.path, 0) + read.sent
    downloaded_again = set(sent)
    # a tar is read once, or twice where the stand-ins of its first rows were still in the shuffle buffer
    assert all(n <= 2 * (folder / path).stat().st_size for path, n in sent.items()), sorted(sent.items())
    print(f"resumed at epoch {epoch} row {row} of 206: {sorted(finished)} finished, {sorted(downloaded_again)} "
          "downloaded again")
    assert len(finished - {checked}) >= 4 and downloaded_again, (finished, downloaded_again)
    assert not (finished - {checked}) & downloaded_again, (finished, checked, downloaded_again)
    if not workers:  # (the reader process logs in its own process)
        assert f"without reading {len(finished - {checked})} finished tars again" in caplog.text


def test_a_tar_missing_while_a_resume_skips_to_its_position_is_retried_and_nothing_is_left_behind(dataset_hub, tmp_path,
                                                                                                  caplog, fast_retries):
    """A resume in the first epoch reads the tars it had begun while it skips to its position: one of them answering
    404 there fails that skip, and the stream's retry replays the epoch again, exactly (the examples of a stream that
    never stopped); the failed replay is not left behind."""
    import ddpm_hf.data.replay as replay_module

    sizes = [3, 5, 4, 6, 2, 7, 4, 3, 5, 6, 4, 2, 5, 3, 6, 4, 7, 3, 4, 5, 2, 6, 3, 4]
    folder = _write_tars(tmp_path / "tars", sizes)
    shard_of = {hashlib.sha1(png_bytes(s)).hexdigest(): k
                for k in range(len(sizes)) for s in range(sum(sizes[:k]), sum(sizes[:k + 1]))}
    dataset = load_image_dataset(publish(folder, "alice/tars-lost-in-the-skip"), check_shards=False)
    _, reference = _tar_batches(dataset, 16)
    _, stopped = _tar_batches(dataset, 8)  # 32 rows of 104: the first epoch
    state = stopped.state_dict()
    begun = sorted({shard_of[example] for example in stopped.seen_ids} - set(state["tar_rows_known"]))
    assert state["tar_rows_known"] and begun, state
    caplog.set_level(logging.INFO, logger="ddpm_hf.data")
    lost = dataset_hub.inject("GET", f"train-{begun[0]:05d}.tar", "status", times=1, status=404)
    _, resumed = _tar_batches(dataset, 8, state)
    assert lost.hits and "retry 1/5" in caplog.text
    assert caplog.text.count("without reading") == 1  # the replay that got past its skip
    assert stopped.seen_ids + resumed.seen_ids == reference.seen_ids
    assert not replay_module._TAR_REPLAYS


def test_tars_missing_for_a_moment_mid_epoch_are_retried_without_the_finished_ones(dataset_hub, tmp_path, caplog,
                                                                                   fast_retries):
    """Tars that answer 404 twice once a third of the first epoch is read: the stream's retry re-opens its epoch at its
    position as a resume does, standing in for the tars it has read whole: exactly the examples of a fault-free read,
    and nothing of the replay left behind once the stream is closed."""
    import ddpm_hf.data.replay as replay_module

    folder = _write_tars(tmp_path / "tars", [3, 5, 4, 6, 2, 7, 4, 3, 5, 6, 4, 2, 5, 3, 6, 4, 7, 3, 4, 5, 2, 6, 3, 4])
    dataset = load_image_dataset(publish(folder, "alice/flaky-tars"), check_shards=False)
    reference = _tar_batches(dataset, 16)[1].seen_ids
    caplog.set_level(logging.INFO, logger="ddpm_hf.data")
    stream = TrainStream(dataset, "png", 16, 1, 4, 1, 0, 1, seed=5, shuffle_buffer_size=8, record_ids=True)
    assert _read_with_404s(dataset_hub, stream, 16, 9, "train-") == reference
    assert re.search(r"stream 0 resumes at epoch 0 row \d+ without reading [1-9]\d* finished tars again", caplog.text)
    assert not replay_module._TAR_REPLAYS


def _connections_to(hub) -> int:
    """TCP connections to the local Hub open on this machine now (Linux's table: remote port, established)."""
    port = int(hub.url.rsplit(":", 1)[1])
    with open("/proc/net/tcp") as table:
        fields = [line.split() for line in list(table)[1:]]
    return sum(1 for f in fields if int(f[2].split(":")[1], 16) == port and f[3] == "01")


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="counts connections in Linux's /proc/net/tcp")
def test_a_long_hub_webdataset_stream_keeps_its_connections_to_the_hub_bounded(dataset_hub, tmp_path):
    """datasets' reading keeps each tar's HTTP stream (and a thread) in reference cycles that the garbage collector
    seldom frees in a process holding torch: one stream over 200 Hub tars had 100 connections open, huggingface_hub's
    whole pool, by its second epoch, and stalled. The stream frees them as it goes: 150 tars read 1.2 times stay far
    from the pool's size (with decoding workers, as training on a GPU reads; the reading thread of 0 workers collects
    at most once a second, 49 connections at most here)."""
    folder = _write_tars(tmp_path / "tars", [20] * 150)
    dataset = load_image_dataset(publish(folder, "alice/many-tars"), check_shards=False)
    stream = TrainStream(dataset, "png", 16, 1, 32, 1, 0, 1, seed=5, shuffle_buffer_size=8, num_workers=1)
    before, peak = _connections_to(dataset_hub), 0  # (this process's idle ones, of its uploads and earlier tests)
    try:
        for _ in range(113):  # 3,616 rows
            stream.next_batch()
            peak = max(peak, _connections_to(dataset_hub) - before)
    finally:
        stream.close()
    print(f"at most {peak} connections opened")
    assert stream.position[0][0] == 1 and peak < 40, peak


def test_tars_changed_since_the_checkpoint_are_counted_again_and_their_other_order_stops_the_resume(tmp_path, caplog):
    """A local tar rewritten after a checkpoint (two samples added) no longer holds the samples the checkpoint counted:
    a replay from those counts would leave the new ones out. The resume drops the counts, saying so, and reads the
    epoch again up to the position, as a resume from the checkpoint without counts (an older one) does. The added
    samples move the shuffled order: both find another row there than the checkpoint saw, and stop alike, naming
    it (before, they went on in the new order). With --next_epoch_on_resume the tars are read as they are now: the
    next epoch holds every sample, the two new ones among them (oracle: the ids of the PNGs written)."""
    from ddpm_hf.errors import ResumeMismatch

    sizes = [3, 5, 4, 6, 2, 7, 4, 3] * 3
    folder = _write_tars(tmp_path / "tars", sizes)

    def read(batches, state=None):  # the folder as it is at each call
        return _tar_batches(load_image_dataset(train_data_dir=str(folder)), batches, state)

    _, stopped = read(37)  # the second epoch at row 45: every tar counted
    state = stopped.state_dict()
    assert len(state["tar_rows_known"]) == 24
    with tarfile.open(folder / "train-00023.tar", "a") as tar:  # two more samples in the last tar
        for s in (500, 501):
            _add_member(tar, f"{s:06d}.png", png_bytes(s))
    for given in (state, dict(state, tar_rows_known={})):
        with pytest.raises(ResumeMismatch, match=r"position is epoch 1, row 46, and the row before it is not the one "
                                                 r"the checkpoint saw: the data changed since the checkpoint"):
            read(10, given)
    assert "not those the checkpoint counted the samples of" in caplog.text
    anew = TrainStream(load_image_dataset(train_data_dir=str(folder)), "png", 16, 1, 4, 1, 0, 1, seed=5,
                       shuffle_buffer_size=8, record_ids=True, next_epoch_on_resume=True)
    anew.load_state_dict(state)
    ids = read_batches(anew, (sum(sizes) + 2) // 4)  # the third epoch, whole
    with tarfile.open(folder / "train-00023.tar") as tar:
        written = {hashlib.sha1(tar.extractfile(m).read()).hexdigest() for m in tar.getmembers()}
    assert written <= set(ids) and len(set(ids)) == sum(sizes) + 2


def test_local_tars_that_would_lose_images_are_refused_and_images_beside_tars_are_not_guessed(tmp_path):
    """Read before training, a local tar whose member header is corrupt midway (tarfile would just stop there) is
    named; samples whose only image has another extension than the first samples' (datasets takes the columns from
    those, and would skip these images) are refused, counted, while an optional second image (a mask) is no loss; a
    folder with both image files and tars is refused naming both, not read as one of them."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _tar_of(mixed / "train-00000.tar", [f"{s:06d}.png" for s in range(6)] + ["000006.jpg", "000007.jpg"])
    with pytest.raises(ValueError, match=r"mixed: 2 samples hold their image only as \.jpg, but datasets takes a "
                                         r"WebDataset's columns from its first samples, which give \.png"):
        load_image_dataset(train_data_dir=str(mixed))
    masks = tmp_path / "masks"
    masks.mkdir()
    _tar_of(masks / "train-00000.tar", [f"{s:06d}.png" for s in range(6)] + ["000006.png", "000006.mask.png"])
    assert [row["png"] is not None for row in load_image_dataset(train_data_dir=str(masks))] == [True] * 7
    # a file twice in one sample: datasets would stop at it mid-training ("Duplicate field"), even past a hidden file
    twice = tmp_path / "twice"
    twice.mkdir()
    _tar_of(twice / "train-00000.tar", [f"{s:06d}.png" for s in range(6)] + ["000006.png", ".DS_Store", "000006.png"])
    with pytest.raises(ValueError, match=r"twice/train-00000.tar: its sample '000006' holds two members 000006\.png, "
                                         r"and datasets stops reading the tar there"):
        load_image_dataset(train_data_dir=str(twice))
    # compressed, under the name .tar: datasets reads it (tarfile's "r|*"), and so is it checked, whole
    import gzip
    import lzma

    packed = tmp_path / "packed"
    packed.mkdir()
    _tar_of(packed / "plain.tar", [f"{s:06d}.png" for s in range(4)])
    (packed / "train-00000.tar").write_bytes(gzip.compress((packed / "plain.tar").read_bytes()))
    (packed / "plain.tar").unlink()
    assert [row["png"].size for row in load_image_dataset(train_data_dir=str(packed))] == [(20, 20)] * 4
    _tar_of(packed / "plain.tar", ["000004.png", "000005.jpg"])
    (packed / "train-00001.tar").write_bytes(lzma.compress((packed / "plain.tar").read_bytes()))
    (packed / "plain.tar").unlink()
    with pytest.raises(ValueError, match=r"packed: 1 samples hold their image only as \.jpg"):
        load_image_dataset(train_data_dir=str(packed))
    if shutil.which("tar"):  # a sparse member (GNU tar -S) is as long as its holes filled, not as its bytes in the tar
        sparse = tmp_path / "sparse"
        (sparse / "files").mkdir(parents=True)
        for s in range(2):
            (sparse / "files" / f"{s:06d}.png").write_bytes(png_bytes(s))
        os.truncate(sparse / "files" / "000001.png", len(png_bytes(1)) + 2**22)  # a hole of 4 MiB after the PNG
        subprocess.run(["tar", "-S", "--format=gnu", "-cf", str(sparse / "train-00000.tar"), "-C",
                        str(sparse / "files"), "000000.png", "000001.png"], check=True)
        shutil.rmtree(sparse / "files")
        if (sparse / "train-00000.tar").stat().st_size < 2**20:  # sparse (a filesystem without holes has none)
            assert [row["png"].size for row in load_image_dataset(train_data_dir=str(sparse))] == [(20, 20)] * 2

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    _tar_of(corrupt / "train-00000.tar", [f"{s:06d}.png" for s in range(4)])
    data = bytearray((corrupt / "train-00000.tar").read_bytes())
    third = 2 * (512 + 512)  # each member: a header block and one block of a 20×20 PNG
    assert data[third:third + 10] == b"000002.png"
    data[third:third + 10] = b"X" * 10
    (corrupt / "train-00000.tar").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-00000.tar is not a readable webdataset file \(the member after "
                                         r"member 000001.png \(byte 2048\) has a corrupt header"):
        load_image_dataset(train_data_dir=str(corrupt))
    # a block of zeros where the third member's header was (tarfile stops there quietly, as at an end of archive):
    # the rest of the tar is not an end of archive
    data[third:third + 512] = bytes(512)
    (corrupt / "train-00000.tar").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"the member after member 000001.png \(byte 2048\) has a corrupt header"):
        load_image_dataset(train_data_dir=str(corrupt))

    # image files and tars together: read as datasets reads the folder, as the kind most of its files are
    folder = tmp_path / "images"
    (folder / "train").mkdir(parents=True)
    for s in range(3):
        (folder / "train" / f"{s}.png").write_bytes(png_bytes(s))
    _tar_of(folder / "train" / "backup.tar", ["notes.png"])
    assert [row["image"].size for row in load_image_dataset(train_data_dir=str(folder))] == [(20, 20)] * 3
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        _tar_of(shards / f"train-{k:05d}.tar", [f"{k}{s:05d}.png" for s in range(2)])
    (shards / "preview.png").write_bytes(png_bytes(0))
    assert len(list(load_image_dataset(train_data_dir=str(shards)))) == 6


def test_hub_tars_whose_images_would_be_lost_are_refused_from_their_first_samples(dataset_hub, tmp_path):
    """On the Hub too, datasets takes a WebDataset's columns from the first samples: the samples of tars written with
    another image extension would have no image, and be skipped one by one all through training (half the rows
    here). Before training, each tar's first sample is read (its headers, not the tar) and such tars are refused,
    named; a label before the image, or a second image (a mask), is no loss, and a tar compressed under the name .tar
    (which datasets reads, and the check leaves alone) is read."""
    import gzip

    def tar_of(folder: Path, k: int, names):  # 96² images (9 kB each)
        _tar_of(folder / f"train-{k:05d}.tar", names, size=96, first=100 * k)

    fine, mixed = tmp_path / "fine", tmp_path / "mixed"
    for folder in (fine, mixed):
        tar_of(folder, 0, [f"{s:06d}.{ext}" for s in range(0, 5) for ext in ("cls", "png")])  # a label first
        tar_of(folder, 1, [f"{s:06d}.{ext}" for s in range(5, 10) for ext in ("png", "mask.png")])
    tar_of(mixed, 2, [f"{s:06d}.jpg" for s in range(20, 60)])  # 40 images of 96² (9 kB each)
    tar_of(mixed, 3, [f"{s:06d}.{ext}" for s in range(60, 100) for ext in ("cls", "jpg")])  # with labels, first
    repo = publish(mixed, "alice/mixed-tars")
    with pytest.raises(ValueError, match=r"^Hub dataset alice/mixed-tars: the first samples of 2 tars "
                                         r"\(train-00002.tar, train-00003.tar\) hold their image only as \.jpg, but "
                                         r"datasets takes a WebDataset's columns from its first samples, which give "
                                         r"\.png: those images would be skipped\. Write every sample's image under one "
                                         r"extension\.$"):
        load_image_dataset(repo)
    for k in (2, 3):  # read up to the second sample's header: a block or two of 16 kB, and the end
        sent = dataset_hub.bytes_read(repo)[f"train-{k:05d}.tar"][1]
        assert sent <= 3 * 16 * 1024 < (mixed / f"train-{k:05d}.tar").stat().st_size / 5, sent
    tar_of(fine, 2, [f"{s:06d}.png" for s in range(10, 13)])
    (fine / "train-00002.tar").write_bytes(gzip.compress((fine / "train-00002.tar").read_bytes()))  # datasets reads it
    rows = list(load_image_dataset(publish(fine, "alice/fine-tars")))
    assert len(rows) == 13 and all(row["png"] is not None for row in rows)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_hub_image_file_missing_for_a_moment_is_read_again_and_one_gone_is_skipped(dataset_hub, tmp_path,
                                                                                     monkeypatch, workers):
    """An image file of a Hub image folder that answers 404 twice is read again (no library retries a 404): the
    same batches as a read without faults. One that is gone for good is skipped and counted, as an undecodable image
    is: the same rows are skipped in every run over the data."""
    import ddpm_hf.data.decoding as decoding

    monkeypatch.setattr(decoding, "REMOTE_READ_PAUSE_S", 0.01)
    folder = tmp_path / "folder"
    (folder / "train").mkdir(parents=True)
    for s in range(8):
        (folder / "train" / f"{s}.png").write_bytes(png_bytes(s))
    repo = publish(folder, "alice/flaky")

    def batches():
        stream = TrainStream(load_image_dataset(repo), "image", 16, 1, 4, 1, 0, 1, seed=5, shuffle_buffer_size=8,
                             num_workers=workers)
        try:
            return [stream.next_batch() for _ in range(2)], stream.skipped_rows
        finally:
            stream.close()

    reference, skipped = batches()
    assert skipped == 0
    flaky = dataset_hub.inject("GET", "train/5.png", "status", times=3, status=404)
    again, skipped = batches()
    assert len(flaky.hits) == 3 and skipped == 0  # read at its fourth try
    assert all(torch.equal(a, b) for a, b in zip(again, reference))
    gone = dataset_hub.inject("GET", "train/5.png", "status", times=-1, status=404)
    _, skipped = batches()
    assert skipped == 1 and len(gone.hits) == decoding.REMOTE_READ_ATTEMPTS == 4
    dataset_hub.faults.remove(gone)
    # a file the Hub refuses otherwise (403: access withdrawn) is not skipped, which would change the data: the run
    # stops (its checkpoints intact). (A 5xx is retried by huggingface_hub first, for minutes.)
    dataset_hub.inject("GET", "train/5.png", "status", times=-1, status=403)
    with pytest.raises(OSError, match=r"train/5\.png after 4 tries"):
        batches()


@pytest.fixture(scope="module")
def train():
    return load_train_script()


def test_a_pipeline_trained_on_a_hub_dataset_is_published_with_the_dataset_in_its_card(dataset_hub, train,
                                                                                          tmp_path):
    """The model card's metadata names the Hub dataset the run trained on (`datasets:`), so that the Hub links the
    two; a local folder is not in the metadata, and the card's training configuration shows no path of this machine
    (the data's folder by its name only)."""
    root = tmp_path / "repo"
    write_images(root / "data", count=16, shards=2)
    publish(root, "alice/cards-data")
    base = FAST + ["--max_train_steps", "2", "--checkpointing_steps", "0", "--dataloader_num_workers", "0",
                   "--hub_token", TOKEN, "--push_to_hub"]
    train_in_process(train, base + ["--dataset_name", "alice/cards-data", "--hub_model_id", "alice/cards-model",
                                    "--output_dir", str(tmp_path / "hub-run")])
    card = dataset_hub.repos["alice/cards-model"].files("main")[1]["README.md"].decode()
    assert '\ndatasets:\n- "alice/cards-data"\n' in card.split("---")[1]  # the YAML metadata
    # without --hub_model_id the repo is named after --output_dir, in the token's account (diffusers' example's way)
    train_in_process(train, base + ["--dataset_name", str(root), "--output_dir", str(tmp_path / "local-model")])
    card = dataset_hub.repos["alice/local-model"].files("main")[1]["README.md"].decode()
    assert "datasets:" not in card and str(tmp_path) not in card and "| dataset_name | local folder repo |" in card


def test_a_run_from_a_hub_model_records_its_commit_and_names_it_as_base_model(dataset_hub, train, tmp_path):
    """--pretrained_model_name_or_path from the Hub: the weights are the repo's, --revision is recorded as the commit
    it read (main resolved, as --dataset_revision is), and the published card names the repo as its base_model."""
    from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet
    from ddpm_hf.presets import unet_config

    torch.manual_seed(3)
    source = DDPMUNet(**unet_config("tiny-16"))
    DDPMPipeline(unet=source, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "base")
    api = HfApi(token=TOKEN)
    api.create_repo("alice/base-model")
    api.upload_folder(repo_id="alice/base-model", folder_path=str(tmp_path / "base"))
    commit = api.model_info("alice/base-model").sha
    root = tmp_path / "repo"
    write_images(root / "data", count=16, shards=2)
    argv = [a for a in FAST if a not in ("--ema_max_decay", "0.9")]
    train_in_process(train, argv + ["--dataset_name", str(root), "--max_train_steps", "1", "--checkpointing_steps",
                                    "0", "--dataloader_num_workers", "0", "--no-use_ema", "--learning_rate", "1e-6",
                                    "--lr_warmup_steps", "0", "--hub_token", TOKEN, "--push_to_hub",
                                    "--hub_model_id", "alice/tuned", "--pretrained_model_name_or_path",
                                    "alice/base-model", "--output_dir", str(tmp_path / "run")])
    assert json.loads((tmp_path / "run" / "training_config.json").read_text())["revision"] == commit
    trained = DDPMUNet.from_pretrained(tmp_path / "run" / "unet")
    assert max((v - source.state_dict()[k]).abs().max().item() for k, v in trained.state_dict().items()) <= 1.2e-6
    card = dataset_hub.repos["alice/tuned"].files("main")[1]["README.md"].decode()
    assert '\nbase_model: "alice/base-model"\n' in card.split("---")[1]


def test_a_resume_reads_the_hub_model_at_the_commit_the_run_started_from(dataset_hub, train, tmp_path):
    """A run from a Hub model, checkpointed; then new weights are pushed to that model. The resume reads the commit the
    run started from (run_info.json), downloads nothing of the new one, and goes on recording that commit; before, it
    downloaded the new weights only to replace them with the checkpoint's, and recorded the new commit as the run's
    base. A new run reads the new commit."""
    from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet
    from ddpm_hf.presets import unet_config

    api = HfApi(token=TOKEN)
    api.create_repo("alice/moving-base")
    commits = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        DDPMPipeline(unet=DDPMUNet(**unet_config("tiny-16")), scheduler=DDPMScheduler()).save_pretrained(
            tmp_path / f"base{seed}")
        if seed == 3:
            api.upload_folder(repo_id="alice/moving-base", folder_path=str(tmp_path / "base3"))
            commits.append(api.model_info("alice/moving-base").sha)
    root = tmp_path / "repo"
    write_images(root / "data", count=16, shards=2)
    cache = tmp_path / "cache"
    argv = FAST + ["--dataset_name", str(root), "--checkpointing_steps", "1", "--dataloader_num_workers", "0",
                   "--hub_token", TOKEN, "--cache_dir", str(cache), "--pretrained_model_name_or_path",
                   "alice/moving-base"]
    train_in_process(train, argv + ["--max_train_steps", "1", "--output_dir", str(tmp_path / "run")])
    api.upload_folder(repo_id="alice/moving-base", folder_path=str(tmp_path / "base4"))
    commits.append(api.model_info("alice/moving-base").sha)
    assert commits[0] != commits[1]
    train_in_process(train, argv + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest", "--output_dir",
                                    str(tmp_path / "run")])
    assert json.loads((tmp_path / "run" / "training_config.json").read_text())["revision"] == commits[0]
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["pretrained_revision"] == commits[0]
    snapshots = cache / "models--alice--moving-base" / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == [commits[0]]
    # a resume from another model: that model's main, not the commit of the one the run started from
    other = train.parse_args(["--pretrained_model_name_or_path", "alice/other-base", "--resume_from_checkpoint",
                              "latest", "--output_dir", str(tmp_path / "run")])
    assert train.pretrained_revision_to_read(other) is None
    assert train.pretrained_revision_to_read(train.parse_args(argv[-2:] + [
        "--resume_from_checkpoint", "latest", "--output_dir", str(tmp_path / "run")])) == commits[0]
    train_in_process(train, argv + ["--max_train_steps", "1", "--output_dir", str(tmp_path / "new")])
    assert json.loads((tmp_path / "new" / "run_info.json").read_text())["pretrained_revision"] == commits[1]


def test_the_bits_per_dim_images_are_read_at_the_commit_training_reads(dataset_hub, train, tmp_path):
    """--eval_steps' images come from the commit the run trains on (they came from main as it is now, whatever
    --dataset_revision or the resumed checkpoints' commit said). Oracle: the same files read from a local folder."""
    from ddpm_hf.evaluation import load_eval_images

    old, new = write_images(tmp_path / "old" / "data", count=8, shards=1), tmp_path / "new" / "data"
    write_images(new, count=16, shards=1)  # the same file name, other rows
    repo = publish(old.parent, "alice/moving-data")
    commit = HfApi(token=TOKEN).dataset_info(repo).sha
    HfApi(token=TOKEN).upload_folder(repo_id=repo, repo_type="dataset", folder_path=str(new.parent))
    args = train.parse_args(["--dataset_name", repo, "--hub_token", TOKEN, "--eval_split", "train"])
    expected = load_eval_images(str(old.parent), 64, 16, 1, split="train")
    assert len(expected) == 8 and len(load_eval_images(repo, 64, 16, 1, split="train", token=TOKEN)) == 16
    assert torch.equal(train.bits_per_dim_images(args, 16, 1, commit), expected)


def test_a_resume_reads_the_commit_its_checkpoints_read_after_a_push(dataset_hub, train, tmp_path):
    """A run checkpointed, then the dataset's card edited on the Hub (a commit that changes no data, as a bot's or a
    typo fix's): the resume used to be refused, naming --dataset_revision. It reads the checkpoints' commit now and
    ends on the uninterrupted run's weights; a new run reads the new commit."""
    root = tmp_path / "repo"
    write_images(root / "data", count=16, shards=2)
    repo = publish(root, "alice/edited")
    commit = HfApi(token=TOKEN).dataset_info(repo).sha
    base = FAST + ["--dataset_name", repo, "--hub_token", TOKEN, "--checkpointing_steps", "2",
                   "--dataloader_num_workers", "0"]
    train_in_process(train, base + ["--max_train_steps", "4", "--output_dir", str(tmp_path / "whole")])
    train_in_process(train, base + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "run")])
    HfApi(token=TOKEN).upload_file(path_or_fileobj=b"# edited\n", path_in_repo="README.md", repo_id=repo,
                                   repo_type="dataset")
    assert HfApi(token=TOKEN).dataset_info(repo).sha != commit
    train_in_process(train, base + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest", "--output_dir",
                                    str(tmp_path / "run")])
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["dataset_revision"] == commit
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "run")
    assert all(torch.equal(a[key], b[key]) for key in a)
    train_in_process(train, base + ["--max_train_steps", "1", "--output_dir", str(tmp_path / "new")])
    assert json.loads((tmp_path / "new" / "run_info.json").read_text())["dataset_revision"] != commit


@pytest.mark.parametrize("case, words", [
    ("missing", "Hub dataset alice/ungated does not exist or this token cannot read it"),
    ("no_token", "Hub dataset alice/private does not exist or this token cannot read it"),
    ("wrong_token", "pass --hub_token (or set HF_TOKEN) with read access"),
    ("split", "has no split 'holdout'; its splits: ['train']. Pass one of them with --split"),
    ("config", "Pass one of them with --dataset_config_name"),
    ("no_image_column", "no image column (columns: ['text'])"),
    ("truncated", "data/train-00001-of-00002.parquet is not a readable parquet file"),
    ("not_parquet", "data/train-00000-of-00002.parquet is not a readable parquet file"),
    # a gated dataset: a token is not enough (its conditions are to be accepted on its page), as datasets says
    ("gated", "Hub dataset alice/repo is gated: Dataset 'alice/repo' is a gated dataset on the Hub. Visit the "
              "dataset page at https://huggingface.co/datasets/alice/repo to ask for access. Accept its conditions"),
    ("script", "is read by a loading script, which datasets no longer runs (Dataset scripts are no longer supported, "
               "but found repo.py). The Hub's Parquet export of it loads: pass --dataset_revision refs/convert/parquet"),
    ("pixel_arrays", "--image_column 'pixel_values' holds Array3D(shape=(4, 4, 1), dtype='float32'), not encoded "
                     "images"),
])
def test_bad_hub_datasets_are_named_before_training(dataset_hub, train, tmp_path, case, words):
    root = tmp_path / "repo"
    write_images(root / "data", count=8, shards=2)
    argv, name = [], "alice/repo"
    if case == "no_token":
        publish(root, "alice/private", private=True)
        name = "alice/private"
    elif case == "wrong_token":
        publish(root, "alice/private", private=True)
        name, argv = "alice/private", ["--hub_token", "hf_test_bob"]
    elif case == "missing":
        name = "alice/ungated"  # (not taken for a gated one by its name)
    else:
        if case == "no_image_column":
            for path in (root / "data").glob("*.parquet"):
                path.unlink()
            Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
        elif case == "truncated":
            shard = root / "data" / "train-00001-of-00002.parquet"
            shard.write_bytes(shard.read_bytes()[:-100])
        elif case == "not_parquet":
            (root / "data" / "train-00000-of-00002.parquet").write_text("not parquet at all\n" * 50)
        elif case == "script":
            (root / "repo.py").write_text("import datasets  # a loading script\n")
        elif case == "pixel_arrays":
            for path in (root / "data").glob("*.parquet"):
                path.unlink()
            Dataset.from_dict({"pixel_values": [np.zeros((4, 4, 1), np.float32)] * 2},
                              features=Features({"pixel_values": Array3D((4, 4, 1), "float32")})).to_parquet(
                str(root / "data" / "train-00000-of-00001.parquet"))
        publish(root, name)
        if case == "gated":
            dataset_hub.datasets[name].gated = True
        argv = {"split": ["--split", "holdout"], "config": ["--dataset_config_name", "nope"],
                "gated": ["--hub_token", "hf_test_bob"], "pixel_arrays": ["--image_column", "pixel_values"]}.get(case, [])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(train, FAST + ["--max_train_steps", "2", "--dataset_name", name, *argv, "--output_dir",
                                        str(out)])
    message = str(exit_info.value.code)
    assert words in message, message
    assert "\n" not in message.strip() and "Traceback" not in message
    assert not out.exists() or not list(out.glob("checkpoint-*"))
    assert "hf_test" not in message


@pytest.mark.distributed
def test_a_dataset_the_main_process_refuses_stops_every_process_at_once(dataset_hub, tmp_path):
    """The main process alone reads the shards' footers; when it refuses the dataset, the other process, which opened
    it without complaint, stops too instead of waiting for the main one (up to --ddp_timeout). The message is said
    once, by the machine's first process, not once per process."""
    root = tmp_path / "repo"
    write_images(root / "data", count=8, shards=2)
    shard = root / "data" / "train-00001-of-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    publish(root, "alice/truncated")
    log = tmp_path / "log.txt"
    proc = _two_processes(FAST + ["--dataset_name", "alice/truncated", "--max_train_steps", "2", "--ddp_timeout", "600",
                                  "--output_dir", str(tmp_path / "out")], log)
    try:
        code = proc.wait(timeout=300)
    finally:
        kill_everything(proc)
    text = log.read_text()
    assert code != 0 and text.count("data/train-00001-of-00002.parquet is not a readable parquet file") == 1, text[-3000:]
    # the first failure torch's launcher saw: the process that said why (the other waits for it to, then is ended)
    assert "failed (exitcode: 1) local_rank: 0 " in text, text[-3000:]


def test_evaluate_reads_a_private_hub_split_with_hf_token_like_the_local_files(dataset_hub, tmp_path, monkeypatch,
                                                                                capsys):
    """`ddpm-hf evaluate --data org/name` with HF_TOKEN: the same bits/dim as on the same files read locally."""
    from helpers import tiny_pipeline

    from ddpm_hf.cli import main as cli

    root = tmp_path / "repo"
    write_images(root / "data", count=4, shards=1)
    (root / "data" / "train-00000-of-00001.parquet").rename(root / "data" / "test-00000-of-00001.parquet")
    repo = publish(root, "alice/evalset", private=True)
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    results = {}
    for name, data in (("local", str(root)), ("hub", repo)):
        if name == "hub":
            monkeypatch.setenv("HF_TOKEN", TOKEN)
        out = tmp_path / name
        assert cli(["evaluate", str(tmp_path / "pipe"), "--data", data, "--metrics", "bpd", "--num_bpd_images", "4",
                    "--bpd_timesteps", "3", "--out", str(out)]) == 0
        results[name] = json.loads((out / "results.json").read_text())["bpd"]
    assert results["hub"]["bits_per_dim"] == results["local"]["bits_per_dim"]
    assert results["hub"]["num_images"] == 4

    # --hub_token (as train.py's), for a private dataset and a private pipeline, without HF_TOKEN; said nowhere
    from ddpm_hf import DDPMPipeline

    monkeypatch.delenv("HF_TOKEN")
    DDPMPipeline.from_pretrained(tmp_path / "pipe").push_to_hub("alice/private-pipe", private=True, token=TOKEN,
                                                                sample_grid=False)
    args = ["evaluate", "alice/private-pipe", "--data", repo, "--metrics", "bpd", "--num_bpd_images", "4",
            "--bpd_timesteps", "3"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # (no token: a private repo is not found)
        cli(args + ["--out", str(tmp_path / "no-token")])
    assert refused.value.code == 2 and "does not exist or this token cannot read it" in capsys.readouterr().err
    assert cli(args + ["--hub_token", TOKEN, "--out", str(tmp_path / "flag")]) == 0
    assert json.loads((tmp_path / "flag" / "results.json").read_text())["bpd"]["bits_per_dim"] == \
        results["local"]["bits_per_dim"]
    for path in (tmp_path / "flag").rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def test_evaluate_checks_a_hub_splits_shards_once(dataset_hub, tmp_path):
    """Evaluate reads its split three times here (the check before any work, the bound's images, the
    interpolation's two): the shards' footers, a request per shard, are read at the first only. The shards after the
    first, which hold none of the images read, are asked for once each (three times before)."""
    from helpers import tiny_pipeline

    from ddpm_hf.cli import main as cli

    root = tmp_path / "repo"
    write_images(root / "data", count=32, shards=4)
    for shard in (root / "data").glob("train-*.parquet"):
        shard.rename(shard.with_name(shard.name.replace("train-", "test-")))
    repo = publish(root, "alice/checked-once")
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    assert cli(["evaluate", str(tmp_path / "pipe"), "--data", repo, "--metrics", "bpd,interpolation",
                "--num_bpd_images", "4", "--bpd_timesteps", "3", "--out", str(tmp_path / "out")]) == 0

    def requests_per_shard():
        asked = {}
        for read in dataset_hub.reads:
            if read.repo_id == repo and read.path.endswith(".parquet"):
                asked[read.path] = asked.get(read.path, 0) + 1
        return asked

    asked = requests_per_shard()
    dataset_hub.reads.clear()
    load_image_dataset(repo, split="test", check_shards=True)  # one check alone: what it asks of each shard
    one_check = requests_per_shard()
    first, *later = sorted(asked)
    assert len(later) == 3 and all(asked[path] == one_check[path] for path in later), (asked, one_check)


def test_the_stand_ins_of_a_killed_replay_are_removed_by_the_next(tmp_path, monkeypatch):
    """A resume replays its epoch's order over stand-in files in a temporary folder named with its pid; a SIGKILL
    leaves the folder behind (16 bytes per row of the dataset). The next replay removes those of dead processes, and
    only those."""
    import tempfile

    from ddpm_hf.data.replay import remove_replay_leftovers

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = tmp_path / f"ddpm_hf_replay_{int(gone.stdout)}_x1", tmp_path / f"ddpm_hf_replay_{os.getpid()}_x2"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "0000000.parquet").write_bytes(b"stand-in")
    (tmp_path / "ddpm_hf_replay_notapid").mkdir()
    remove_replay_leftovers()
    assert not dead.exists() and alive.exists() and (tmp_path / "ddpm_hf_replay_notapid").exists()
