"""Training data through 🤗 datasets: any Hub dataset, local parquet / arrow / WebDataset tar / imagefolder, or the
Fashion-MNIST subset embedded in this package, streamed or not, split across ranks by shards, shuffled per epoch,
resumable exactly.

Global batches do not depend on the number of processes: the stream is split into ``num_streams`` disjoint streams
(by default one per process); each process serves the streams ``v`` with ``v % world_size == rank``, and each stream
contributes ``per_stream_batch`` examples to every step (the training loop draws each stream's diffusion noise from
that stream's own generator). A run with 2 processes and a run with 1 process and ``num_streams=2`` therefore train on
the same global batches, and so do runs with any number of decoding workers.
"""

import copy
import gc
import glob
import gzip
import hashlib
import io
import itertools
import logging
import multiprocessing
import os
import queue
import re
import select
import signal
import tarfile
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .errors import ResumeMismatch, first_line, http_status
from .processes import die_with_parent

logger = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).parent / "embedded" / "fashion_mnist"
EMBEDDED_NAME = "embedded:fashion_mnist"
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# Decompressed md5 of the upstream IDX files (they match Debian's package; shared/research/data-metrics.md §1.1).
FASHION_MNIST_MD5 = {"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                     "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
                     "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
                     "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"}


# ---------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST as parquet shards laid out like a Hub dataset repository
# ---------------------------------------------------------------------------------------------------------------------

def _read_idx(path: str, name: str) -> np.ndarray:
    raw = gzip.open(path).read()
    digest = hashlib.md5(raw).hexdigest()
    if digest != FASHION_MNIST_MD5[name]:
        raise ValueError(f"{path}: md5 {digest} differs from the published {FASHION_MNIST_MD5[name]}; the file is not "
                         "the original Fashion-MNIST.")
    if "images" in name:
        return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    return np.frombuffer(raw, np.uint8, offset=8)


def write_fashion_mnist(out_dir: str, source: str = DEBIAN_FASHION_MNIST, train_limit: Optional[int] = None,
                        test_limit: Optional[int] = None, num_shards: int = 8) -> Path:
    """Convert the Fashion-MNIST IDX files (Debian's ``dataset-fashion-mnist`` package puts them in
    /usr/share/datasets/fashion-mnist) into ``out_dir/data/{train,test}-0000k-of-0000n.parquet`` with an ``image``
    (PNG) and a ``label`` column, plus a dataset card. ``*_limit`` keeps the first N images of a split. ``source``
    ``embedded`` (or ``embedded:fashion_mnist``) writes the subset shipped in this package instead: a dataset folder to
    push to a Hub, or to shard otherwise, on a machine without the package."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    if num_shards < 1 or num_shards % 8 and num_shards not in (1, 2, 4):
        raise ValueError("num_shards must be 1, 2, 4 or a multiple of 8, so that it divides the usual world sizes.")
    files = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", train_limit),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", test_limit)}
    embedded = source in ("embedded", EMBEDDED_NAME)
    missing = [] if embedded else [path for names in files.values() for name in names[:2]
                                   if not os.path.isfile(path := os.path.join(source, f"{name}.gz"))]
    if missing:  # all four looked for before anything is written
        raise FileNotFoundError(f"{missing[0]} not found: install Debian's package (apt-get install "
                                "dataset-fashion-mnist), or pass the folder holding the four IDX .gz files with "
                                "--source (Python: source=), or --source embedded for the subset this package ships.")
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=FASHION_MNIST_LABELS)})
    counts = {}
    for split, (images_name, labels_name, limit) in files.items():
        if embedded:
            dataset = Dataset.from_parquet(sorted(str(p) for p in EMBEDDED_DIR.glob(f"data/{split}-*.parquet")))
            dataset = dataset.select(range(min(limit or len(dataset), len(dataset))))
        else:
            paths = [os.path.join(source, f"{n}.gz") for n in (images_name, labels_name)]
            images, labels = _read_idx(paths[0], images_name)[:limit], _read_idx(paths[1], labels_name)[:limit]

            def rows(images=images, labels=labels):
                for image, label in zip(images, labels):
                    buffer = io.BytesIO()
                    Image.fromarray(image, "L").save(buffer, format="PNG", optimize=True)
                    yield {"image": {"bytes": buffer.getvalue(), "path": None}, "label": int(label)}

            dataset = Dataset.from_generator(rows, features=features)
        counts[split] = len(dataset)
        for old in out.glob(f"data/{split}-*.parquet"):
            old.unlink()
        for k in range(num_shards):
            dataset.shard(num_shards, k, contiguous=True).to_parquet(
                str(out / "data" / f"{split}-{k:05d}-of-{num_shards:05d}.parquet"))
    (out / "README.md").write_text(_dataset_card(counts), encoding="utf-8")
    return out


def _dataset_card(counts: Dict[str, int]) -> str:
    return f"""---
license: mit
pretty_name: Fashion-MNIST ({counts['train']} train / {counts['test']} test)
task_categories:
- unconditional-image-generation
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
---
# Fashion-MNIST

{counts['train']:,} training and {counts['test']:,} test images (the first ones of each official split), 28×28 grey,
10 classes, stored as PNG in parquet shards. Converted from the original IDX files (md5-checked) by
`ddpm_hf.data.write_fashion_mnist`.

Fashion-MNIST: Han Xiao, Kashif Rasul, Roland Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms", arXiv:1708.07747, 2017. https://github.com/zalandoresearch/fashion-mnist

The MIT License (MIT). Copyright © 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


# ---------------------------------------------------------------------------------------------------------------------
# Loading any image dataset
# ---------------------------------------------------------------------------------------------------------------------

def load_image_dataset(dataset_name: Optional[str] = None, dataset_config_name: Optional[str] = None,
                       train_data_dir: Optional[str] = None, split: str = "train", streaming: bool = True,
                       cache_dir: Optional[str] = None, token: Optional[str] = None, check_shards: bool = True,
                       revision: Optional[str] = None):
    """A 🤗 IterableDataset of ``split`` from a Hub dataset id (``token`` for a private one, ``revision`` a branch, tag
    or commit, default main; see :func:`dataset_revision`), a local folder
    (``dataset_name`` or ``train_data_dir``: parquet / arrow files laid out flat or as ``data/{split}-*.parquet``, or
    image files as an imagefolder, or WebDataset tar files), or ``embedded:fashion_mnist``. ``check_shards``: read the
    footer of every parquet shard (a local tar: its headers) first (training checks on one process per machine: a
    local folder may be a copy of its own on each)."""
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("pass exactly one of --dataset_name or --train_data_dir.")
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {train_data_dir} is not a folder.")
        ds = _load_local_folder(train_data_dir, split, streaming, cache_dir, check_shards)
    else:
        path = str(EMBEDDED_DIR) if dataset_name == EMBEDDED_NAME else dataset_name
        if os.path.isdir(path):
            ds = _load_local_folder(path, split, streaming, cache_dir, check_shards)
        elif os.path.exists(path) or not _looks_like_hub_dataset(dataset_name):
            raise FileNotFoundError(f"--dataset_name {dataset_name}: neither a folder nor a Hub dataset id "
                                    "('name' or 'namespace/name'); pass a folder of parquet/arrow/tar files, a Hub "
                                    f"dataset or {EMBEDDED_NAME}.")
        else:
            ds = _load_hub_dataset(dataset_name, dataset_config_name, split, streaming, cache_dir, token, check_shards,
                                   revision)
    if not streaming:
        ds = ds.to_iterable_dataset(num_shards=min(len(ds), 64))
    return ds


def without_exit_pause(dataset):
    """``dataset`` (a 🤗 IterableDataset, changed in place) without datasets' pause at the end of each pass.

    datasets sleeps ``config.SLEEP_TIME_ON_THREADS_SHUTDOWN`` (5 s) whenever a pass over shuffled (shard-interleaved)
    parquet shards ends or is closed, so that pyarrow's scanner threads are gone before the interpreter could exit:
    pyarrow before 25 aborts the process at exit when a parquet scan was left part-way (apache/arrow#45214; measured
    here: 24.0.0 aborts every time, 25.0.0 never). A pass that ends has read every shard to its end and leaves no
    scan part-way under any pyarrow; with pyarrow >= 25 (setup.py's requirement) neither does one closed part-way.
    A training stream ends a pass at every epoch (on a GPU that was 5 s without a batch per epoch, bench/gpu.sh,
    2026-11-27) and closes one part-way when the run ends; under an older pyarrow (installed without setup.py's
    requirements) it pauses then, once (``pause_for_arrow_scans``). Set on the dataset's leaf iterables, the setting
    carries over to what shuffle, shard, split and set_epoch derive from them."""
    for node in examples_iterables(dataset):
        if hasattr(node, "_sleep_on_threads_shutdown"):
            node._sleep_on_threads_shutdown = False
    return dataset


def examples_iterables(dataset) -> Iterator:
    """Every examples iterable of a 🤗 IterableDataset, from the outermost (its shuffles, splits, decoding) down to
    the leaves that read the files."""
    nodes = [getattr(dataset, "_ex_iterable", None)]
    while nodes:
        node = nodes.pop()
        if node is not None:
            yield node
            nodes.append(getattr(node, "ex_iterable", None))
            nodes.extend(getattr(node, "ex_iterables", None) or [])


def pause_for_arrow_scans() -> None:
    """After closing a pass part-way, datasets' pause (see without_exit_pause) where pyarrow still needs it (< 25)."""
    from datasets import config

    if config.PYARROW_VERSION.major < 25:
        time.sleep(config.SLEEP_TIME_ON_THREADS_SHUTDOWN)


def _load_hub_dataset(repo_id: str, config_name: Optional[str], split: str, streaming: bool,
                      cache_dir: Optional[str], token: Optional[str], check_shards: bool,
                      revision: Optional[str] = None):
    """A Hub dataset's ``split``, its repo, config, split and data files checked first (one-line errors naming the
    repo, the file and the fix): a missing or unreadable repo, an unknown config or split, a parquet shard that is
    truncated or not parquet (its footer is read, a few KB per shard, before any training), a tar that is not one, is
    cut short, or holds its first sample's image under a field that is not among the columns (the headers of its
    first sample and its end are read)."""
    from datasets import load_dataset_builder
    from datasets.exceptions import DatasetNotFoundError

    where = f"Hub dataset {repo_id}"
    try:
        builder = load_dataset_builder(repo_id, config_name, cache_dir=cache_dir, token=token, revision=revision)
    except DatasetNotFoundError as err:
        at, flags = (f" at revision {revision}", "--dataset_name and --dataset_revision") if revision else ("",
                                                                                                      "--dataset_name")
        raise FileNotFoundError(
            f"{where}{at} does not exist or this token cannot read it: check {flags}, and for a private or gated "
            "dataset pass --hub_token (or set HF_TOKEN) with read access.") from err
    except ValueError as err:  # an unknown or missing config: datasets lists the available ones (on a later line)
        said, configs = first_line(err), re.search(r"\[[^\]]*\]", str(err))
        listed = f" Its configs: {configs.group(0)}." if configs and configs.group(0) not in said else ""
        raise ValueError(f"{where}: {said}{listed} Pass one of them with --dataset_config_name.") from err
    data_files = builder.config.data_files or {}
    if data_files and split not in data_files:
        raise ValueError(f"{where} (config {builder.config.name!r}) has no split {split!r}; its splits: "
                         f"{sorted(str(name) for name in data_files)}. Pass one of them with --split.")
    first_samples = {}
    if check_shards and builder.name in ("parquet", "arrow", "webdataset"):
        first_samples = _check_remote_shards(list(data_files.get(split, [])), builder.name, where, token)
    # (datasets chooses a WebDataset's columns as it opens the stream: they are checked before any download)
    streamed = builder.as_streaming_dataset(split=split) if streaming or first_samples else None
    if first_samples:
        _refuse_lost_images(streamed, first_samples, where)
    if streaming:
        return streamed
    builder.download_and_prepare()
    return builder.as_dataset(split=split)


