"""The reader process and its decoding workers: batches assembled off the training process, handed over through a
shared ring, ended with the process that started them."""

import gc
import multiprocessing
import os
import queue
import select
import signal
import threading
import time
import weakref
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..processes import die_with_parent, usable_cores


def _init_data_worker(parent: int, reader_end) -> None:
    """Data workers die with their parent, pid ``parent`` (even on SIGKILL), and leave Ctrl-C to the training
    process. They close the reader's end of its pipe, inherited at the fork: the training process must see that end
    close when the reader dies."""
    reader_end.close()
    _die_with_parent(parent)
    torch.set_num_threads(1)


@dataclass
class Batch:
    images: Optional[torch.Tensor]  # uint8 (N, C, H, W); None while it travels from the reader process
    position: Dict[int, Tuple[int, int]]  # every stream's position after this batch
    skipped: Dict[int, int]  # undecodable rows per stream in this batch
    ids: List[str]
    last_rows: Dict[int, str]  # fingerprint of each stream's last row in this batch
    first_rows: Dict[int, str]  # ... and of the first row of an epoch these rows began (streams that began one)
    tar_events: Optional[list] = None  # a WebDataset's TarRowCounts events since the last batch (see its replay)


def put_unless_stopped(out: "queue.Queue", item, stop: threading.Event) -> None:
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


class ReaderProcess:
    """A TrainStream's reading in a process of its own (forked), with its decoding workers as children.

    The batches come back through ``slots`` slots of shared memory (a stream's ``prefetch − 2``, at least one;
    anonymous, so /dev/shm's size in a container does not bound them; with the batch queued and the one waiting to be,
    ``max(prefetch, 3)`` ahead in all): the reader writes a batch into a free slot and sends what goes with it
    (positions, skip counts, ids) on a pipe; a thread of the training process (``_forward``) copies the images out as
    they come, into pinned memory where asked, sends the slot back and puts the batch in the stream's queue. The
    training loop's thread then only takes a batch from a queue: receiving one itself (two messages, a fresh buffer's
    page faults, the copy) took it 0.4 ms per batch of 128 32² images here and 2.6 ms at 256² (bench/data.py), where a
    CUDA-graph step of the CIFAR-10 model takes 27 ms on an H100. An error that ends the stream comes back on the pipe,
    after the batches made before it, and is put in the queue after them (``receive`` raises it); so is a reader's death
    (killed for memory, a crash in a native library), named as such. The reader dies with the thread that started it
    (Linux's parent-death signal follows the forking thread: train.py's main thread), and its workers with it."""

    def __init__(self, work: Callable[[ProcessPoolExecutor, Callable], None], num_workers: int,
                 shape: Tuple[int, ...], slots: int, pin_memory: bool, out: "queue.Queue", stop: threading.Event):
        """``work(pool, deliver)`` runs in the reader process: it reads the rows, has ``pool`` (``num_workers``
        decoding workers) decode them, and hands each batch, ``shape`` uint8 arrays and a Batch without its images,
        to ``deliver(arrays, batch)``, and its final error to ``deliver(None, error)``. ``slots`` batches wait in the
        ring; the training process's copies are pinned (``pin_memory``) and put in ``out``."""
        import mmap
        import multiprocessing.util

        self.pin_memory = pin_memory
        self.ring = np.frombuffer(mmap.mmap(-1, slots * int(np.prod(shape))), dtype=np.uint8).reshape(slots, *shape)
        self.conn, child_end = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("fork").Process(
            target=self._run, args=(work, num_workers, child_end, os.getpid()), name="ddpm_hf-reader")
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

    def _run(self, work: Callable, num_workers: int, conn, parent: int) -> None:
        """The reader process: its workers started first (forked while it has one thread), then the work: the
        stream's rows read and decoded into the ring, slot after free slot. Whatever ends it is sent to the training
        process."""
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
            pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("fork"),
                                       initializer=_init_data_worker, initargs=(os.getpid(), conn))
            list(pool.map(int, range(num_workers)))  # all started now
            work(pool, deliver)  # returns after delivering an error
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
    def _forward(reader: "weakref.ref[ReaderProcess]", out: "queue.Queue", stop: threading.Event) -> None:
        """The receiving thread: every batch the reader sends, then the error that ends the stream, put in ``out``
        until ``stop`` is set."""
        while not stop.is_set() and (receiving := reader()) is not None:
            try:
                item = receiving.receive()
            except BaseException as err:  # raised by next_batch, after the batches before it
                put_unless_stopped(out, err, stop)
                return
            finally:
                receiving = None
            put_unless_stopped(out, item, stop)

    def receive(self) -> "Batch":
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
        could rebuild), else a RuntimeError with its summary; with the reader's traceback as a note."""
        import pickle

        try:
            error = pickle.loads(pickled) if pickled is not None else RuntimeError(summary)
        except Exception:  # noqa: BLE001
            error = RuntimeError(summary)
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
    return max(0, min(8, usable_cores() // max(1, local_processes) - 1))
