"""A dataset's shards as a resume needs them: the commit of a Hub dataset, its parquet files and their row groups, its
WebDataset tars and their sample counts, one row's fingerprint."""

import copy
import logging
import os
import re
import threading
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple


from .decoding import is_remote

logger = logging.getLogger(__name__)


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


def open_footer(path: str, token: Optional[str]):
    """A shard opened to read its footer: a local file, or an ``hf://`` URL through HfFileSystem in 16 KB blocks (the
    footer, not the rows)."""
    if path.startswith("hf://"):
        from huggingface_hub import HfFileSystem

        return HfFileSystem(token=token).open(path[len("hf://"):], "rb", block_size=16 * 1024)
    return open(path, "rb")


def in_threads(function, items) -> list:
    """``function`` over ``items`` in 8 threads (the footers of many shards are small, latency-bound reads)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(function, items))


def row_fingerprint(cell: dict) -> str:
    """A cheap identity of an image cell (its size and CRC-32), kept with a stream's position."""
    import zlib

    if cell is None:  # a null cell
        return "none"
    data = cell.get("bytes")
    return f"{len(data)}:{zlib.crc32(data):08x}" if data is not None else f"path:{cell.get('path')}"


def is_row(cell: dict, fingerprint: str) -> bool:
    """Whether ``cell`` is the row whose :func:`row_fingerprint` is ``fingerprint``. A file is known by its name
    (of a member of an archive, ``zip://member::archive``, the member's): the same folder renamed or moved elsewhere,
    or the same Hub file at another address, holds the same rows."""
    now = row_fingerprint(cell)
    if now.startswith("path:") and fingerprint.startswith("path:"):
        return _file_name(now) == _file_name(fingerprint)
    return now == fingerprint


def _file_name(fingerprint: str) -> str:
    return fingerprint.split("::")[0].replace("\\", "/").rsplit("/", 1)[-1]


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
    finished tars needs them (see Replay._tar_rows_from), and a tar has no footer that says (a Hub tar's headers
    are spread over the whole file). Counts are the data's, the same in every epoch and for every stream; the reader
    learns them (``TarSampleCounter``: as its input reaches each tar's end, ahead of the batches handed out, which
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


class TarSampleCounter:
    """Stands in for the WebDataset builder's example generator (datasets calls it with a list of tars: one, each
    shard of the stream being one tar) and counts each tar's samples on the way, into ``sink``: a tar's count is known
    once its reading has ended, whether by the stream or by a resume. A reading stopped part-way (a retry, the
    reading of a tar up to the last row a resume needs of it) teaches nothing. One generator layer: no cost
    measurable over 10,000 rows, where a ``map`` before the shuffle cost 40 µs a row. It also counts the tars ended,
    for the reader's collections (see stream.close_abandoned_reads): datasets runs it in its reading threads, where a
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


def with_tar_counting(dataset, tar_index: Dict[str, int]) -> Tuple[object, TarSampleCounter]:
    """``dataset`` (a streamed WebDataset, as ``tar_shard_files`` found it) reading its tars through a
    ``TarSampleCounter``, and the counter."""
    source = copy.copy(dataset._ex_iterable)
    source.generate_examples_fn = counter = TarSampleCounter(source.generate_examples_fn, tar_index)
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
        with open_footer(path, token) as source:
            return _remember(path, row_groups_of(pq.read_metadata(source)))

    try:
        return in_threads(row_groups, files)
    except Exception as err:  # noqa: BLE001 (then resuming reads the epoch again: slower, still exact)
        logger.warning("could not read the shards' row groups (%s); a resume will read its epoch again", err)
        return None


@contextmanager
def streaming_patches_kept():
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
