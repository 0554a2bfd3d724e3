"""Dataset repos on the local Hub server (tests/fakehub.py), read and written by the unmodified `datasets` and
huggingface_hub clients over real HTTP: streaming by Range requests, plain downloads, configs and splits from the
README, an image folder, private repos, push_to_hub, and faults in the middle of a shard. The `hub` fixture fails a
test whose client asked for something the server does not know (``hub.misses``)."""

import io
import os
import re

import datasets
import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError
from PIL import Image

from helpers import run_without_ddpm_hf

ALICE, BOB = "hf_test_alice", "hf_test_bob"
FOOTER_READ = 64 * 1024  # pyarrow's first read of a parquet file: its last 64 KiB (footer and metadata)
pytestmark = pytest.mark.hub
datasets.disable_progress_bars()


@pytest.fixture(autouse=True)
def _uploads_through_lfs(dataset_hub):
    """Every test here uploads a dataset repo (see the dataset_hub fixture); the tests name the same server ``hub``."""


def _write_shards(folder, num_shards, rows_per_shard, rows_per_group, blob_bytes=0, split="train", subdir="data"):
    """``{subdir}/{split}-0000i-of-0000N.parquet`` as the Hub lays out a dataset; rows are numbered across shards."""
    rng = np.random.default_rng(num_shards * rows_per_shard)
    paths = []
    for shard in range(num_shards):
        ids = list(range(shard * rows_per_shard, (shard + 1) * rows_per_shard))
        columns = {"id": ids, "text": [f"{split} row {i}" for i in ids]}
        if blob_bytes:
            columns["blob"] = [rng.bytes(blob_bytes) for _ in ids]
        path = folder / subdir / f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(columns).to_parquet(path, batch_size=rows_per_group)
        paths.append(path)
    return paths


def _upload(folder, repo_id, private=False):
    api = HfApi(token=ALICE)
    api.create_repo(repo_id, repo_type="dataset", private=private)
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder)


def _rows(dataset):
    return [dict(row) for row in dataset]


def _local_stream(paths):
    return datasets.load_dataset("parquet", data_files=[str(p) for p in paths], split="train", streaming=True)