def _check_remote_shards(urls: List[str], builder: str, where: str, token: Optional[str]) -> Dict[frozenset, str]:
    """Read the footer of each ``hf://`` parquet shard (arrow: its schema; a tar: the headers of its first sample and
    its last two blocks, which end every whole tar with zeros), a few threads at a time. Returns, for tars, the image
    fields that the tars' first samples hold, each with the tars that hold it (\"the first samples of 2 tars
    (train-00002.tar, ...)\")."""

    def check(url: str) -> Optional[frozenset]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fields = None
        try:
            with _open_footer(url, token) as remote:
                if builder == "parquet":
                    _remember(url, row_groups_of(pq.read_metadata(remote)))
                elif builder == "webdataset":
                    first = remote.read(tarfile.BLOCKSIZE)
                    # A compressed one (datasets reads it) is not checked: its headers lie in the compressed stream,
                    # its first sample read through in 16 KB requests, and its end is not the tar's own.
                    if not _compressed_tar(first):
                        if first != bytes(tarfile.BLOCKSIZE):  # (zeros: an empty tar)
                            remote.seek(0)
                            with tarfile.open(fileobj=remote, mode="r:") as tar:  # headers; contents seeked over
                                fields = next(image_fields_by_sample(tar, f"{where}: {_repo_path(url)}"), None)
                        size = remote.seek(0, os.SEEK_END)
                        remote.seek(max(size - 2 * tarfile.BLOCKSIZE, 0))
                        if remote.read() != bytes(2 * tarfile.BLOCKSIZE):
                            raise tarfile.ReadError("it does not end with a tar's end of archive (two zero blocks)")
                else:
                    pa.ipc.open_stream(remote).schema
        except (pa.ArrowException, tarfile.TarError, OSError) as err:
            if isinstance(err, (pa.ArrowInvalid, tarfile.TarError)):  # the bytes arrived and are not parquet (tar)
                raise ValueError(f"{where}: {_repo_path(url)} is not a readable {builder} file ({first_line(err)}); "
                                 f"it is truncated or not {builder}: fix or remove it in the dataset repo.") from err
            raise ConnectionError(f"{where}: {_repo_path(url)} could not be read ({type(err).__name__}: "
                                  f"{first_line(err)}) after huggingface_hub's retries: check the network and the "
                                  "Hub's status, then start again.") from err
        return fields

    tars: Dict[frozenset, List[str]] = {}
    for url, fields in zip(urls, _in_threads(check, urls)):
        if fields is not None:
            tars.setdefault(fields, []).append(_repo_path(url))
    return {fields: f"the first samples of {len(names)} tar{'s' * (len(names) > 1)} ({', '.join(names[:3])}"
                    f"{', ...' if len(names) > 3 else ''})" for fields, names in tars.items()}


def _repo_path(url: str) -> str:
    """A file's path in its repo, from its ``hf://datasets/{repo}@{revision}/{path}`` URL."""
    return url.split("@", 1)[-1].split("/", 1)[-1]


def _open_footer(path: str, token: Optional[str]):
    """A shard opened to read its footer: a local file, or an ``hf://`` URL through HfFileSystem in 16 KB blocks (the
    footer, not the rows)."""
    if path.startswith("hf://"):
        from huggingface_hub import HfFileSystem

        return HfFileSystem(token=token).open(path[len("hf://"):], "rb", block_size=16 * 1024)
    return open(path, "rb")


def _in_threads(function, items) -> list:
    """``function`` over ``items`` in 8 threads (the footers of many shards are small, latency-bound reads)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(function, items))


def hub_dataset_id(dataset_name: Optional[str]) -> Optional[str]:
    """``dataset_name`` when it names a Hub dataset (not a local folder, not the embedded data): what a model card's
    ``datasets`` metadata links to."""
    if dataset_name is None or dataset_name == EMBEDDED_NAME or os.path.exists(dataset_name):
        return None
    return dataset_name if _looks_like_hub_dataset(dataset_name) else None


def _looks_like_hub_dataset(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", part) and ".." not in part
                                        for part in parts)


def _check_readable(files: List[str], builder: str) -> Dict[frozenset, int]:
    """Read each file's footer/schema (a tar: its member headers) so that a truncated or foreign file is named before
    training starts, not discovered as an error deep inside a data worker. Returns, for tars, how many samples hold
    each set of image fields (``png``, ``seg.jpg``: a member's name after its sample's key), the members grouped
    into samples as datasets' WebDataset reader groups them (consecutive members sharing a key, hidden ones
    skipped). Tars are read by a process per core, a header per member (about 20 µs each here: 3 M samples of two
    members took 2 minutes on one core, 100 M would outlast --ddp_timeout); the first bad file in the list is named."""
    from collections import Counter

    samples: Dict[frozenset, int] = Counter()  # sets of image fields: how many samples hold each
    workers = min(len(files), _cores()) if builder == "webdataset" else 1
    if workers <= 1:
        for path in files:
            samples.update(_check_file(path, builder))
        return samples
    from tqdm.auto import tqdm

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for found in tqdm(pool.map(_check_file, files, itertools.repeat(builder)), total=len(files),
                          desc="checking the tar shards", unit="tar", disable=len(files) < 16):
            samples.update(found)
    return samples


def _check_file(path: str, builder: str) -> Dict[frozenset, int]:
    """One file of :func:`_check_readable`: its sets of image fields (tars) or nothing; a ValueError naming it."""
    from collections import Counter

    import pyarrow as pa
    import pyarrow.parquet as pq

    samples: Dict[frozenset, int] = Counter()
    try:
        if builder == "parquet":
            pq.read_metadata(path)
        elif builder == "webdataset":
            with open(path, "rb") as raw:
                compressed = _compressed_tar(raw.read(10))
            if compressed:  # read whole, as datasets reads it: its headers lie in the compressed stream
                with tarfile.open(path, "r|*") as tar:
                    samples.update(image_fields_by_sample(tar, path))
                return samples
            size = os.path.getsize(path)
            with tarfile.open(path, "r:") as tar:  # one 512-byte header per member, the contents skipped
                last = None

                def members():  # each checked for its size (a sparse one's is that of its holes filled)
                    nonlocal last
                    for last in tar:
                        if not last.issparse() and last.offset_data + last.size > size:
                            raise OSError(f"its member {last.name} ends at byte {last.offset_data + last.size} "
                                          f"of a file of {size}")
                        yield last

                samples.update(image_fields_by_sample(members(), path))
                with open(path, "rb") as raw:  # tarfile stops quietly at a corrupt header: the end must be zeros
                    raw.seek(tar.offset)
                    end = raw.read(2 * tarfile.BLOCKSIZE)
                if end != bytes(2 * tarfile.BLOCKSIZE):
                    raise OSError(f"the member after {'member ' + last.name if last else 'its start'} (byte "
                                  f"{tar.offset}) has a corrupt header, or the end of archive is missing")
        else:
            with pa.memory_map(path) as source:
                try:
                    pa.ipc.open_stream(source).schema
                except pa.ArrowInvalid:
                    source.seek(0)
                    pa.ipc.open_file(source).schema
    except (pa.ArrowException, tarfile.TarError, OSError) as err:
        raise ValueError(f"{path} is not a readable {builder} file ({err}); it is truncated or corrupt: "
                         "rewrite or remove it.") from err
    return samples


def _compressed_tar(head: bytes) -> bool:
    """Whether a .tar file whose first bytes are ``head`` (10 or more) is compressed (gzip, bzip2, xz), as tarfile's
    "r|*", with which datasets reads every tar, tells: datasets reads such a file all the same."""
    return head.startswith((b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ")) or (
        head[:3] == b"BZh" and head[4:10] == b"1AY&SY")


def image_fields_by_sample(members: Iterable[tarfile.TarInfo], where: str) -> Iterator[frozenset]:
    """The image fields (``png``, ``seg.jpg``: a member's name after its sample's key) of each sample of the tar
    ``where`` whose ``members`` are given in order, grouped into samples as datasets' WebDataset reader groups them:
    consecutive members sharing a key, hidden ones skipped. A sample holding a field twice is refused: datasets
    stops reading there."""
    from datasets.packaged_modules.webdataset.webdataset import WebDataset, base_plus_ext

    def keyed():
        for member in members:
            if member.isreg() and not os.path.basename(member.name).startswith((".", "__")):
                key, field = base_plus_ext(member.name)
                if key is not None:
                    yield key, field

    for key, sample in itertools.groupby(keyed(), key=lambda member: member[0]):
        fields = [field for _, field in sample]
        twice = next((field for k, field in enumerate(fields) if field in fields[:k]), None)
        if twice is not None:
            raise ValueError(f"{where}: its sample {key!r} holds two members {key}.{twice}, and datasets stops reading "
                             "the tar there (\"Duplicate field\"): write each file of a sample once, or give the "
                             "samples keys of their own.")
        yield frozenset(field for field in fields if field.rsplit(".", 1)[-1].lower() in WebDataset.IMAGE_EXTENSIONS)


def _refuse_lost_images(dataset, held: Dict[frozenset, str], where: str) -> None:
    """datasets takes a WebDataset's columns from its first samples: samples whose only images are under fields that
    are not among ``dataset``'s image columns would have no image, and be skipped one by one all through training.
    ``held``: sets of image fields, each with the samples found holding it (\"12 samples\"), refused here if lost."""
    from datasets import Image as ImageFeature

    columns = {name for name, feature in (dataset.features or {}).items() if isinstance(feature, ImageFeature)}
    lost = [f"{what} hold their image only as {' and '.join(sorted('.' + f for f in fields))}"
            for fields, what in held.items() if fields and not fields & columns]
    if lost:
        raise ValueError(
            f"{where}: " + ", ".join(lost) + ", but datasets takes a WebDataset's columns from its first samples, "
            f"which give {', '.join(sorted('.' + c for c in columns)) or 'no image'}: those images would be skipped. "
            "Write every sample's image under one extension.")


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _split_files(folder: str, split: str, ext: str) -> List[str]:
    """The ``split``'s files of extension ``ext``, by the first of the usual layouts that has any."""
    for pattern in (f"data/{split}-*.{ext}", f"{split}-*.{ext}", f"{split}/*.{ext}", f"*.{ext}"):
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        if files:
            return files
    return []


def _load_local_folder(folder: str, split: str, streaming: bool, cache_dir: Optional[str], check: bool = True):
    """A local folder, whichever flag named it: its ``split`` parquet / arrow files if it has any, else its image files
    (imagefolder, with its metadata if present), else its WebDataset tar shards; a folder with none of these is refused
    with what it does hold. ``check``: read the files' footers or headers first (see _check_readable)."""
    from datasets import load_dataset

    for builder in ("parquet", "arrow"):
        files = _split_files(folder, split, builder)
        if files:
            if check:
                _check_readable(files, builder)
            return load_dataset(builder, data_files={split: files}, split=split, streaming=streaming,
                                cache_dir=cache_dir)
    found = [Path(root, name) for root, _, names in os.walk(folder) for name in names]
    images = [path for path in found if path.suffix.lower() in IMAGE_EXTENSIONS]
    files = _split_files(folder, split, "tar")
    if images and files:  # an image folder with a backup.tar, or tar shards with a preview.png: no guessing
        raise ValueError(f"{folder} holds both image files ({len(images)}, e.g. {images[0]}) and tar shards "
                         f"({len(files)}, e.g. {files[0]}): an image folder or WebDataset shards? Pass a folder that "
                         "holds only the one to train on.")
    if images:
        return load_dataset("imagefolder", data_dir=folder, split=split, streaming=streaming, cache_dir=cache_dir)
    if files:
        samples = _check_readable(files, "webdataset") if check else {}
        dataset = load_dataset("webdataset", data_files={split: files}, split=split, streaming=streaming,
                               cache_dir=cache_dir)
        _refuse_lost_images(dataset, {fields: f"{n} samples" for fields, n in samples.items()}, folder)
        return dataset
    extensions = sorted({path.suffix.lower() or "(none)" for path in found})
    data_files = [path for path in found if path.suffix in (".parquet", ".arrow", ".tar")]
    what = (f"{len(found)} files ({', '.join(extensions)})" if found else "nothing")
    hint = (f"; its data files are not named for split {split!r} (looked for data/{split}-*.parquet, "
            f"{split}-*.parquet, {split}/*.parquet, *.parquet and the same for .arrow and .tar): pass --split"
            if data_files else "")
    if any(path.name.lower().endswith((".tar.gz", ".tgz")) for path in found):
        hint += ("; compressed tars (.tar.gz, .tgz) are not read as WebDataset shards (datasets reads plain .tar): "
                 "decompress them with gunzip, or pass the images as parquet")
    raise FileNotFoundError(f"{folder} holds no {split} parquet/arrow/tar files and no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)}): found {what}{hint}. A dataset folder holds parquet/arrow "
                            "files, WebDataset tar shards or image files.")


def find_image_column(features, image_column: Optional[str] = None) -> str:
    """The named image column, or the only/first column whose feature is an Image; fails listing the columns."""
    from datasets import Image as ImageFeature

    columns = list(features) if features is not None else []
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"--image_column {image_column!r} is not a column of the dataset; its columns: {columns}.")
        return image_column
    candidates = [name for name, feature in (features or {}).items() if isinstance(feature, ImageFeature)]
    if not candidates:
        raise ValueError(f"the dataset has no image column (columns: {columns}); name it with --image_column.")
    return candidates[0]


