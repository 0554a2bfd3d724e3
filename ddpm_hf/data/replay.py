"""A resumed stream's epoch from its position on, without reading again the shards it had finished (``Replay``):
datasets' shard shuffle, split and shuffle buffer depend on the shards' row counts, not on their rows, so the same
operations on stand-ins of (shard, row) pairs give the order in which a stream yields its rows. Parquet shards are
replayed from their footers' row groups, tars from their counted samples."""

import itertools
import logging
import os
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .decoding import undecoded_images
from .shards import TarRowCounts, is_row, one_tar, parquet_row_groups, streaming_patches_kept
from .sources import without_exit_pause

logger = logging.getLogger(__name__)


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


class Replay:
    """The reading a TrainStream's resume replays: the dataset (``base``: its rows undecoded, neither shuffled nor
    split) and how the stream shuffles and splits it; ``shard_files``: its parquet files (None: other sources);
    ``tars``: the dataset whose tars ``one_tar`` reads, where they are split by shards (None: not)."""

    def __init__(self, base, num_shards: int, num_streams: int, seed: int, shuffle_buffer_size: int,
                 image_column: str, shard_files: Optional[List[str]], tars, token: Optional[str]):
        self.base, self.num_shards, self.num_streams = base, num_shards, num_streams
        self.seed, self.shuffle_buffer_size, self.image_column = seed, shuffle_buffer_size, image_column
        self.shard_files, self.tars, self.token = shard_files, tars, token
        self._row_groups: Optional[List[List[int]]] = None

    def rows_from(self, v: int, epoch: int, start: int, expected: Optional[str], counts: Optional[TarRowCounts]):
        """Stream ``v``'s epoch from row ``start`` on, reading only the shards that still hold rows of it; None where
        that cannot be done exactly (neither parquet nor tars whose samples ``counts`` knows, or the check below
        fails), and the caller reads the epoch again. Tars: see _tar_rows_from.

        datasets' shard shuffle, split and shuffle buffer depend on the shards' row counts, not on the rows: the same
        operations on a dataset of (shard, row) pairs with the same row counts yield the order in which the stream
        yields its rows. The row before ``start`` is read and compared with the fingerprint kept with the position,
        so a datasets version that shuffles differently, or data that changed, falls back to the slow path, which
        compares that row again, as read by the stream itself (see TrainStream._epoch_rows)."""
        if expected is None:
            return None
        if counts is not None:
            return self._tar_rows_from(v, epoch, start, expected, counts.known)
        row_groups = self.shard_row_groups() if self.shard_files is not None else None
        if row_groups is None:
            return None
        shards, rows = self.order(v, epoch, row_groups)
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
                if not is_row(cells[self.image_column], expected):
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

    def order(self, v: int, epoch: int, row_groups: List[List[int]]) -> Tuple[np.ndarray, np.ndarray]:
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
            with streaming_patches_kept():
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

    def _tar_rows_from(self, v: int, epoch: int, start: int, expected: str, known: Dict[int, int]):
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
            return self._tar_skip_to(v, epoch, start, expected, known, replay)
        except BaseException:
            replay.close()
            raise

    def _tar_skip_to(self, v: int, epoch: int, start: int, expected: str, known: Dict[int, int],
                     replay: "_TarReplay"):
        """_tar_rows_from's skipping to ``start``, and its check of the row before it."""
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
        if not is_row(check[self.image_column], expected):
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


class _TarReplay:
    """The generator behind a tar replay (see Replay._tar_rows_from), found by its key in ``_TAR_REPLAYS`` (the
    datasets generator is given plain arguments)."""

    def __init__(self, replay: "Replay", known: Dict[int, int]):
        self.base, self.tars, self.num_shards, self.known = replay.base, replay.tars, replay.num_shards, known
        self.image_column, self.seed, self.buffer = replay.image_column, replay.seed, replay.shuffle_buffer_size
        self.num_streams = replay.num_streams
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


REPLAY_PREFIX = "ddpm_hf_replay_"  # + the pid of the process replaying: its stand-in files (see Replay.order)


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
