"""The training stream (``TrainStream``): ``num_streams`` disjoint streams of the shuffled dataset, each contributing
its share of every global batch, positions kept in checkpoints and replayed on resume, rows decoded off the training
loop."""

import functools
import gc
import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..errors import ResumeMismatch, first_line
from .decoding import DecodeSettings, decode_rows, undecoded_images
from .reader import Batch, ReaderProcess, all_processes, put_unless_stopped
from .replay import Replay
from .shards import (TarRowCounts, TarSampleCounter, dataset_revision, is_row, parquet_shard_files, row_fingerprint,
                     tar_files_signature, tar_shard_files, with_tar_counting)
from .sources import without_exit_pause

logger = logging.getLogger(__name__)


def _streams(count: int) -> str:
    return f"{count} data stream{'' if count == 1 else 's'}"


class TrainStream:
    """Endless per-process uint8 image batches for step-based training, prefetched, with exact resume.

    Each of the ``num_streams`` streams is ``split_dataset_by_node(dataset.shuffle(seed, buffer), v, num_streams)``,
    reshuffled every epoch (``set_epoch``); it yields examples forever, epoch after epoch, so no example is dropped or
    repeated within an epoch and every process does the same number of steps. The rows are read in order and
    assembled into batches ``prefetch`` ahead. With ``num_workers`` decoding processes, the reading runs in a process
    of its own (``ReaderProcess``): its Python work, about 6 ms of interpreter time per batch of 128 small images,
    would otherwise share the training process's interpreter lock with the step's kernel launches. With none (as
    DataLoader's 0), a thread of the training process reads and decodes. Either way ``next_batch`` takes a finished
    batch from a queue. Undecodable rows are skipped and counted.
    ``state_dict()`` is the position of every stream after the last batch handed out (not the prefetched ones);
    resuming skips the consumed rows without decoding them, and the finished shards (parquet, or tars once counted:
    see Replay) without reading them.
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
                 prefetch: int = 4, pin_memory: bool = False, token: Optional[str] = None,
                 next_epoch_on_resume: bool = False):
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
        shard_files = parquet_shard_files(dataset)  # for a resume that skips finished shards (see Replay)
        # the same for a WebDataset's tars split by shards, once their samples are counted (see TarRowCounts)
        all_tars = tar_shard_files(dataset)  # (counted even unsplit: the counter also closes their HTTP streams)
        tars = all_tars if shards % num_streams == 0 else None
        self.tar_signature = tar_files_signature(tars) if tars else None
        self.tar_counts = TarRowCounts() if tars else None  # as the training process knows them
        self._tar_counter: Optional[TarSampleCounter] = None
        if all_tars:
            dataset, self._tar_counter = with_tar_counting(dataset, {path: k for k, path in enumerate(all_tars)})
        tars = dataset if tars else None  # (with the counting: one_tar reads a tar of it)
        self.revision = dataset_revision(dataset)  # a Hub dataset's commit, kept in the checkpoints
        self.seed, self.shuffle_buffer_size = seed, shuffle_buffer_size
        dataset = self.base = undecoded_images(without_exit_pause(dataset), image_column)  # passes end unpaused
        if shuffle_buffer_size > 1:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        self.streams, self.rank, self.world_size = list(range(rank, num_streams, world_size)), rank, world_size
        self.num_streams, self.num_shards = num_streams, shards
        self.replay = Replay(self.base, shards, num_streams, seed, shuffle_buffer_size, image_column, shard_files, tars,
                             token)
        self.datasets = {v: split_dataset_by_node(dataset, rank=v, world_size=num_streams) for v in self.streams}
        self.image_column, self.per_stream_batch = image_column, per_stream_batch
        self.settings = DecodeSettings(resolution, channels, center_crop, random_flip, seed, record_ids, token)
        self.num_workers, self.prefetch, self.pin_memory = num_workers, max(1, prefetch), pin_memory
        self.position = {v: (0, 0) for v in self.streams}  # (epoch, examples consumed in the epoch)
        self.skipped = {v: 0 for v in self.streams}  # undecodable rows per stream
        self._undecodable_met = {v: 0 for v in self.streams}  # by this launch's reading (for its warnings)
        self.last_row: Dict[int, str] = {}  # fingerprint of the row before each stream's position
        self.first_row: Dict[int, str] = {}  # ... and of the first row of the position's epoch (where it was read)
        self.seen_ids: List[str] = []  # with record_ids: those of the examples handed out, until written
        self.ids_recorded, self.last_id = 0, None  # ... their count over the run and the last (see record_ids_in)
        self.ids_at_resume: Optional[tuple] = None  # (count, last id) of this process in the checkpoint resumed from
        self._ids_file: Optional[Path] = None
        self.legacy_noise_state = None  # noise generators found in a checkpoint written before 0.2 (see train.py)
        self.checkpoint_datasets_version: Optional[str] = None  # the datasets that read the checkpoint's order
        self.next_epoch_on_resume = next_epoch_on_resume  # (see load_state_dict)
        self._pool: Optional[ProcessPoolExecutor] = None  # the decoding workers (in the reader process)
        self._reader: Optional[ReaderProcess] = None  # with workers
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
        registered states from the main process only (a collective: every process calls this when saving). The
        ids recorded up to this position are written first (see record_ids_in), and their count kept."""
        tar_rows = dict(self.tar_counts.known) if self.tar_counts is not None else {}
        per_stream = {"position": dict(self.position), "skipped_rows": dict(self.skipped),
                      "last_row": dict(self.last_row), "first_row": dict(self.first_row), "tar_rows_known": tar_rows}
        if self.settings.record_ids:  # (per process: a process's record is one file)
            failed = ""
            try:
                self.write_ids(durably=True)
            except OSError as err:  # said by every process once they have met below (the others wait there)
                failed = f"process {self.rank}: {type(err).__name__}: {err}"
            per_stream["ids_recorded"] = {self.rank: (self.ids_recorded, self.last_id)}
            per_stream["ids_failed"] = {self.rank: failed}
        state = all_processes(per_stream)
        failures = [failed for failed in state.pop("ids_failed", {}).values() if failed]
        if failures:
            raise OSError(f"could not write the example ids (--record_example_ids): {'; '.join(failures)}")
        return dict(state,
                    dataset_revision=self.revision, datasets_version=_datasets_version(),
                    seed=self.seed, shuffle_buffer_size=self.shuffle_buffer_size, tar_files=self.tar_signature)

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's positions; refused (:class:`ResumeMismatch`) when it read another number of streams,
        another commit of the dataset, or shuffled with another seed or buffer: its positions would name other rows
        (within the epoch, examples seen twice and others never). With ``next_epoch_on_resume`` the positions are
        not taken: see :meth:`_begin_next_epoch`."""
        if not self.next_epoch_on_resume:
            self._check_same_reading(state)
        self.close()
        if self.next_epoch_on_resume:
            self._begin_next_epoch(state)
        else:
            self.position = {v: tuple(state["position"][v]) for v in self.streams}
            skipped = state["skipped_rows"]
            if isinstance(skipped, int):  # written by 0.1 (one process): one count for all
                skipped = {self.streams[0]: skipped}
            self.skipped = {v: skipped.get(v, 0) for v in self.streams}
            self.last_row = {v: state["last_row"][v] for v in self.streams if v in state.get("last_row", {})}
            self.first_row = {v: state["first_row"][v] for v in self.streams if v in state.get("first_row", {})}
            self.legacy_noise_state = state.get("noise")
            self.checkpoint_datasets_version = state.get("datasets_version")  # (None: a checkpoint before it was kept)
        if self.tar_counts is not None:  # every process's counts
            if state.get("tar_files") == self.tar_signature:
                self.tar_counts = TarRowCounts(state.get("tar_rows_known", {}))
            else:  # other tars, or tars changed since: counted again (meanwhile a resume reads its epoch again)
                self.tar_counts = TarRowCounts()
                if state.get("tar_rows_known"):
                    logger.warning("the tar shards are not those the checkpoint counted the samples of (another "
                                   "name, size or modification time): their samples are counted again")
        recorded = state.get("ids_recorded")  # (a checkpoint of a run that recorded them; by another layout: unusable)
        self.ids_at_resume = tuple(recorded[self.rank]) if recorded and len(recorded) == self.world_size else None
        self.ids_recorded, self.last_id = self.ids_at_resume or (0, None)
        self.seen_ids = []

    def _check_same_reading(self, state: dict) -> None:
        """Refuse (:class:`ResumeMismatch`) a checkpoint whose positions name rows of another reading."""
        anew = "pass --next_epoch_on_resume to go on from the next epoch's start"
        saved_streams = len(state["position"])  # every stream's, the other processes' included
        if saved_streams != self.num_streams:
            raise ResumeMismatch(f"the checkpoint read the data as {_streams(saved_streams)}, this run as "
                                 f"{self.num_streams}: resume with --data_streams {saved_streams} (any number of "
                                 f"processes that divides it) to go on exactly; else {anew} as "
                                 f"{_streams(self.num_streams)} (the model, optimiser, EMA and schedule go on exactly, "
                                 "the rest of the checkpoint's epoch is not seen); or start a new run.")
        saved_revision = state.get("dataset_revision")
        if saved_revision and self.revision and saved_revision != self.revision:
            raise ResumeMismatch(f"the checkpoint read the Hub dataset at commit {saved_revision}, this run opened "
                                 f"{self.revision}: resume with --dataset_revision {saved_revision}, {anew} on the "
                                 "new data, or start a new run on it.")
        for flag, value in (("seed", self.seed), ("shuffle_buffer_size", self.shuffle_buffer_size)):
            if state.get(flag, value) != value:  # (checkpoints before this check: not known)
                raise ResumeMismatch(f"the checkpoint's run shuffled the data with --{flag} {state[flag]}, this run "
                                     f"with {value}: resume with --{flag} {state[flag]}, {anew}, or start a new run.")

    def _begin_next_epoch(self, state: dict) -> None:
        """--next_epoch_on_resume: the checkpoint's positions are left (they may name rows of another number of
        streams, another commit of the dataset, another shuffle), and its noise generators with them (see train.py's
        LoopState): every stream begins the epoch after the furthest one the checkpoint reached, so no example is
        seen twice within it; the rest of the checkpoint's epoch is not seen. The undecodable rows counted go on in
        the first stream's count."""
        epoch = 1 + max(epoch for epoch, _ in state["position"].values())
        self.position = {v: (epoch, 0) for v in self.streams}
        skipped = state["skipped_rows"]
        total = skipped if isinstance(skipped, int) else sum(skipped.values())
        self.skipped = {v: total if v == 0 else 0 for v in self.streams}
        self.last_row, self.first_row = {}, {}
        if self.rank == 0:
            logger.warning("--next_epoch_on_resume: the data begins epoch %d as %s (the checkpoint read %s, at epoch "
                           "%s); the rest of epoch %d is not seen", epoch, _streams(self.num_streams),
                           _streams(len(state["position"])), sorted({e for e, _ in state["position"].values()}),
                           epoch - 1)

    # --- the record of the examples used (--record_example_ids) ----------------------------------------------------
    ID_LINE_BYTES = 41  # a sha1 in hex and its newline
    ID_RECORD = "example_ids_rank{}.txt"  # a process's record, by its rank

    def record_ids_in(self, folder: Path, step: int) -> None:
        """Keep the ids of the examples this process takes in ``folder``/ID_RECORD, one per line, over the whole run:
        written at each checkpoint (with the stream's state) and at the end (``write_ids``); in memory only in between.
        Called at ``step``, after the resume: the lines past the checkpoint's count, of steps trained again from it, are
        dropped (as TensorBoard drops their logs), so the record of a run killed and resumed is that of a run never
        stopped. A record that cannot continue starts again here, said: lines missing, or not ending with the id the
        checkpoint saw last (the record started again after it), or a checkpoint without the count or written by
        another number of processes. The main process removes the records of processes this run does not have."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.ID_RECORD.format(self.rank)
        if self.rank == 0:
            prefix, suffix = self.ID_RECORD.split("{}")
            for other in folder.glob(self.ID_RECORD.format("*")):
                rank = other.name[len(prefix):-len(suffix)]
                if rank.isdigit() and int(rank) >= self.world_size:
                    logger.warning("removing %s: this run has %d processes", other, self.world_size)
                    other.unlink(missing_ok=True)
        kept, last = self.ids_at_resume or (0, None)
        found = b""
        if kept and path.exists():
            with open(path, "rb") as record:
                record.seek((kept - 1) * self.ID_LINE_BYTES)
                found = record.read(self.ID_LINE_BYTES)
        if kept and found != f"{last}\n".encode():
            logger.warning("%s does not hold the %d example ids the checkpoint counted, ending with %s (lost, or "
                           "started again since): the record starts again at step %d", path, kept, last, step)
            kept = 0
        elif step and self.ids_at_resume is None:
            logger.warning("the checkpoint of step %d kept no count of the example ids this process recorded (written "
                           "by an earlier ddpm_hf, without --record_example_ids, or by another number of processes): "
                           "%s starts again at step %d", step, path, step)
        with open(path, "ab") as record:
            record.truncate(kept * self.ID_LINE_BYTES)
        self._ids_file, self.ids_recorded, self.last_id = path, kept, last if kept else None

    def write_ids(self, durably: bool = False) -> None:
        """Append the ids handed out since the last write to the record (``durably``: on the disk, as a checkpoint
        is)."""
        if self._ids_file is None:
            return
        with open(self._ids_file, "a") as record:
            record.write("".join(f"{example}\n" for example in self.seen_ids))
            if durably:
                record.flush()
                os.fsync(record.fileno())
        self.seen_ids.clear()

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
        self.first_row.update(item.first_rows)
        if item.tar_events:
            self.tar_counts.replay(item.tar_events)
        for v, n in item.skipped.items():
            self.skipped[v] += n
        if item.ids:
            self.seen_ids.extend(item.ids)
            self.ids_recorded, self.last_id = self.ids_recorded + len(item.ids), item.ids[-1]
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
            shape = (len(self.streams) * self.per_stream_batch, self.settings.channels, self.settings.resolution,
                     self.settings.resolution)
            slots = max(1, self.prefetch - 2)  # + the queued batch + the one the receiving thread holds
            self._reader = ReaderProcess(functools.partial(self._read_in_reader_process, dict(self.position)),
                                         self.num_workers, shape, slots, self.pin_memory, self._queue, stop)
            return
        out = self._queue = queue.Queue(self.prefetch)
        pin = self.pin_memory

        def deliver(arrays: Optional[list], item) -> None:
            if arrays is not None:
                images = torch.from_numpy(np.stack(arrays))
                item.images = images.pin_memory() if pin else images
            put_unless_stopped(out, item, stop)

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
        self._thread.join()  # a producer waiting on a full queue sees the stop within 0.1 s (put_unless_stopped)
        self._thread = None
        close_abandoned_reads()

    # --- the producer (the reader process, or a thread) -----------------------------------------------------------
    def _read_in_reader_process(self, position: Dict[int, Tuple[int, int]], pool: ProcessPoolExecutor,
                                deliver) -> None:
        """The reader process's work (see ReaderProcess): the rows from ``position`` on, decoded by ``pool``."""
        self._in_reader_process, self._pool = True, pool
        self._produce(position, threading.Event(), deliver)

    def _produce(self, position: Dict[int, Tuple[int, int]], stop: threading.Event, deliver) -> None:
        """Batches assembled from every stream's decoded rows, each handed to ``deliver(arrays, Batch without its
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
                arrays, ids, skipped, last_rows, first_rows = [], [], {}, {}, {}
                for v in self.streams:
                    taken, stream_ids, skipped[v], position[v], last_rows[v], first = self._take(v, decoded[v])
                    arrays += taken
                    ids += stream_ids
                    if first is not None:
                        first_rows[v] = first
                deliver(arrays, Batch(None, dict(position), skipped, ids, last_rows, first_rows,
                                       counts.drain() if counts is not None else None))
        except BaseException as err:  # handed to the training loop, which raises it
            deliver(None, err)
        finally:
            for generator in decoded.values():
                generator.close()

    def _rows(self, v: int, epoch: int, consumed: int,
              counts: Optional[TarRowCounts]) -> Iterator[Tuple[int, int, dict]]:
        """(epoch, row, row's cells) of stream ``v`` from ``consumed`` on, epoch after epoch (``counts``: a
        WebDataset's, as this reader knows them). A read that fails (the network, a 5xx that datasets' own retries
        gave up on) re-opens the epoch and continues at the same row, up to READ_RETRIES times in a row with a
        doubling pause; then the run stops, its checkpoints intact."""
        failures, expected, first = 0, self.last_row.get(v), self.first_row.get(v)
        while True:
            row = None
            try:
                for index, row in self._epoch_rows(v, epoch, consumed, expected, counts, first,
                                                   retried=failures > 0):
                    yield epoch, index, row
                    consumed, failures = index + 1, 0
            except ResumeMismatch:  # the order is not the checkpoint's: reading again would not mend it
                raise
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
            epoch, consumed, expected, first = epoch + 1, 0, None, None

    def _epoch_rows(self, v: int, epoch: int, start: int, expected: Optional[str], counts: Optional[TarRowCounts],
                    first: Optional[str] = None, retried: bool = False) -> Iterator[Tuple[int, dict]]:
        """(row, cells) of stream ``v``'s epoch from row ``start`` on: replayed without reading the shards already
        finished where that is possible (see Replay.rows_from), else read from the epoch's start, the first ``start``
        rows skipped undecoded and the last of them compared with ``expected`` (the fingerprint kept with the
        position; None: not known), the epoch's first row with ``first`` (so that another order stops the resume at
        once, not after hours of reading again). Where either differs, or the epoch now ends before the position,
        the order is not the one the position counted in, and the stream stops (:class:`ResumeMismatch`): going on
        would see some of the epoch's examples twice, others never. ``retried``: the reading goes on after a failed
        read, not after a resume (said so)."""
        if start:
            replayed = self.replay.rows_from(v, epoch, start, expected, counts)
            if replayed is not None:
                return replayed
        ds = self.datasets[v]
        ds.set_epoch(epoch)
        rows, index = enumerate(ds), -1
        if start:  # to the position, undecoded
            for index, row in rows:
                if index == 0 and first is not None and not is_row(row[self.image_column], first):
                    raise ResumeMismatch(self._other_order(v, epoch, start, retried, first_row=True))
                if index == start - 1:
                    if expected is not None and not is_row(row[self.image_column], expected):
                        raise ResumeMismatch(self._other_order(v, epoch, start, retried))
                    break
            else:  # a position no reading of this epoch reaches
                if expected is not None:
                    raise ResumeMismatch(self._other_order(v, epoch, start, retried, rows_now=index + 1))
                logger.warning("stream %d: epoch %d has %d rows, the checkpoint's position is row %d (it kept no "
                               "fingerprint to tell why): going on from the next epoch", v, epoch, index + 1, start)
        return rows

    def _other_order(self, v: int, epoch: int, start: int, retried: bool, rows_now: Optional[int] = None,
                     first_row: bool = False) -> str:
        """What a reading again whose row before the position (or, ``first_row``, whose first row) is another row
        than the one seen there met (or an epoch that ends before the position: ``rows_now`` rows), and the ways
        on."""
        seen = "read there before" if retried else "the checkpoint saw"
        found = (f"epoch {epoch} now has {rows_now} rows" if rows_now is not None else
                 f"the epoch's first row is not the one {seen}" if first_row else
                 f"the row before it is not the one {seen}")
        if retried:  # a failed read, then the epoch read again during the run
            return (f"stream {v}, after a failed read: the position is epoch {epoch}, row {start}, and {found}: the "
                    "data changed while the run read it. Put it back as it was and resume with "
                    "--resume_from_checkpoint latest, or pass --next_epoch_on_resume as well to go on from the next "
                    "epoch's start on the data as it is.")
        saved, now = self.checkpoint_datasets_version, _datasets_version()
        why, exactly = (f"the checkpoint's order was datasets {saved}'s and this is datasets {now}, which may shuffle "
                        "otherwise (or the data changed since)", f"install datasets=={saved} to go on exactly") \
            if saved and saved != now else ("the data changed since the checkpoint (other files, or other rows in "
                                            "them), or the datasets release that read it shuffles otherwise",
                                            "put the data (and datasets release) back as they were to go on exactly")
        return (f"stream {v}: the checkpoint's position is epoch {epoch}, row {start}, and {found}: {why}. Going on "
                f"would see some of this epoch's examples twice and others never: {exactly}, pass "
                "--next_epoch_on_resume to go on from the next epoch's start (the model, optimiser, EMA and schedule "
                "exactly; the rest of this epoch unseen), or start a new run.")

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

    def _take(self, v: int, decoded: Iterator) -> Tuple[list, list, int, Tuple[int, int], str, Optional[str]]:
        """The next ``per_stream_batch`` decodable examples of stream ``v``, their ids, the rows skipped, the
        stream's position after them, the fingerprint of the row before that position and, where these rows began
        the position's epoch, that of its first row (else None)."""
        taken, ids, skipped, first_failure, failures, first = [], [], 0, None, 0, None
        while len(taken) < self.per_stream_batch:
            epoch, index, (array, detail), cell = next(decoded)
            position = (epoch, index + 1)
            if index == 0:
                first = row_fingerprint(cell)
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
        return taken, ids, skipped, position, row_fingerprint(cell), first

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


def _datasets_version() -> str:
    import datasets

    return datasets.__version__