def is_remote(path: str) -> bool:
    """A path that datasets reads over the network: a file of a Hub repo (hf://, as a Hub image folder's cells point
    at theirs) or a URL."""
    return "://" in path


def image_cell_bytes(cell: dict, token: Optional[str] = None) -> bytes:
    """The encoded image of an undecoded ``Image`` cell (``{"bytes", "path"}``): its bytes, or its file's, read from
    the Hub or a URL with ``token`` (None: HF_TOKEN or the stored login) through datasets, which retries the read."""
    if cell is None or (cell.get("bytes") is None and cell.get("path") is None):  # a null cell, a sample without it
        raise ValueError("the row has no image (its image column is empty)")
    if cell.get("bytes") is not None:
        return cell["bytes"]
    path = cell["path"]
    if not is_remote(path):
        return Path(path).read_bytes()
    from datasets import DownloadConfig
    from datasets.utils.file_utils import xopen

    with xopen(path, "rb", download_config=DownloadConfig(token=token)) as remote:
        return remote.read()


def decoded_image(data: bytes) -> Image.Image:
    """The image encoded in ``data``, fully decoded (a truncated file fails here, not later)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def image_channels(image: Image.Image) -> int:
    """1 for grey modes (L, LA, 1, I, I;16, F), 3 for colour ones (RGB, RGBA, P, CMYK, YCbCr, ...)."""
    return 1 if image.mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F") else 3


def undecoded_images(dataset, image_column: str):
    """Only the image column, as encoded bytes/paths: decoding is ours, so a corrupt image can be skipped. (datasets
    streams a Hub image folder through decoding threads of its own, which a cast to undecoded images leaves in place;
    ``decode(False)`` removes them.)"""
    from datasets import Image as ImageFeature

    dataset = dataset.decode(False) if hasattr(dataset, "decode") else dataset
    return dataset.cast_column(image_column, ImageFeature(decode=False)).select_columns([image_column])


def first_image(dataset, image_column: str, max_rows: int = 100, token: Optional[str] = None) -> Image.Image:
    """The first decodable image of ``dataset`` (a few rows are read, nothing else): the data's channel count and a
    clear error on an empty or undecodable dataset, before the model is trained."""
    rows = undecoded_images(dataset, image_column).take(max_rows)
    seen = 0
    last_error = None
    for seen, row in enumerate(rows, 1):
        try:
            return decoded_image(image_cell_bytes(row[image_column], token))
        except Exception as err:
            last_error = err
    if seen == 0:
        raise ValueError("the dataset has no rows: check --split and the data files.")
    raise ValueError(f"none of the first {seen} images of the dataset could be decoded (last error: {last_error}); "
                     f"is {image_column!r} the image column?")


def check_channels(image: Image.Image, in_channels: int) -> None:
    """The model's input channels must match the data: training a 3-channel model on grey images (or the reverse)
    would silently learn replicated or discarded channels."""
    channels = image_channels(image)
    if in_channels not in (1, 3):
        raise ValueError(f"the model has in_channels={in_channels}; only 1 (grey) and 3 (colour) image data exist.")
    if channels != in_channels:
        kind = {1: "grey", 3: "colour"}
        raise ValueError(f"the model has in_channels={in_channels} ({kind[in_channels]}) but the dataset's images are "
                         f"{kind[channels]} (mode {image.mode}): use a model with in_channels={channels} (a preset "
                         f"or --model_config), or convert the dataset.")


def prepare_image(image: Image.Image, resolution: int, channels: int, center_crop: bool, flip: bool,
                  rng: np.random.Generator) -> np.ndarray:
    """PIL image → uint8 (C, H, W): model's channels, shorter side resized to ``resolution`` (bilinear), centre or
    random crop, optional horizontal flip (the paper's only augmentation)."""
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    if min(w, h) != resolution:
        scale = resolution / min(w, h)
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             Image.BILINEAR)
        w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, channels)
    if flip and rng.random() < 0.5:
        array = array[:, ::-1]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------------------------------
# The training stream: rows read in order by a background thread, decoded by worker processes, batches prefetched
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeSettings:
    resolution: int
    channels: int
    center_crop: bool
    random_flip: bool
    seed: int
    record_ids: bool
    token: Optional[str] = None  # for images that are files of a Hub repo


def decode_rows(cells: List[dict], keys: List[Tuple[int, int, int]], settings: DecodeSettings) -> list:
    """Decode and augment image cells; ``keys`` are their (stream, epoch, row). Each result is (uint8 array, sha1 or
    None) or (None, error message). The augmentation's randomness is tied to the example's key, so the result is the
    same whichever process or worker decodes it. Runs in the data workers (a pure function of its arguments)."""
    results = []
    for cell, (v, epoch, index) in zip(cells, keys):
        try:
            data = _read_image_cell(cell, settings.token)
        except _Unreadable as err:  # a local file missing or unreadable, a remote one gone for good (404)
            results.append((None, str(err)))
            continue
        except OSError as err:
            raise OSError(f"stream {v}, epoch {epoch}, row {index}: {err}") from err
        try:
            image = decoded_image(data)
        except Exception as err:  # a corrupt or truncated file must not stop a long run
            results.append((None, f"{type(err).__name__}: {err}"))
            continue
        rng = np.random.default_rng([settings.seed, v, epoch, index])
        array = prepare_image(image, settings.resolution, settings.channels, settings.center_crop,
                              settings.random_flip, rng)
        results.append((array, hashlib.sha1(data).hexdigest() if settings.record_ids else None))
    return results


REMOTE_READ_ATTEMPTS = 4  # tries of an image file on the Hub or at a URL (pauses of 1, 2, 4 s between)
REMOTE_READ_PAUSE_S = 1.0


class _Unreadable(Exception):
    """An image file that is not there (locally, or gone from its URL for good): skipped and counted, the same in
    every run over the data."""


def _not_found(err: BaseException) -> bool:
    """A missing file: FileNotFoundError, or an HTTP 404 anywhere in the error's chain (a range read's)."""
    while err is not None:
        if isinstance(err, FileNotFoundError) or http_status(err) == 404:
            return True
        err = err.__cause__ or err.__context__
    return False


def _read_image_cell(cell: dict, token: Optional[str]) -> bytes:
    """:func:`image_cell_bytes`, a remote file's read tried again after a pause (a 404 too: a Hub's may pass). A file
    that is not there (locally, or still not at its URL) raises :class:`_Unreadable`; a remote file unreadable for
    another reason raises OSError (skipping it would change the data)."""
    remote = cell is not None and cell.get("bytes") is None and is_remote(cell.get("path") or "")
    attempt = 1
    while True:
        try:
            return image_cell_bytes(cell, token)
        except Exception as err:
            if not remote or (attempt == REMOTE_READ_ATTEMPTS and _not_found(err)):
                raise _Unreadable(f"{type(err).__name__}: {err}") from err
            if attempt == REMOTE_READ_ATTEMPTS:
                raise OSError(f"cannot read {cell['path']} after {attempt} tries: {type(err).__name__}: {err}") from err
        time.sleep(REMOTE_READ_PAUSE_S * 2 ** (attempt - 1))
        attempt += 1


def _init_data_worker(parent: int, reader_end) -> None:
    """Data workers die with their parent, pid ``parent`` (even on SIGKILL), and leave Ctrl-C to the training
    process. They close the reader's end of its pipe, inherited at the fork: the training process must see that end
    close when the reader dies."""
    reader_end.close()
    _die_with_parent(parent)
    torch.set_num_threads(1)


@dataclass
class _Batch:
    images: Optional[torch.Tensor]  # uint8 (N, C, H, W); None while it travels from the reader process
    position: Dict[int, Tuple[int, int]]  # every stream's position after this batch
    skipped: Dict[int, int]  # undecodable rows per stream in this batch
    ids: List[str]
    last_rows: Dict[int, str]  # fingerprint of each stream's last row in this batch
    tar_events: Optional[list] = None  # a WebDataset's TarRowCounts events since the last batch (see replay)


def row_fingerprint(cell: dict) -> str:
    """A cheap identity of an image cell (its size and CRC-32), kept with a stream's position."""
    import zlib

    if cell is None:  # a null cell
        return "none"
    data = cell.get("bytes")
    return f"{len(data)}:{zlib.crc32(data):08x}" if data is not None else f"path:{cell.get('path')}"