def _png(seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return pixels, buffer.getvalue()


def _footer_and_row_reads(hub, repo_id, path):
    """The reads of one shard: those of its last 64 KiB, and the others (the rows), in order."""
    size = path.stat().st_size
    reads = [(r.start, r.end) for r in hub.reads if r.repo_id == repo_id and r.path == f"data/{path.name}"]
    footers = [span for span in reads if span == (size - FOOTER_READ, size)]
    return footers, [span for span in reads if span not in footers]


def _assert_read_front_to_back_once(hub, repo_id, path, footer_reads):
    """After the footer, the rows' ranges follow each other from byte 4 (past the magic number) to the end, with no
    gap and no overlap: every byte of the shard travels once, the footer's ``footer_reads`` times."""
    size = path.stat().st_size
    footers, rows = _footer_and_row_reads(hub, repo_id, path)
    assert len(footers) == footer_reads and rows[0][0] == 4 and rows[-1][1] == size, (footers, rows)
    assert all(previous[1] == following[0] for previous, following in zip(rows, rows[1:])), rows
    assert hub.bytes_read(repo_id)[f"data/{path.name}"] == ([(4, size)], size - 4 + footer_reads * FOOTER_READ)
    return rows


def test_streaming_reads_each_shard_by_ranges_and_yields_the_local_rows_in_order(hub, tmp_path):
    paths = _write_shards(tmp_path / "repo", num_shards=4, rows_per_shard=30, rows_per_group=10, blob_bytes=3000)
    _upload(tmp_path / "repo", "alice/four")
    streamed = _rows(datasets.load_dataset("alice/four", split="train", streaming=True))
    assert streamed == _rows(_local_stream(paths)) and len(streamed) == 120
    assert [row["id"] for row in streamed] == list(range(120))

    reads = [r for r in hub.reads if r.repo_id == "alice/four" and r.path.startswith("data/")]
    assert reads and all(r.status == 206 and r.repo_type == "dataset" and r.sent == r.end - r.start for r in reads)
    for index, path in enumerate(paths):  # the first shard's footer is read twice: for the schema, then the rows
        assert len(_assert_read_front_to_back_once(hub, "alice/four", path, 2 if index == 0 else 1)) == 1


def test_a_tiny_shard_is_read_whole_by_its_footer_read(hub, tmp_path):
    (path,) = _write_shards(tmp_path / "repo", num_shards=1, rows_per_shard=30, rows_per_group=10)
    _upload(tmp_path / "repo", "alice/tiny")
    assert [row["id"] for row in datasets.load_dataset("alice/tiny", split="train", streaming=True)] == list(range(30))
    size = path.stat().st_size
    assert [(r.start, r.end, r.status) for r in hub.reads] == [(0, size, 206)] * 2


@pytest.mark.slow
def test_a_shard_over_32_mib_is_read_in_several_sequential_ranges(hub, tmp_path):
    # pyarrow coalesces the row groups it pre-buffers into ranges of at most 32 MiB: 3 row groups of 24 MB make 3
    # ranges (each one's end also filled by fsspec's 5 MB read-ahead block).
    (path,) = _write_shards(tmp_path / "repo", num_shards=1, rows_per_shard=300, rows_per_group=100,
                            blob_bytes=240_000)
    _upload(tmp_path / "repo", "alice/big")
    streamed = datasets.load_dataset("alice/big", split="train", streaming=True)
    assert [row["id"] for row in streamed] == list(range(300))
    assert len(_assert_read_front_to_back_once(hub, "alice/big", path, footer_reads=2)) == 3


def test_non_streaming_load_downloads_each_file_once_into_the_cache_dir(hub, tmp_path):
    paths = _write_shards(tmp_path / "repo", num_shards=2, rows_per_shard=25, rows_per_group=10)
    _upload(tmp_path / "repo", "alice/plain")
    loaded = datasets.load_dataset("alice/plain", split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.to_list() == _rows(_local_stream(paths))
    assert any(f.name.endswith(".arrow") for f in (tmp_path / "cache").rglob("*"))
    per_file = hub.bytes_read("alice/plain")
    assert {name: sent for name, (_, sent) in per_file.items()} == {f"data/{p.name}": p.stat().st_size for p in paths}


README_WITH_CONFIGS = """---
configs:
- config_name: digits
  default: true
  data_files:
  - split: train
    path: digits/train-*.parquet
  - split: holdout
    path: digits/holdout-*.parquet
- config_name: letters
  data_files:
  - split: train
    path: letters/train-*.parquet
---
# Two configs, one with a split that is not train/test/validation
"""


def test_configs_and_a_non_default_split_from_the_readme(hub, tmp_path):
    folder = tmp_path / "repo"
    digits_train = _write_shards(folder, 2, 10, 5, subdir="digits")
    digits_holdout = _write_shards(folder, 1, 7, 5, split="holdout", subdir="digits")
    letters = _write_shards(folder, 3, 4, 2, subdir="letters")
    (folder / "README.md").write_text(README_WITH_CONFIGS)
    _upload(folder, "alice/configs")

    assert datasets.get_dataset_config_names("alice/configs") == ["digits", "letters"]
    assert sorted(datasets.get_dataset_split_names("alice/configs", "digits")) == ["holdout", "train"]
    for config, split, paths in (("digits", "train", digits_train), (None, "holdout", digits_holdout),
                                 ("letters", "train", letters)):
        streamed = datasets.load_dataset("alice/configs", config, split=split, streaming=True)
        assert _rows(streamed) == _rows(_local_stream(paths)), (config, split)
    with pytest.raises(ValueError, match=re.escape("Bad split: holdout. Available splits: ['train']")):
        list(datasets.load_dataset("alice/configs", "letters", split="holdout", streaming=True))


def _image_folder_repo(hub, tmp_path, metadata):
    """train/img_{i}.png with label i in train/{metadata}; returns {file name: pixels}."""
    folder = tmp_path / "repo" / "train"
    folder.mkdir(parents=True)
    pixels = {}
    for index in range(5):
        pixels[f"img_{index}.png"], data = _png(index)
        (folder / f"img_{index}.png").write_bytes(data)
    if metadata.endswith(".csv"):
        (folder / metadata).write_text("file_name,label\n" + "".join(f"img_{i}.png,{i}\n" for i in range(5)))
    else:
        (folder / metadata).write_text("".join(f'{{"file_name": "img_{i}.png", "label": {i}}}\n' for i in range(5)))
    _upload(tmp_path / "repo", "alice/pictures")
    return pixels


def _assert_images_match(rows, pixels):
    assert sorted(row["label"] for row in rows) == list(range(5))
    for row in rows:  # each image comes with its own metadata
        np.testing.assert_array_equal(np.asarray(row["image"]), pixels[f"img_{row['label']}.png"])


@pytest.mark.parametrize("metadata", ["metadata.csv", "metadata.jsonl"])
def test_an_image_folder_repo_streams_images_with_their_metadata(hub, tmp_path, metadata):
    pixels = _image_folder_repo(hub, tmp_path, metadata)
    _assert_images_match(_rows(datasets.load_dataset("alice/pictures", split="train", streaming=True)), pixels)
    read_files = {r.path for r in hub.reads if r.repo_id == "alice/pictures"}
    assert read_files == {f"train/{name}" for name in pixels} | {f"train/{metadata}"}
    assert {r.status for r in hub.reads if r.path.endswith(".png")} == {200}  # images are fetched whole, no Range


def test_an_image_download_dropped_mid_body_is_fetched_again_whole(hub, tmp_path):
    pixels = _image_folder_repo(hub, tmp_path, "metadata.csv")
    fault = hub.inject("GET", "train/img_2.png", "cut")  # half of the image, then the connection closes
    _assert_images_match(_rows(datasets.load_dataset("alice/pictures", split="train", streaming=True)), pixels)
    size = len(hub.datasets["alice/pictures"].files("main")[1]["train/img_2.png"])
    # huggingface_hub's streaming file reopens the download at once (no pause), from the position its reader had
    # reached: 0 for a whole-file read, so the image comes again whole, without a Range header.
    assert len(fault.hits) == 1
    assert [(r.status, r.start, r.sent) for r in hub.reads if r.path == "train/img_2.png"] == [
        (200, 0, size // 2), (200, 0, size)]


def test_private_dataset_needs_the_owners_token(hub, tmp_path):
    paths = _write_shards(tmp_path / "repo", num_shards=1, rows_per_shard=6, rows_per_group=3)
    _upload(tmp_path / "repo", "alice/secret-data", private=True)
    # What `datasets` raises is what training has to turn into a clear error: one DatasetNotFoundError, with no
    # cause attached, for "no token" and for "someone else's token"; huggingface_hub tells them apart (401, 404).
    for token, status in ((False, 401), (BOB, 404)):
        with pytest.raises(datasets.exceptions.DatasetNotFoundError,
                           match="^Dataset 'alice/secret-data' doesn't exist on the Hub or cannot be accessed.$") as err:
            datasets.load_dataset("alice/secret-data", split="train", streaming=True, token=token)
        assert err.value.__cause__ is None
        with pytest.raises(huggingface_hub.errors.RepositoryNotFoundError) as hub_err:
            HfApi().dataset_info("alice/secret-data", token=token)
        assert hub_err.value.response.status_code == status
    streamed = datasets.load_dataset("alice/secret-data", split="train", streaming=True, token=ALICE)
    assert _rows(streamed) == _rows(_local_stream(paths))
    assert {r.user for r in hub.reads} == {"alice"}


def test_push_to_hub_then_load_round_trip(hub, tmp_path):
    images = [_png(seed) for seed in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    train = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p, _ in images], "label": list(range(6))},
                                       features=features)
    train.push_to_hub("alice/pushed", token=ALICE, num_shards=3)
    train.select(range(2)).push_to_hub("alice/pushed", split="test", token=ALICE)

    files = sorted(HfApi().list_repo_files("alice/pushed", repo_type="dataset"))
    assert files == [".gitattributes", "README.md", "data/test-00000-of-00001.parquet",
                     "data/train-00000-of-00003.parquet", "data/train-00001-of-00003.parquet",
                     "data/train-00002-of-00003.parquet"]
    card = hub.datasets["alice/pushed"].files("main")[1]["README.md"].decode()
    assert "configs:" in card and "path: data/train-*" in card and "path: data/test-*" in card
    streamed = _rows(datasets.load_dataset("alice/pushed", split="train", streaming=True))
    downloaded = datasets.load_dataset("alice/pushed", cache_dir=str(tmp_path / "cache"))
    assert [row["label"] for row in streamed] == list(range(6)) and downloaded["test"]["label"] == [0, 1]
    for rows in (streamed, downloaded["train"]):
        for row, (pixels, _) in zip(rows, images):
            np.testing.assert_array_equal(np.asarray(row["image"]), pixels)


def test_repo_info_paths_info_and_missing_refs_answer_as_the_hub(hub, tmp_path):
    (path,) = _write_shards(tmp_path / "repo", num_shards=1, rows_per_shard=3, rows_per_group=3)
    _upload(tmp_path / "repo", "alice/unconverted")
    api = HfApi()
    info = api.dataset_info("alice/unconverted")
    assert info.id == "alice/unconverted" and info.private is False and info.sha == hub.datasets[
        "alice/unconverted"].history[-1]
    assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", f"data/{path.name}"]
    entries = api.get_paths_info("alice/unconverted", [f"data/{path.name}", "data", "nope.txt"], repo_type="dataset")
    assert [(type(e).__name__, e.path) for e in entries] == [("RepoFolder", "data"), ("RepoFile", f"data/{path.name}")]
    assert entries[1].size == path.stat().st_size
    with pytest.raises(huggingface_hub.errors.EntryNotFoundError):
        list(api.list_repo_tree("alice/unconverted", "no-such-folder", repo_type="dataset"))
    # No dataset-viewer conversion here: `datasets` asks the viewer first (unreachable from HF_ENDPOINT=127.0.0.1,
    # which it takes as "no export"); the ref itself is a missing revision, as on the Hub.
    with pytest.raises(RevisionNotFoundError):
        api.dataset_info("alice/unconverted", revision="refs/convert/parquet")


# -- faults in the middle of a stream ---------------------------------------------------------------------------------

SHARD1 = "data/train-00001-of-00002.parquet"


def _faulty_repo(hub, tmp_path):
    """Two ~110 kB shards of 4 row groups: past the footer read, the rows come in one range [4, size)."""
    paths = _write_shards(tmp_path / "repo", num_shards=2, rows_per_shard=100, rows_per_group=25, blob_bytes=1000)
    _upload(tmp_path / "repo", "alice/flaky-data")
    clean = _rows(datasets.load_dataset("alice/flaky-data", split="train", streaming=True))
    clean_sent = hub.bytes_read("alice/flaky-data")[SHARD1][1]
    hub.reads.clear()
    return paths, clean, clean_sent


@pytest.mark.parametrize("kind", ["status", "cut", "stall", "stall mid-body"])
def test_a_fault_in_a_range_read_is_retried_from_the_start_of_that_range(hub, tmp_path, monkeypatch, kind):
    paths, clean, clean_sent = _faulty_repo(hub, tmp_path)
    size = paths[1].stat().st_size
    middle = (size - FOOTER_READ) // 2  # inside the rows' range, outside the footer read: the cut hits the former
    # the client's read timeout, a third of the stalls: an unfaulted read answered late on a busy machine is no timeout
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DOWNLOAD_TIMEOUT", 2)
    fault = {"status": lambda: hub.inject("GET", SHARD1, "status", times=2, status=503),
             "cut": lambda: hub.inject("GET", SHARD1, "cut", cut_at=middle),
             "stall": lambda: hub.inject("GET", SHARD1, "stall", seconds=6),
             "stall mid-body": lambda: hub.inject("GET", SHARD1, "cut", cut_at=middle, seconds=6)}[kind]()

    streamed = _rows(datasets.load_dataset("alice/flaky-data", split="train", streaming=True))
    assert streamed == clean  # no row lost or repeated
    assert len(fault.hits) == fault.times
    reads = [(r.start, r.end, r.sent) for r in hub.reads if r.path == SHARD1]
    if kind in ("cut", "stall mid-body"):
        # huggingface_hub asks again for the whole range, not from where the body stopped: the partial body is wasted
        assert reads[-2:] == [(4, size, middle - 4), (4, size, size - 4)], reads
        assert hub.bytes_read("alice/flaky-data")[SHARD1][1] == clean_sent + middle - 4
    else:  # the failed requests sent no body
        assert hub.bytes_read("alice/flaky-data")[SHARD1][1] == clean_sent


def test_a_server_error_that_persists_ends_the_stream_with_the_hub_error(hub, tmp_path):
    _faulty_repo(hub, tmp_path)
    fault = hub.inject("GET", SHARD1, "status", times=-1, status=500, retry_after=0)
    stream = iter(datasets.load_dataset("alice/flaky-data", split="train", streaming=True))
    first_shard = [next(stream)["id"] for _ in range(100)]
    with pytest.raises(HfHubHTTPError, match="500 Internal Server Error") as err:
        next(stream)
    assert first_shard == list(range(100)) and err.value.response.status_code == 500
    assert len(fault.hits) == 6  # huggingface_hub's 5 retries; datasets does not retry a 500 (only 429 and 504)


# -- the request log, across processes --------------------------------------------------------------------------------

def test_reads_tell_processes_apart_by_pid_rank_and_user_agent_origin(hub, tmp_path):
    paths = _write_shards(tmp_path / "repo", num_shards=2, rows_per_shard=5, rows_per_group=5)
    _upload(tmp_path / "repo", "alice/shared")
    # Another process reads the second shard as `datasets` does (HfFileSystem, Range GETs); this one streams both.
    child = run_without_ddpm_hf(f"""
        import os
        from huggingface_hub import HfFileSystem
        with HfFileSystem().open("datasets/alice/shared/data/{paths[1].name}", "rb") as shard:
            print(os.getpid(), len(shard.read(shard.size)))  # a length: a Range GET, as pyarrow's reads
    """, cwd=tmp_path, env={"HF_HUB_USER_AGENT_ORIGIN": "reader-b", "RANK": "1"})
    child_pid, child_bytes = map(int, child.stdout.split())
    assert child_bytes == paths[1].stat().st_size
    _rows(datasets.load_dataset("alice/shared", split="train", streaming=True))

    mine = [r for r in hub.reads if r.pid == os.getpid()]
    theirs = [r for r in hub.reads if r.pid == child_pid]
    assert len(mine) + len(theirs) == len(hub.reads) and mine and theirs
    assert all(r.rank == "1" and r.user_agent.endswith("; origin/reader-b") and r.status == 206 for r in theirs)
    assert all(r.rank is None and "origin/" not in r.user_agent for r in mine)
    whole = {f"data/{p.name}": [(0, p.stat().st_size)] for p in paths}
    for pid, files in ((os.getpid(), whole), (child_pid, {f"data/{paths[1].name}": whole[f"data/{paths[1].name}"]})):
        per_file = hub.bytes_read("alice/shared", select=lambda r, pid=pid: r.pid == pid)
        assert {name: ranges for name, (ranges, _) in per_file.items()} == files


def test_a_reader_that_does_not_read_does_not_block_other_clients(hub, tmp_path):
    import socket

    (path,) = _write_shards(tmp_path / "repo", num_shards=1, rows_per_shard=200, rows_per_group=200,
                            blob_bytes=40_000)  # 8 MB: more than the socket buffers hold
    _upload(tmp_path / "repo", "alice/slow")
    sha = HfApi().dataset_info("alice/slow").sha
    with socket.socket() as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # so that the server's writes block soon
        stuck.settimeout(30)
        stuck.connect(("127.0.0.1", int(hub.url.rsplit(":", 1)[1])))
        stuck.sendall(f"GET /datasets/alice/slow/resolve/{sha}/data/{path.name} HTTP/1.1\r\n"
                      f"Host: 127.0.0.1\r\n\r\n".encode())
        while not any(r.path == f"data/{path.name}" for r in hub.reads):
            stuck.recv(1)
        # The server now blocks in sendall to a client that reads nothing; it must still answer everyone else
        # (a download written under the hub's lock would hang this request until the client's timeout).
        assert HfApi().dataset_info("alice/slow", timeout=5).sha == sha
        assert hub.reads[0].sent < path.stat().st_size


def test_range_answers_follow_rfc_7233(hub, tmp_path):
    import http.client

    data = bytes(range(200)) * 5
    api = HfApi(token=ALICE)
    api.create_repo("alice/bytes", repo_type="dataset")
    api.upload_file(path_or_fileobj=data, path_in_repo="blob.bin", repo_id="alice/bytes", repo_type="dataset")
    connection = http.client.HTTPConnection("127.0.0.1", int(hub.url.rsplit(":", 1)[1]), timeout=10)

    def get(range_header=None):
        connection.request("GET", "/datasets/alice/bytes/resolve/main/blob.bin",
                           headers={"Range": range_header} if range_header else {})
        answer = connection.getresponse()
        return answer.status, answer.getheader("Content-Range"), answer.read()

    assert get("bytes=10-19") == (206, "bytes 10-19/1000", data[10:20])
    assert get("bytes=20-29") == (206, "bytes 20-29/1000", data[20:30])
    assert get("bytes=990-") == (206, "bytes 990-999/1000", data[990:])  # open-ended
    assert get("bytes=-5") == (206, "bytes 995-999/1000", data[-5:])  # the last 5 bytes
    assert get("bytes=1000-")[:2] == (416, "bytes */1000")  # starts past the end: how a resumed read learns it is done
    assert hub.bytes_read("alice/bytes") == {"blob.bin": ([(10, 30), (990, 1000)], 35)}
    assert get("bytes=900-5000") == (206, "bytes 900-999/1000", data[900:])  # clipped to the file
    assert get() == (200, None, data)
    assert [(r.start, r.end, r.status) for r in hub.reads] == [(10, 20, 206), (20, 30, 206), (990, 1000, 206),
                                                               (995, 1000, 206), (900, 1000, 206), (0, 1000, 200)]
    assert hub.bytes_read("alice/bytes") == {"blob.bin": ([(0, 1000)], 1135)}