HUB_COMMIT = re.compile(r"^hf://datasets/.+?@([0-9a-f]{40})/")


def dataset_revision(dataset) -> Optional[str]:
    """The commit of a streamed Hub dataset's files (datasets resolves the revision once, when the dataset is opened,
    and reads every file at that commit); None for any other source."""
    values = [getattr(node, "kwargs", None) for node in examples_iterables(dataset)]  # the leaves name the files
    found = set()
    while values:
        item = values.pop()
        if isinstance(item, dict):
            values.extend(item.values())
        elif isinstance(item, (list, tuple)):
            values.extend(item)
        elif isinstance(item, str) and (match := HUB_COMMIT.match(item)):
            found.add(match.group(1))
    return found.pop() if len(found) == 1 else None


def parquet_shard_files(dataset) -> Optional[List[str]]:
    """The parquet file behind each shard of a streamed parquet dataset (local or ``hf://``), in shard order; None
    for any other source. Read from datasets' examples iterable: checked, with None where it is not as expected."""
    source = getattr(dataset, "_ex_iterable", None)
    kwargs = getattr(source, "kwargs", None) or {}
    files, row_groups = kwargs.get("files"), kwargs.get("row_groups_list")
    if (type(source).__name__ != "ArrowExamplesIterable" or not isinstance(files, list)
            or len(files) != dataset.num_shards or any(group is not None for group in row_groups or [])
            or not all(isinstance(f, str) and f.endswith(".parquet") and "::" not in f for f in files)):
        return None
    return files


def tar_shard_files(dataset) -> Optional[List[str]]:
    """The tar file behind each shard of a streamed WebDataset (local or ``hf://``), in shard order, as its rows name
    it in ``__url__``; None for any other source (checked like parquet_shard_files)."""
    source = getattr(dataset, "_ex_iterable", None)
    kwargs = getattr(source, "kwargs", None) or {}
    files = kwargs.get("tar_paths")
    if (type(source).__name__ != "ExamplesIterable" or not isinstance(files, list) or len(files) != dataset.num_shards
            or any(isinstance(value, list) and len(value) != len(files) for value in kwargs.values())  # one_tar's
            or "__url__" not in (dataset.features or {}) or not all(isinstance(f, str) for f in files)):
        return None
    return files


class TarRowCounts:
    """The samples in each tar shard of a WebDataset, learned as the tars are read whole: a resume that skips the
    finished tars needs them (see TrainStream._tar_replayed), and a tar has no footer that says (a Hub tar's headers
    are spread over the whole file). Counts are the data's, the same in every epoch and for every stream; the reader
    learns them (``_TarSampleCounter``: as its input reaches each tar's end, ahead of the batches handed out, which
    is harmless) and a checkpoint keeps them.

    The training process keeps a copy by replaying the reader's ``events`` (the counts learned since the last batch,
    sent with each batch), not by receiving the whole table with every batch (100,000 tars: 0.75 MB)."""

    def __init__(self, known: Optional[Dict[int, int]] = None):
        self.known = dict(known or {})  # shard -> samples
        self.events: List[Tuple[int, int]] = []  # what was learned since the last drain(), for replay()
        self.lock = threading.Lock()  # datasets' reading threads learn, the reader drains

    def learned(self, shard: int, rows: int) -> None:
        with self.lock:
            before = self.known.get(shard)
            if before == rows:
                return
            if before is not None:
                logger.warning("tar shard %d now holds %d samples, it held %d: the data changed as it was read", shard,
                               rows, before)
            self.known[shard] = rows
            self.events.append((shard, rows))

    def drain(self) -> list:
        with self.lock:
            events, self.events = self.events, []
        return events

    def replay(self, events: list) -> None:
        """The reader's events: this copy then knows what the reader's knows."""
        self.known.update(events)


class _TarSampleCounter:
    """Stands in for the WebDataset builder's example generator (datasets calls it with a list of tars: one, each
    shard of the stream being one tar) and counts each tar's samples on the way, into ``sink``: a tar's count is known
    once its reading has ended, whether by the stream or by a resume. A reading stopped part-way (a retry, the
    reading of a tar up to the last row a resume needs of it) teaches nothing. One generator layer: no cost
    measurable over 10,000 rows, where a ``map`` before the shuffle cost 40 µs a row. It also counts the tars ended,
    for the reader's collections (see close_abandoned_reads): datasets runs it in its reading threads, where a
    collection could run a finalizer that waits for that very thread."""

    def __init__(self, generate, tar_index: Dict[str, int]):
        self.generate, self.tar_index = generate, tar_index
        self.sink: Optional[TarRowCounts] = None  # the reader's counts (set by TrainStream._produce)
        self.ended = 0  # tars read to their end since the reader last collected

    def __call__(self, tar_paths, **kwargs):
        rows = dict.fromkeys(tar_paths, 0)
        for key, example in self.generate(tar_paths=tar_paths, **kwargs):
            rows[example["__url__"]] += 1
            yield key, example
        if self.sink is not None:
            for path, n in rows.items():
                self.sink.learned(self.tar_index[path], n)
        self.ended += len(tar_paths)


def with_tar_counting(dataset, tar_index: Dict[str, int]) -> Tuple[object, _TarSampleCounter]:
    """``dataset`` (a streamed WebDataset, as ``tar_shard_files`` found it) reading its tars through a
    ``_TarSampleCounter``, and the counter."""
    source = copy.copy(dataset._ex_iterable)
    source.generate_examples_fn = counter = _TarSampleCounter(source.generate_examples_fn, tar_index)
    return _on_source(dataset, source), counter


def one_tar(dataset, shard: int):
    """Shard ``shard`` of ``dataset`` (a streamed WebDataset, as ``tar_shard_files`` found it) alone, made in
    constant time: datasets' ``shard()`` splits the whole list of tars at each call (9 ms a call at 3,000 tars, so a
    resumed epoch that read each tar through it took 27 s where the stream takes 1)."""
    source = copy.copy(dataset._ex_iterable)
    source.kwargs = {key: [value[shard]] if isinstance(value, list) else value for key, value in source.kwargs.items()}
    return _on_source(dataset, source)


def _on_source(dataset, source):
    """A copy of the IterableDataset ``dataset`` reading ``source``, the original left as it was."""
    copied = copy.copy(dataset)
    copied.__dict__ = dict(copied.__dict__)  # (a copy shares its __dict__ with the original: datasets' __setstate__)
    copied._ex_iterable = source
    return copied


def tar_files_signature(files: List[str]) -> List[tuple]:
    """What the saved counts of ``files`` hold for: each local tar's name, size and modification time (a Hub tar's
    URL names its commit, which a resume checks already). A tar rewritten, added or renamed changes it."""
    def one(path: str) -> tuple:
        if is_remote(path) or not os.path.exists(path):
            return (path,)
        info = os.stat(path)
        return (os.path.basename(path), info.st_size, info.st_mtime_ns)

    return [one(path) for path in files]


# Rows of each row group of the Hub's parquet files (``hf://`` URLs at a commit: they cannot change) whose footers this
# process has read, or been given (see known_row_groups): a resume's replay needs every shard's, which the check before
# training has read already. Reading them again in every process at every resume cost one or two requests per shard
# and process: 8,000 to 16,000 for 1,000 shards on 8 GPUs, against a free account's 5,000 per 5 minutes. (A local
# file's footer is read each time: it may have been rewritten.)
_ROW_GROUPS: Dict[str, List[int]] = {}
_AT_A_COMMIT = re.compile(r"^hf://datasets/[^@]+@[0-9a-f]{40}/")


def _remember(url: str, row_groups: List[int]) -> List[int]:
    if _AT_A_COMMIT.match(url):
        _ROW_GROUPS[url] = row_groups
    return row_groups


def row_groups_of(metadata) -> List[int]:
    """Rows of each row group of a parquet file, from its footer's ``metadata``."""
    return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def known_row_groups() -> Dict[str, List[int]]:
    """The parquet row groups this process knows (see _ROW_GROUPS): train.py's main process gives those its check of
    a Hub dataset read to every process (``remember_row_groups``)."""
    return dict(_ROW_GROUPS)


def remember_row_groups(known: Dict[str, List[int]]) -> None:
    for url, row_groups in known.items():
        _remember(url, row_groups)


def parquet_row_groups(files: List[str], token: Optional[str]) -> Optional[List[List[int]]]:
    """Rows of each row group of each parquet file (local or ``hf://``), known or read from its footer; None, with a
    warning, where a footer cannot be read."""
    import pyarrow.parquet as pq

    def row_groups(path: str) -> List[int]:
        if path in _ROW_GROUPS:
            return _ROW_GROUPS[path]
        with _open_footer(path, token) as source:
            return _remember(path, row_groups_of(pq.read_metadata(source)))

    try:
        return _in_threads(row_groups, files)
    except Exception as err:  # noqa: BLE001 (then resuming reads the epoch again: slower, still exact)
        logger.warning("could not read the shards' row groups (%s); a resume will read its epoch again", err)
        return None


@contextmanager
def _streaming_patches_kept():
    """datasets patches the parquet builder's module once for streaming, then gives its download settings the token
    and storage options of each new builder: the stand-in parquet dataset must not replace those of the real one (its
    reads of a private repo would go out without the token)."""
    import importlib

    config = getattr(importlib.import_module("datasets.packaged_modules.parquet.parquet"), "_patched_for_streaming",
                     None)
    # deep copies: datasets fills a shared storage_options dict in place with each builder's token
    saved = (config.token, copy.deepcopy(config.storage_options)) if hasattr(config, "storage_options") else None
    try:
        yield
    finally:
        if saved is not None:
            config.token = saved[0]
            config.storage_options.clear()
            config.storage_options.update(saved[1])


REPLAY_BATCH_ROWS = 1 << 16  # rows of the replayed order read at once (as arrow tables; the order is the same)


def _pairs_from(shards: np.ndarray, rows: np.ndarray, start: int) -> Iterator[Tuple[int, int]]:
    """(shard, row) from position ``start`` on, turned into Python numbers a block at a time (a list of an epoch's
    pairs would take about 150 bytes a row)."""
    for at in range(start, len(shards), REPLAY_BATCH_ROWS):
        yield from zip(shards[at:at + REPLAY_BATCH_ROWS].tolist(), rows[at:at + REPLAY_BATCH_ROWS].tolist())


class _RowsDue:
    """``(shard, row) in due``: whether a row of the dataset is one of a stream's rows still due (a byte a row of
    the dataset, where a set of the pairs would take about 150)."""

    def __init__(self, row_groups: List[List[int]], shards: np.ndarray, rows: np.ndarray):
        self.lengths = [sum(groups) for groups in row_groups]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.due = np.zeros(int(self.offsets[-1]), dtype=bool)
        self.due[self.offsets[shards] + rows] = True

    def __contains__(self, pair: Tuple[int, int]) -> bool:
        shard, row = pair
        return row < self.lengths[shard] and bool(self.due[self.offsets[shard] + row])


def _fallback(v: int, why: str) -> None:
    logger.warning("stream %d resumes by reading its epoch again up to its position: %s", v, why)
    return None


class TrainStream:
    """Endless per-process uint8 image batches for step-based training, prefetched, with exact resume.

    Each of the ``num_streams`` streams is ``split_dataset_by_node(dataset.shuffle(seed, buffer), v, num_streams)``,
    reshuffled every epoch (``set_epoch``); it yields examples forever, epoch after epoch, so no example is dropped or
    repeated within an epoch and every process does the same number of steps. The rows are read in order and
    assembled into batches ``prefetch`` ahead. With ``num_workers`` decoding processes, the reading runs in a process
    of its own (``_ReaderProcess``): its Python work, about 6 ms of interpreter time per batch of 128 small images,
    would otherwise share the training process's interpreter lock with the step's kernel launches. With none (as
    DataLoader's 0), a thread of the training process reads and decodes. Either way ``next_batch`` takes a finished
    batch from a queue. Undecodable rows are skipped and counted.
    ``state_dict()`` is the position of every stream after the last batch handed out (not the prefetched ones);
    resuming skips the consumed rows without decoding them, and the finished shards (parquet, or tars once counted:
    see _tar_replayed) without reading them.
    """

    MAX_UNDECODABLE_IN_A_ROW = 1000
    UNDECODABLE_SAID = 10  # a stream's undecodable images said one by one; after them, their count at powers of ten
    READ_RETRIES = 5  # failed reads in a row before the run stops (datasets retries each read before that)
    READ_RETRY_PAUSE_S = 2.0  # doubled at each retry: 2 + 4 + 8 + 16 + 32 s at most
    QUIET_WAIT_WARNING_S = 300.0  # a batch awaited this long is reported, and again after each as long
    COLLECT_EVERY_TARS = 8  # a WebDataset's ended tars' HTTP streams freed after this many (see close_abandoned_reads)
    COLLECT_EVERY_S = 1.0  # and at most this often in a reading thread of the training process (0.2 s a collection)

    def __init__(self, dataset, image_column: str, resolution: int, channels: int, per_stream_batch: int,
                 num_streams: int, rank: int, world_size: int, seed: int, shuffle_buffer_size: int = 1000,
                 center_crop: bool = True, random_flip: bool = False, record_ids: bool = False, num_workers: int = 0,
                 prefetch: int = 4, pin_memory: bool = False, token: Optional[str] = None):
        from datasets.distributed import split_dataset_by_node

        if num_streams % world_size:
            raise ValueError(f"{num_streams} data streams (--data_streams) cannot be shared evenly by {world_size} "
                             f"processes: use a multiple of {world_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        shards = dataset.num_shards
        if shards % num_streams and getattr(dataset.info, "builder_name", None) in ("imagefolder", "audiofolder"):
            logger.info("the image folder is read as %d shard(s): each of the %d streams goes through its list of "
                        "files and keeps one example in %d, reading only those images.", shards, num_streams,
                        num_streams)
        elif shards % num_streams:
            logger.warning(
                "the dataset has %d shards, not a multiple of %d streams: falling back to splitting by examples: every "
                "stream reads (for a Hub dataset: downloads) all %d shards and keeps one example in %d, %d× the reading "
                "of an even split. Write the data as a multiple of %d files.",
                shards, num_streams, shards, num_streams, num_streams, num_streams)
        self.shard_files = parquet_shard_files(dataset)  # for a resume that skips finished shards (see _replayed)
        # the same for a WebDataset's tars split by shards, once their samples are counted (see TarRowCounts)
        all_tars = tar_shard_files(dataset)  # (counted even unsplit: the counter also closes their HTTP streams)
        tars = all_tars if shards % num_streams == 0 else None
        self.tar_signature = tar_files_signature(tars) if tars else None
        self.tar_counts = TarRowCounts() if tars else None  # as the training process knows them
        self._tar_counter: Optional[_TarSampleCounter] = None
        if all_tars:
            dataset, self._tar_counter = with_tar_counting(dataset, {path: k for k, path in enumerate(all_tars)})
        self._tars = dataset if tars else None  # for one_tar
        self.revision = dataset_revision(dataset)  # a Hub dataset's commit, kept in the checkpoints
        self.token, self.seed, self.shuffle_buffer_size = token, seed, shuffle_buffer_size
        self._row_groups: Optional[List[List[int]]] = None
        dataset = self.base = undecoded_images(without_exit_pause(dataset), image_column)  # passes end unpaused
        if shuffle_buffer_size > 1:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        self.streams = list(range(rank, num_streams, world_size))
        self.num_streams, self.num_shards = num_streams, shards
        self.datasets = {v: split_dataset_by_node(dataset, rank=v, world_size=num_streams) for v in self.streams}
        self.image_column, self.per_stream_batch = image_column, per_stream_batch
        self.settings = DecodeSettings(resolution, channels, center_crop, random_flip, seed, record_ids, token)
        self.num_workers, self.prefetch, self.pin_memory = num_workers, max(1, prefetch), pin_memory
        self.position = {v: (0, 0) for v in self.streams}  # (epoch, examples consumed in the epoch)
        self.skipped = {v: 0 for v in self.streams}  # undecodable rows per stream
        self._undecodable_met = {v: 0 for v in self.streams}  # by this launch's reading (for its warnings)
        self.last_row: Dict[int, str] = {}  # fingerprint of the row before each stream's position
        self.seen_ids: List[str] = []
        self.legacy_noise_state = None  # noise generators found in a checkpoint written before 0.2 (see train.py)
        self._pool: Optional[ProcessPoolExecutor] = None  # the decoding workers (in the reader process)
        self._reader: Optional[_ReaderProcess] = None  # with workers
        self._thread: Optional[threading.Thread] = None  # without
        self._queue: "queue.Queue" = queue.Queue()  # finished batches, then the error that ended the stream
        self._stop = threading.Event()  # set: the thread, or the reader's receiving thread, puts nothing more
        self._in_reader_process = False  # set in the reader process (its inherited objects are out of collections)

    # --- checkpointing ---------------------------------------------------------------------------------------------
    @property
    def skipped_rows(self) -> int:
        """Undecodable rows this process skipped."""
        return sum(self.skipped.values())

    def state_dict(self) -> dict:
        """Every stream's position and skip count, those of the other processes included: accelerate writes the
        registered states from the main process only (a collective: every process calls this when saving)."""
        tar_rows = dict(self.tar_counts.known) if self.tar_counts is not None else {}
        return dict(all_processes({"position": dict(self.position), "skipped_rows": dict(self.skipped),
                                   "last_row": dict(self.last_row), "tar_rows_known": tar_rows}),
                    dataset_revision=self.revision,
                    seed=self.seed, shuffle_buffer_size=self.shuffle_buffer_size, tar_files=self.tar_signature)

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's positions; refused (:class:`ResumeMismatch`) when it read another number of streams,
        another commit of the dataset, or shuffled with another seed or buffer: its positions would name other rows
        (within the epoch, examples seen twice and others never)."""
        saved_streams = len(state["position"])  # every stream's, the other processes' included
        if saved_streams != self.num_streams:
            raise ResumeMismatch(f"the checkpoint read the data as {saved_streams} data streams, this run as "
                                 f"{self.num_streams}: resume with --data_streams {saved_streams} (any number of "
                                 f"processes that divides it), or start a new run.")
        saved_revision = state.get("dataset_revision")
        if saved_revision and self.revision and saved_revision != self.revision:
            raise ResumeMismatch(f"the checkpoint read the Hub dataset at commit {saved_revision}, this run opened "
                                 f"{self.revision}: resume with --dataset_revision {saved_revision}, or start a new "
                                 "run on the new data.")
        for flag, value in (("seed", self.seed), ("shuffle_buffer_size", self.shuffle_buffer_size)):
            if state.get(flag, value) != value:  # (checkpoints before this check: not known)
                raise ResumeMismatch(f"the checkpoint's run shuffled the data with --{flag} {state[flag]}, this run "
                                     f"with {value}: resume with --{flag} {state[flag]}, or start a new run.")
        self.close()
        self.position = {v: tuple(state["position"][v]) for v in self.streams}
        skipped = state["skipped_rows"]
        if isinstance(skipped, int):  # written by 0.1 (one process): one count for all
            skipped = {self.streams[0]: skipped}
        self.skipped = {v: skipped.get(v, 0) for v in self.streams}
        self.last_row = {v: state["last_row"][v] for v in self.streams if v in state.get("last_row", {})}
        if self.tar_counts is not None:  # every process's counts
            if state.get("tar_files") == self.tar_signature:
                self.tar_counts = TarRowCounts(state.get("tar_rows_known", {}))
            else:  # other tars, or tars changed since: counted again (meanwhile a resume reads its epoch again)
                self.tar_counts = TarRowCounts()
                if state.get("tar_rows_known"):
                    logger.warning("the tar shards are not those the checkpoint counted the samples of (another "
                                   "name, size or modification time): their samples are counted again")
        self.legacy_noise_state = state.get("noise")

    # --- the consumer side -----------------------------------------------------------------------------------------
    def next_batch(self) -> torch.Tensor:
        """uint8 images (per_stream_batch × this process's streams, C, H, W), stream after stream; on CUDA machines
        in pinned memory, ready for a non-blocking copy."""
        if self._reader is None and self._thread is None:
            self._start_producer()
        try:
            item, waited = None, 0.0
            while item is None:
                try:
                    item = self._queue.get(timeout=self.QUIET_WAIT_WARNING_S)
                except queue.Empty:
                    waited += self.QUIET_WAIT_WARNING_S
                    self._waiting(f"process (pid {self._reader.process.pid})" if self._reader else "thread", waited)
            if isinstance(item, BaseException):
                raise item
        except BaseException:  # a later call starts again from the position of the last batch handed out
            self.close()
            raise
        self.position = item.position
        self.last_row.update(item.last_rows)
        if item.tar_events:
            self.tar_counts.replay(item.tar_events)
        for v, n in item.skipped.items():
            self.skipped[v] += n
        self.seen_ids.extend(item.ids)
        return item.images

    def _waiting(self, reader: str, seconds: float) -> None:
        """Said every QUIET_WAIT_WARNING_S that a batch has not come: a source that hangs, or a stuck reader, shows
        in the log instead of a silent stop."""
        logger.warning("still waiting for a batch from the data reader %s (%.0f s without one; positions after the "
                       "last batch: %s)", reader, seconds, self.position)

    def _start_producer(self) -> None:
        self._stop = stop = threading.Event()
        if self.num_workers:
            if threading.current_thread() is not threading.main_thread():
                logger.warning("the data reader process is started from thread %s: it dies when that thread ends "
                               "(read the stream from the main thread)", threading.current_thread().name)
            # one batch copied out and queued, one more in the receiving thread's hands, the rest in the reader's ring
            self._queue = queue.Queue(1)
            self._reader = _ReaderProcess(self, self._queue, stop)
            return
        out = self._queue = queue.Queue(self.prefetch)
        pin = self.pin_memory

        def deliver(arrays: Optional[list], item) -> None:
            if arrays is not None:
                images = torch.from_numpy(np.stack(arrays))
                item.images = images.pin_memory() if pin else images
            _put_unless_stopped(out, item, stop)

        self._thread = threading.Thread(target=self._produce, args=(dict(self.position), stop, deliver),
                                        name="ddpm_hf-data", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the reader (process or thread) and its decoding workers (idempotent); a later next_batch starts them
        again from the position."""
        self._stop.set()
        if self._reader is not None:
            reader, self._reader = self._reader, None  # gone even if an interrupt stops what follows
            reader.stop()
        if self._thread is None:
            return
        self._thread.join()  # a producer waiting on a full queue sees the stop within 0.1 s (_put_unless_stopped)
        self._thread = None
        close_abandoned_reads()

    # --- the producer (the reader process, or a thread) -----------------------------------------------------------
    def _produce(self, position: Dict[int, Tuple[int, int]], stop: threading.Event, deliver) -> None:
        """Batches assembled from every stream's decoded rows, each handed to ``deliver(arrays, _Batch without its
        images)`` until ``stop`` is set; an error that ends the stream is delivered as ``deliver(None, error)``."""
        # this reader's own copy (a thread's must not be the training loop's, which replays the events)
        counts = TarRowCounts(self.tar_counts.known) if self.tar_counts is not None else None
        if self._tar_counter is not None:
            self._tar_counter.sink = counts
        decoded = {v: self._decoded(v, *position[v], counts) for v in self.streams}
        collected = time.monotonic()
        try:
            while not stop.is_set():
                if self._tar_counter is not None and self._tar_counter.ended >= self.COLLECT_EVERY_TARS and (
                        self._in_reader_process or time.monotonic() - collected > self.COLLECT_EVERY_S):
                    self._tar_counter.ended, collected = 0, time.monotonic()
                    close_abandoned_reads()
                arrays, ids, skipped, last_rows = [], [], {}, {}
                for v in self.streams:
                    taken, stream_ids, skipped[v], position[v], last_rows[v] = self._take(v, decoded[v])
                    arrays += taken
                    ids += stream_ids
                deliver(arrays, _Batch(None, dict(position), skipped, ids, last_rows,
                                       counts.drain() if counts is not None else None))
        except BaseException as err:  # handed to the training loop, which raises it
            deliver(None, err)
        finally:
            for generator in decoded.values():
                generator.close()
            pause_for_arrow_scans()  # the passes just closed were left part-way

    def _rows(self, v: int, epoch: int, consumed: int,
              counts: Optional[TarRowCounts]) -> Iterator[Tuple[int, int, dict]]:
        """(epoch, row, row's cells) of stream ``v`` from ``consumed`` on, epoch after epoch (``counts``: a
        WebDataset's, as this reader knows them). A read that fails (the network, a 5xx that datasets' own retries
        gave up on) re-opens the epoch and continues at the same row, up to READ_RETRIES times in a row with a
        doubling pause; then the run stops, its checkpoints intact."""
        failures, expected = 0, self.last_row.get(v)
        while True:
            row = None
            try:
                for index, row in self._epoch_rows(v, epoch, consumed, expected, counts):
                    yield epoch, index, row
                    consumed, failures = index + 1, 0
            except Exception as err:  # noqa: BLE001 (whatever the fsspec/HTTP stack raises; parse errors are final)
                if isinstance(err, ValueError) and not isinstance(err, OSError) or failures >= self.READ_RETRIES:
                    where = f"stream {v}, epoch {epoch}, row {consumed}"
                    raise RuntimeError(f"reading the dataset failed at {where} ({type(err).__name__}: "
                                       f"{first_line(err)}){' after %d retries' % failures if failures else ''}; "
                                       "the last checkpoint is intact: resume with --resume_from_checkpoint latest "
                                       "once the data is readable.") from err
                pause = self.READ_RETRY_PAUSE_S * 2 ** failures
                failures += 1
                logger.warning("reading stream %d failed at epoch %d row %d (%s: %s); retry %d/%d in %.1f s",
                               v, epoch, consumed, type(err).__name__, first_line(err), failures, self.READ_RETRIES,
                               pause)
                if row is not None:
                    expected = row_fingerprint(row[self.image_column])
                time.sleep(pause)
                continue
            if consumed == 0:
                raise ValueError(f"stream {v} of the dataset is empty: the dataset has too few rows or shards for "
                                 f"{self.num_streams} streams.")
            epoch, consumed, expected = epoch + 1, 0, None

    def _epoch_rows(self, v: int, epoch: int, start: int, expected: Optional[str],
                    counts: Optional[TarRowCounts]) -> Iterator[Tuple[int, dict]]:
        """(row, cells) of stream ``v``'s epoch from row ``start`` on: replayed without reading the shards already
        finished where that is possible (see _replayed), else read from the epoch's start, the first ``start`` rows
        skipped undecoded."""
        if start:
            replayed = self._replayed(v, epoch, start, expected, counts)
            if replayed is not None:
                return replayed
        ds = self.datasets[v]
        ds.set_epoch(epoch)
        return ((index, row) for index, row in enumerate(ds) if index >= start)

    # --- resuming without reading the finished shards again --------------------------------------------------------
    def _replayed(self, v: int, epoch: int, start: int, expected: Optional[str], counts: Optional[TarRowCounts]):
        """Stream ``v``'s epoch from row ``start`` on, reading only the shards that still hold rows of it; None where
        that cannot be done exactly (neither parquet nor tars whose samples ``counts`` knows, or the check below
        fails), and the caller reads the epoch again. Tars: see _tar_replayed.

        datasets' shard shuffle, split and shuffle buffer depend on the shards' row counts, not on the rows: the same
        operations on a dataset of (shard, row) pairs with the same row counts yield the order in which the stream
        yields its rows. The row before ``start`` is read and compared with the fingerprint kept with the position,
        so a datasets version that shuffles differently, or data that changed, falls back to the exact slow path."""
        if expected is None:
            return None
        if counts is not None:
            return self._tar_replayed(v, epoch, start, expected, counts.known)
        row_groups = self.shard_row_groups() if self.shard_files is not None else None
        if row_groups is None:
            return None
        shards, rows = self._replay_order(v, epoch, row_groups)
        if len(shards) < start:
            return _fallback(v, f"the replayed epoch has {len(shards)} rows, the position is at row {start}")
        check = (int(shards[start - 1]), int(rows[start - 1]))
        # the shards in the order their rows are due (the row before the position first): each is read once, whole
        due = shards[start:]
        _, first_due = np.unique(due, return_index=True)
        wanted = list(dict.fromkeys([check[0]] + due[np.sort(first_due)].tolist()))
        needed = _RowsDue(row_groups, due, rows[start:])
        source = self._read_shards(wanted)
        held = {}
        for shard, row, cells in source:
            if (shard, row) in needed:
                held[(shard, row)] = cells
            if (shard, row) == check:
                if row_fingerprint(cells[self.image_column]) != expected:
                    return _fallback(v, "the row before the position is not the one the checkpoint saw")
                break
        else:
            return _fallback(v, "the row before the position was not found")
        finished = len(np.unique(shards)) - len(wanted)
        logger.info("stream %d resumes at epoch %d row %d reading %d of its shards (%d finished ones skipped)", v,
                    epoch, start, len(wanted), finished)
        return self._emit(_pairs_from(shards, rows, start), start, needed, held, source)

    @staticmethod
    def _emit(remaining, start: int, needed, held: dict, source) -> Iterator[Tuple[int, dict]]:
        """The remaining rows in the stream's order, read from their shards in the source's order: a row waits in
        ``held`` from its reading to its turn (about a shuffle buffer's worth of rows)."""
        for index, (shard, row) in enumerate(remaining, start):
            while (shard, row) not in held:
                got = next(source, None)
                if got is None:  # final (a ValueError): reading it again would end the same way
                    raise ValueError(f"shard {shard} of the dataset ended before its row {row}, which the resumed "
                                     f"epoch's order holds at row {index}: the data changed since the checkpoint was "
                                     "written. Resume on the data it was written with, or start a new run.")
                if got[:2] in needed:
                    held[got[:2]] = got[2]
            yield index, held.pop((shard, row))

    def shard_row_groups(self) -> Optional[List[List[int]]]:
        """Rows of each row group of each shard (parquet footers, read once), or None for other sources."""
        if self._row_groups is None and self.shard_files is not None:
            self._row_groups = parquet_row_groups(self.shard_files, self.token)
        return self._row_groups

    def _replay_order(self, v: int, epoch: int, row_groups: List[List[int]]) -> Tuple[np.ndarray, np.ndarray]:
        """(shards, rows in shard) of each row of stream ``v``'s epoch, in yield order, from stand-in parquet files of
        (shard, row) pairs with the shards' row groups (datasets shuffles tables as they come: same row groups, same
        tables), streamed through the same shuffle and split.

        The stand-ins are written and read as whole columns (delta-encoded: a few bytes a row group on disk), and the
        stream is read as arrow tables: the same shuffle of the same tables as the stream of rows, without its Python
        work per row. A stream of 10 M rows took 7.5 s and about 0.3 GB here; read row by row, 1 M took 10.6 s (100 M:
        about 21 minutes and 15 GB). (With a --shuffle_buffer_size under 20, datasets fills the buffer a row at a time
        and the replay takes about 20 µs a row.) See docs/benchmarks.md (2026-11-28 h)."""
        import tempfile

        import pyarrow as pa
        import pyarrow.parquet as pq
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        # 8 bytes a row of the order (a shard of 2³¹ rows or more, 12 bytes)
        row_type = np.int32 if max((sum(groups) for groups in row_groups), default=0) < 2**31 else np.int64
        schema = pa.schema([("shard", pa.int32()), ("row", pa.from_numpy_dtype(row_type))])
        remove_replay_leftovers()
        with tempfile.TemporaryDirectory(prefix=f"{REPLAY_PREFIX}{os.getpid()}_") as folder:
            files = []
            for shard, groups in enumerate(row_groups):
                files.append(os.path.join(folder, f"{shard:07d}.parquet"))
                with pq.ParquetWriter(files[-1], schema, compression="none", use_dictionary=False,
                                      column_encoding="DELTA_BINARY_PACKED") as writer:
                    first = 0
                    for rows in groups:
                        table = pa.table({"shard": np.full(rows, shard, dtype=np.int32),
                                          "row": np.arange(first, first + rows, dtype=row_type)}, schema=schema)
                        writer.write_table(table, row_group_size=max(rows, 1))
                        first += rows
            with _streaming_patches_kept():
                pairs = without_exit_pause(load_dataset("parquet", data_files={"train": files}, split="train",
                                                        streaming=True))
            if self.shuffle_buffer_size > 1:
                pairs = pairs.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_size)
            pairs = split_dataset_by_node(pairs, rank=v, world_size=self.num_streams).with_format("arrow")
            pairs.set_epoch(epoch)  # (after with_format, which starts again from epoch 0)
            tables = list(pairs.iter(batch_size=REPLAY_BATCH_ROWS))
            if not tables:
                return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32)
            order = pa.concat_tables(tables)
            return order.column("shard").to_numpy(), order.column("row").to_numpy()

    def _tar_replayed(self, v: int, epoch: int, start: int, expected: str, known: Dict[int, int]):
        """Stream ``v``'s epoch of tars from row ``start`` on, the tars whose samples are all used not read again.

        The stream is rebuilt on a generator of the same shards (``_TarReplay``: the same shard shuffle, split and
        shuffle buffer, hence the same order for the same row counts) that stands in for the rows of each counted tar
        with a placeholder, while the rows before ``start`` are skipped; a tar not counted yet (the first epoch's
        current one and those after it) is read. From ``start`` on the generator reads every tar; the placeholders
        still in the shuffle buffer then (a buffer's worth at most) are read from their tars (``_StandIns``). So a
        resume in the first epoch reads only the tars it had not finished, and one in a later epoch only those that
        still hold rows; besides, the row before ``start`` is read from its tar to be checked, and a tar whose
        placeholders stopped part-way (about one in each group of tars datasets reads at once) is read twice: for its
        placeholders in the buffer, and for its other rows."""
        if not known:
            return _fallback(v, "no tar's samples are counted yet (a tar is counted once it has been read whole)")
        replay = _TarReplay(self, known)
        try:
            return self._replay_from(v, epoch, start, expected, known, replay)
        except BaseException:
            replay.close()
            raise

    def _replay_from(self, v: int, epoch: int, start: int, expected: str, known: Dict[int, int],
                     replay: "_TarReplay"):
        """_tar_replayed's skipping to ``start``, and its check of the row before it."""
        rows = replay.stream(v, epoch)
        handed: Dict[int, set] = {}  # rows of each tar handed out as placeholders, until all were
        finished = set()  # the tars all of whose rows were
        passed, row = 0, None
        for row in itertools.islice(rows, start):
            passed += 1
            if row["__stand_in__"]:
                shard = row["__shard__"]
                handed.setdefault(shard, set()).add(row["__row__"])
                if len(handed[shard]) == known[shard]:
                    finished.add(shard)
                    del handed[shard]
        with replay.lock:  # every row from here on is read; the placeholders generated so far are all known
            replay.replaying = False
            generated = dict(replay.stood_in)
        if passed < start:
            replay.close()
            return _fallback(v, f"the replayed epoch has {passed} rows, the position is at row {start}")
        stand_ins = _StandIns(replay.read, {shard: set(range(n)) - handed.get(shard, set())
                                            for shard, n in generated.items() if shard not in finished})
        not_read = finished - {row["__shard__"]} if row["__stand_in__"] else finished
        check = stand_ins.cells(row) if row["__stand_in__"] else row
        if row_fingerprint(check[self.image_column]) != expected:
            replay.close()
            return _fallback(v, "the row before the position is not the one the checkpoint saw")
        logger.info("stream %d resumes at epoch %d row %d without reading %d finished tars again", v, epoch, start,
                    len(not_read))
        return replay.emit(rows, start, stand_ins)

    def _read_shards(self, shards: List[int]) -> Iterator[Tuple[int, int, dict]]:
        """(shard, row, cells) of the given shards, in that order, each shard read from its start."""
        for shard in shards:
            for row, cells in enumerate(self.base.shard(num_shards=self.num_shards, index=shard, contiguous=True)):
                yield shard, row, cells

    def _decoded(self, v: int, epoch: int, consumed: int,
                 counts: Optional[TarRowCounts]) -> Iterator[Tuple[int, int, tuple]]:
        """(epoch, row, decode result) of stream ``v`` in row order; with workers, ``prefetch`` batches of rows are
        in flight at once, in chunks spread over the workers."""
        rows = self._rows(v, epoch, consumed, counts)
        if not self.num_workers:
            for epoch, index, row in rows:
                cell = row[self.image_column]
                yield epoch, index, decode_rows([cell], [(v, epoch, index)], self.settings)[0], cell
            return
        chunk = max(1, min(64, -(-self.per_stream_batch // self.num_workers)))
        pending: deque = deque()  # (keys, future) of the chunks in flight, oldest first
        while True:
            try:
                while len(pending) * chunk < self.prefetch * self.per_stream_batch:
                    part = [next(rows) for _ in range(chunk)]
                    keys = [(v, e, i) for e, i, _ in part]
                    pending.append((keys, None, None))  # named in the error below even if the submission fails
                    cells = [row[self.image_column] for _, _, row in part]
                    pending[-1] = (keys, self._pool.submit(decode_rows, cells, keys, self.settings), cells)
                keys, results, cells = pending[0][0], pending[0][1].result(), pending[0][2]
            except BrokenProcessPool as err:  # which of the rows in flight killed it is unknowable here
                (_, e0, i0), (_, e1, i1) = pending[0][0][0], pending[-1][0][-1]
                raise RuntimeError(f"a data worker died while decoding stream {v}, between epoch {e0} row {i0} and "
                                   f"epoch {e1} row {i1} (killed for memory, or the image decoder crashed on one of "
                                   "these rows); the last checkpoint is intact.") from err
            pending.popleft()
            for (_, e, i), result, cell in zip(keys, results, cells):
                yield e, i, result, cell

    def _take(self, v: int, decoded: Iterator) -> Tuple[list, list, int, Tuple[int, int], str]:
        """The next ``per_stream_batch`` decodable examples of stream ``v``, their ids, the rows skipped, the
        stream's position after them and the fingerprint of the row before that position."""
        taken, ids, skipped, first_failure, failures = [], [], 0, None, 0
        while len(taken) < self.per_stream_batch:
            epoch, index, (array, detail), cell = next(decoded)
            position = (epoch, index + 1)
            if array is not None:
                taken.append(array)
                if detail is not None:
                    ids.append(detail)
                first_failure, failures = None, 0
                continue
            skipped += 1
            self._say_undecodable(v, epoch, index, detail)
            first_failure, failures = first_failure or (epoch, index), failures + 1
            whole_epoch = epoch > first_failure[0] and index >= first_failure[1]
            if whole_epoch or failures >= self.MAX_UNDECODABLE_IN_A_ROW:
                what = "a whole epoch" if whole_epoch else f"{failures} rows in a row"
                raise ValueError(f"no decodable image in {what} of stream {v}: the data is corrupt or the image "
                                 "column holds something else.")
        return taken, ids, skipped, position, row_fingerprint(cell)

    def _say_undecodable(self, v: int, epoch: int, index: int, detail: str) -> None:
        """A stream's first UNDECODABLE_SAID undecodable images are said with their row and error, the later ones
        only counted, the count said at each power of ten (and per process at the end of training): a web-scale
        dataset with 1 % of broken images would otherwise log a million lines an epoch."""
        met = self._undecodable_met[v] = self._undecodable_met[v] + 1
        if met <= self.UNDECODABLE_SAID:
            last = met == self.UNDECODABLE_SAID
            logger.warning("skipping an undecodable image (stream %d, epoch %d, row %d): %s%s", v, epoch, index, detail,
                           " (the next ones of this stream are counted, not said one by one)" if last else "")
        elif str(met).rstrip("0") == "1":
            logger.warning("stream %d has skipped %d undecodable images (epoch %d, row %d)", v, met, epoch, index)


class _TarReplay:
    """The generator behind a tar replay (see TrainStream._tar_replayed), found by its key in ``_TAR_REPLAYS`` (the
    datasets generator is given plain arguments)."""

    def __init__(self, stream: "TrainStream", known: Dict[int, int]):
        self.base, self.tars, self.num_shards, self.known = stream.base, stream._tars, stream.num_shards, known
        self.image_column, self.seed, self.buffer = stream.image_column, stream.seed, stream.shuffle_buffer_size
        self.num_streams = stream.num_streams
        self.replaying = True  # placeholders for the counted tars' rows while set
        self.lock = threading.Lock()  # held to set a placeholder's row in ``stood_in`` and to end the replaying
        self.stood_in: Dict[int, int] = {}  # rows of each tar generated as placeholders (its first ones)
        self.key = next(_TAR_REPLAY_KEYS)
        _TAR_REPLAYS[self.key] = self

    def stream(self, v: int, epoch: int) -> Iterator[dict]:
        """Stream ``v``'s ``epoch``: its rows with ``__shard__``, ``__row__`` and ``__stand_in__`` (a placeholder,
        its image None)."""
        from datasets import Features, IterableDataset, Value
        from datasets.distributed import split_dataset_by_node

        features = Features({**self.base.features, "__shard__": Value("int64"), "__row__": Value("int64"),
                             "__stand_in__": Value("bool")})
        rows = IterableDataset.from_generator(_tar_replay_rows, features=features,
                                              gen_kwargs={"shards": list(range(self.num_shards)), "key": self.key})
        if self.buffer > 1:
            rows = rows.shuffle(seed=self.seed, buffer_size=self.buffer)
        rows = split_dataset_by_node(rows, rank=v, world_size=self.num_streams)
        rows.set_epoch(epoch)
        return iter(rows)

    def read(self, shard: int) -> Iterator[dict]:
        return iter(undecoded_images(one_tar(self.tars, shard), self.image_column))

    def rows(self, shards: List[int]) -> Iterator[dict]:
        for shard in shards:
            n, row = self.known.get(shard), 0
            while n is not None and row < n:
                with self.lock:  # (datasets reads several shards at once, in threads)
                    if not self.replaying:
                        break
                    self.stood_in[shard] = row + 1
                yield {self.image_column: None, "__shard__": shard, "__row__": row, "__stand_in__": True}
                row += 1
            if n is not None and row == n:
                continue
            index = -1
            for index, cells in enumerate(self.read(shard)):
                if index >= row:
                    yield {**cells, "__shard__": shard, "__row__": index, "__stand_in__": False}
            if n is not None and index + 1 != n:
                raise ValueError(f"tar shard {shard} of the dataset holds {index + 1} samples, the checkpoint counted "
                                 f"{n}: the data changed since the checkpoint was written. Resume on the data it was "
                                 "written with, or start a new run.")

    def emit(self, rows: Iterator[dict], start: int, stand_ins: "_StandIns") -> Iterator[Tuple[int, dict]]:
        try:
            for index, row in enumerate(rows, start):
                yield index, stand_ins.cells(row) if row["__stand_in__"] else row
        finally:
            self.close()

    def close(self) -> None:
        _TAR_REPLAYS.pop(self.key, None)


_TAR_REPLAYS: Dict[int, _TarReplay] = {}
_TAR_REPLAY_KEYS = itertools.count()


def _tar_replay_rows(shards: List[int], key: int) -> Iterator[dict]:
    replay = _TAR_REPLAYS.get(key)
    if replay is not None:  # (else its stream was closed, and datasets' reading threads are stopping)
        yield from replay.rows(shards)


class _StandIns:
    """The cells of the placeholders a tar replay hands out after its position, read from their tars: ``due`` holds,
    for each tar, the rows of it in the shuffle buffer. A tar is read once, at the first of its rows handed out, up
    to the last of its rows due, which are kept until handed out: a buffer's worth of rows held at most, and one tar
    open at a time (kept open, each would hold one of huggingface_hub's 100 connections: 400 small tars and a
    buffer of 1,000 held 113)."""

    def __init__(self, read, due: Dict[int, set]):
        self.read, self.due = read, due
        self.held: Dict[Tuple[int, int], dict] = {}

    def cells(self, row: dict) -> dict:
        shard, wanted = row["__shard__"], row["__row__"]
        if (shard, wanted) in self.held:
            return self.held.pop((shard, wanted))
        due = self.due.pop(shard, set()) | {wanted}
        reader = self.read(shard)
        try:
            for index, cells in enumerate(reader):
                if index in due:
                    due.discard(index)
                    self.held[(shard, index)] = cells
                    if not due:
                        return self.held.pop((shard, wanted))
        finally:
            reader.close()  # its HTTP stream closed now, not when the garbage collector finds it
        raise ValueError(f"tar shard {shard} of the dataset ended before its row {max(due)}, which the checkpoint "
                         "counted: the data changed since the checkpoint was written. Resume on the data it was "
                         "written with, or start a new run.")


REPLAY_PREFIX = "ddpm_hf_replay_"  # + the pid of the process replaying: its stand-in files (see _replay_order)


def remove_replay_leftovers() -> None:
    """The stand-in files of replays whose process is gone: a SIGKILL skips their clean-up, and they hold 16 bytes per
    row of the dataset."""
    import shutil
    import tempfile

    for folder in Path(tempfile.gettempdir()).glob(f"{REPLAY_PREFIX}*_*"):
        pid = folder.name[len(REPLAY_PREFIX):].split("_", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def close_abandoned_reads() -> None:
    """Close the HTTP streams of the tars read to their end, and of the passes a closed stream left part-way, now:
    huggingface_hub's streamed file (HfFileSystemStreamFile, which datasets opens for each tar) releases its
    response only when it is deleted, and it sits in a reference cycle, freed only when the garbage collector next
    runs its oldest generation, which a process holding torch's objects seldom does. Streaming 200 tars from the
    local Hub, the open connections grew by one every two tars; at the second epoch huggingface_hub's pool of 100
    was exhausted and every read waited for its timeout: the stream stalled. So the reader collects between batches
    once 8 tars have ended (TrainStream._produce: cheap in the reader process, whose inherited objects are frozen
    out of collections; at most once a second in a reading thread of the training process, where a collection costs
    0.2 s), and a stream at its close."""
    gc.collect()


def _put_unless_stopped(out: "queue.Queue", item, stop: threading.Event) -> None:
    """``item`` into ``out``, waiting while it is full, unless ``stop`` is set (then nobody reads it)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return
        except queue.Full:
            pass


def _die_with_parent(parent: int) -> None:
    """This process gets SIGKILL when its parent, pid ``parent``, dies (see die_with_parent), leaves Ctrl-C to
    the training process, and ends at SIGTERM (not unwinding as the training process does: see stop_on_sigterm)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent, signal.SIGKILL)


def _kill_if_started(process) -> None:
    if process.pid is not None:
        process.kill()


class _ReaderProcess:
    """A TrainStream's reading in a process of its own (forked), with its decoding workers as children.

    The batches come back through ``prefetch − 2`` slots of shared memory (at least one; anonymous, so /dev/shm's size
    in a container does not bound them; with the batch queued and the one waiting to be, ``max(prefetch, 3)`` ahead in
    all): the reader writes a batch into a free slot and sends what goes with it (positions, skip counts, ids) on a
    pipe; a thread of the training process (``_forward``) copies the images out as they come, into pinned memory where
    asked, sends the slot back and puts the batch in the stream's queue. The training loop's thread then only takes a
    batch from a queue: receiving one itself (two messages, a fresh buffer's page faults, the copy) took it 0.4 ms per
    batch of 128 32² images here and 2.6 ms at 256² (bench/data.py), where a CUDA-graph step of the CIFAR-10 model takes
    27 ms on an H100. An error that ends the stream comes back on the pipe, after the batches made before it, and is put
    in the queue after them (``receive`` raises it); so is a reader's death (killed for memory, a crash in a native
    library), named as such. The reader dies with the thread that started it (Linux's parent-death signal follows the
    forking thread: train.py's main thread), and its workers with it."""

    def __init__(self, stream: "TrainStream", out: "queue.Queue", stop: threading.Event):
        import mmap
        import multiprocessing.util

        self.pin_memory = stream.pin_memory
        settings = stream.settings
        shape = (len(stream.streams) * stream.per_stream_batch, settings.channels, settings.resolution,
                 settings.resolution)
        slots = max(1, stream.prefetch - 2)  # + the queued batch + the one the receiving thread holds
        self.ring = np.frombuffer(mmap.mmap(-1, slots * int(np.prod(shape))), dtype=np.uint8).reshape(slots, *shape)
        self.conn, child_end = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("fork").Process(
            target=self._run, args=(stream, dict(stream.position), child_end, os.getpid()), name="ddpm_hf-reader")
        # not a daemon (a daemon may not have children, its workers): killed at exit before multiprocessing joins it
        self._kill_at_exit = multiprocessing.util.Finalize(self, _kill_if_started, args=(self.process,),
                                                           exitpriority=100)
        self.process.start()
        child_end.close()
        self._ready, self._stop = self.waited_on(self.conn, self.process), stop
        # Started after the fork: the reader has no copy of it. It holds this object only while receiving, so that a
        # stream dropped without close() still has its reader killed when collected (the Finalize above); it stops
        # then.
        this = weakref.ref(self, lambda _: stop.set())
        self.receiver = threading.Thread(target=self._forward, args=(this, out, stop), name="ddpm_hf-receiver",
                                         daemon=True)
        self.receiver.start()

    @staticmethod
    def waited_on(conn, process) -> "select.poll":
        """What receive waits on, registered once: the pipe, and the reader's end (multiprocessing's wait() builds a
        selector at every call, a third of the training process's time per batch)."""
        ready = select.poll()
        for fd in (conn.fileno(), process.sentinel):
            ready.register(fd, select.POLLIN)
        return ready

    def _run(self, stream: "TrainStream", position: Dict[int, Tuple[int, int]], conn, parent: int) -> None:
        """The reader process: its workers started first (forked while it has one thread), then the stream's rows
        read and decoded into the ring, slot after free slot. Whatever ends it is sent to the training process."""
        import pickle
        import sys
        import traceback

        self.conn.close()  # the training process's end: this process sees the pipe's end when that process is gone
        _die_with_parent(parent)
        free, error_sent = list(range(len(self.ring))), []

        def deliver(arrays: Optional[list], item) -> None:
            if arrays is None:
                # the error that ends the stream: pickled here (None where it cannot be), with its summary and
                # traceback as text, for the training process to rebuild and raise (see _reader_error)
                try:
                    pickled = pickle.dumps(item)
                except Exception:  # noqa: BLE001
                    pickled = None
                conn.send(("error", pickled, f"{type(item).__name__}: {item}", "".join(traceback.format_exception(
                    type(item), item, item.__traceback__))))
                error_sent.append(True)
                return
            while not free:
                free.append(conn.recv())  # a slot the training process has copied out
            slot = free.pop(0)
            np.stack(arrays, out=self.ring[slot])
            conn.send(("batch", slot, item))

        try:
            torch.set_num_threads(1)
            gc.freeze()  # the objects inherited from the training process: out of this process's collections (their
            # scan would cost 0.2 s, and touching them would copy their pages)
            stream._in_reader_process = True
            stream._pool = ProcessPoolExecutor(stream.num_workers, mp_context=multiprocessing.get_context("fork"),
                                               initializer=_init_data_worker, initargs=(os.getpid(), conn))
            list(stream._pool.map(int, range(stream.num_workers)))  # all started now
            stream._produce(position, threading.Event(), deliver)  # returns after delivering an error
        except BaseException as err:  # starting the workers failed, or sending the error did
            if not error_sent:
                traceback.print_exc()
                deliver(None, err)
        finally:  # at once: no interpreter shutdown, the workers die with this process
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(0 if error_sent else 1)

    @staticmethod
    def _forward(reader: "weakref.ref[_ReaderProcess]", out: "queue.Queue", stop: threading.Event) -> None:
        """The receiving thread: every batch the reader sends, then the error that ends the stream, put in ``out``
        until ``stop`` is set."""
        while not stop.is_set() and (receiving := reader()) is not None:
            try:
                item = receiving.receive()
            except BaseException as err:  # raised by next_batch, after the batches before it
                _put_unless_stopped(out, err, stop)
                return
            finally:
                receiving = None
            _put_unless_stopped(out, item, stop)

    def receive(self) -> "_Batch":
        """The next batch, its images copied out of the ring; the reader's error, or its death, raised here (after
        a stop, the death: nobody reads it)."""
        # the pipe, or the reader's end; is_alive as well, in case a process it forked holds the pipe's other end
        while not (ready := self._ready.poll(1000)) and self.process.is_alive() and not self._stop.is_set():
            pass
        if not ready:  # the reader ended after the last wait timed out: what it sent before is there now
            ready = self._ready.poll(0)
        try:
            message = self.conn.recv() if self.conn.fileno() in dict(ready) else None
        except (EOFError, OSError):  # the reader died while sending
            message = None
        if message is None:
            self.process.join(5)
            code, deadline = self.process.exitcode, time.monotonic() + 5
            while code is None and time.monotonic() < deadline:  # another thread reaping it at this very moment
                time.sleep(0.01)
                code = self.process.exitcode
            how = (f"was killed by {signal.Signals(-code).name} (killed for memory, or a native library crashed in "
                   "it reading or decoding the dataset)" if code and code < 0 else
                   f"ended (exit code {code}) without sending its error (its traceback, if any, is above)")
            raise RuntimeError(f"the data reader process {how}; the last checkpoint is intact: resume with "
                               "--resume_from_checkpoint latest.")
        if message[0] == "error":
            raise self._reader_error(*message[1:])
        _, slot, batch = message
        try:
            batch.images = torch.empty(self.ring.shape[1:], dtype=torch.uint8, pin_memory=self.pin_memory)
            # numpy's copy, in this thread: torch's would wake its intra-op threads, whose spinning after the copy
            # costs the training process more CPU than the copy (9 ms against 0.4 ms per batch of 128 32² images)
            np.copyto(batch.images.numpy(), self.ring[slot])
        finally:
            try:
                self.conn.send(slot)
            except OSError:  # the reader has ended: the batches it sent before, then its error, are still readable
                pass
        return batch

    @staticmethod
    def _reader_error(pickled: Optional[bytes], summary: str, where: str) -> BaseException:
        """The reader's error as it was raised there where it unpickles here (it may hold what only the reader
        could rebuild), else a RuntimeError with its summary; with the reader's traceback as a note (3.11+)."""
        import pickle

        try:
            error = pickle.loads(pickled) if pickled is not None else RuntimeError(summary)
        except Exception:  # noqa: BLE001
            error = RuntimeError(summary)
        if hasattr(error, "add_note"):
            error.add_note("in the data reader process:\n" + where)
        return error

    def stop(self) -> None:
        """Kill the reader (its workers follow it) and wait for it and the receiving thread: nothing of them is worth
        keeping."""
        self._stop.set()
        try:
            self._kill_at_exit()  # kills, once
        finally:
            # the thread sees the reader's end (or the stop) and ends, then this one reaps the reader (one thread at
            # a time: the other would find no exit code); the pipe is closed after the thread, never under it
            self.receiver.join(30)
            self.process.join(30)
            if not self.receiver.is_alive():
                self.conn.close()


def all_processes(state: dict) -> dict:
    """``state``'s per-stream dicts merged with those of every other process (identity in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return state
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, state)
    return {key: ({k: v for part in parts for k, v in part[key].items()} if isinstance(value, dict) else value)
            for key, value in state.items()}


def default_num_workers(local_processes: int) -> int:
    """Decoding workers per training process when --dataloader_num_workers is not given: the cores left after one
    per training process, shared among the local processes, at most 8 each."""
    return max(0, min(8, _cores() // max(1, local_processes) - 1))


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
