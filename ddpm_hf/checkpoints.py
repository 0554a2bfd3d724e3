"""What a training run writes, so that it survives a kill or a full disk at any moment: accelerate checkpoints in
hidden folders published by a rename, pruned to a limit and resumed from the newest readable one; the final pipeline
in --output_dir itself, published by writing model_index.json last; sample grids renamed into place.

Hidden leftovers: ".X.tmp" (half written), ".X.trash" (half deleted), ".checkpoint-N.old" (the previous checkpoint,
moved aside for the instant of a swap), ".pipeline.ready" and ".pipeline.moving" (a complete final pipeline on its
way into place), ".pipeline.old" (the pipeline/ folder of ddpm_hf < 0.2, moved aside for a swap);
``recover_folders`` finishes what a crash interrupted. A write that fails (full disk, file-size limit) removes what it
had written and stops the run with the path, the free space and the checkpoint to resume from. ".shared-<token>" is
the instant's file by which every process shows it sees the main process's --output_dir (``check_output_dir_shared``;
one that a kill left in the folder above a not yet created --output_dir stays there).
"""

import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Union

import torch

from .errors import ResumeMismatch, is_out_of_memory
from .processes import stop_all

logger = logging.getLogger(__name__)


def checkpoint_step(path: Path) -> Optional[int]:
    """N of a checkpoint-N folder's name; None for another name."""
    number = path.name[len("checkpoint-"):] if path.name.startswith("checkpoint-") else ""
    return int(number) if number.isdigit() else None


def checkpoints(output_dir: Path) -> List[Path]:
    """The visible checkpoint-N folders, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


_PUBLISHING: List[threading.Thread] = []  # the checkpoint this process publishes in the background (CheckpointSaver)


def _publishing_done() -> None:
    """Wait for the checkpoint being published in the background, unless this is the thread publishing it."""
    for thread in list(_PUBLISHING):
        if thread is not threading.current_thread():
            thread.join()
            _PUBLISHING.remove(thread)


def published_checkpoints(output_dir: Path) -> List[Path]:
    """checkpoints(output_dir) once the one being published in the background (by another thread) is in place: the
    checkpoints a stopped run's message names to resume from."""
    _publishing_done()
    return checkpoints(output_dir)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_bytes(folder: Path) -> int:
    """The size of the files in ``folder``."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, so that the rename that publishes it cannot outlive its contents."""
    for path in sorted(folder.rglob("*")) + [folder]:
        fsync_path(path)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish_folder(tmp: Path, final: Path) -> None:
    """Make the complete folder ``tmp`` visible as ``final``, replacing any previous version."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def delete_folder(folder: Path) -> None:
    """Delete ``folder`` so that it is never seen half deleted."""
    trash = folder.with_name(f".{folder.name}.trash")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def recover_folders(output_dir: Path) -> None:
    """Finish what a crash interrupted: drop half-written and half-deleted folders, restore a swapped-out one, finish
    moving a complete final pipeline into place."""
    install_pipeline(output_dir)
    for marker in output_dir.glob(".shared-*"):  # check_output_dir_shared's, of a run killed in the instant
        if SHARED_MARKER.fullmatch(marker.name) and marker.is_file():  # (not a folder or file of the user's)
            marker.unlink()
    for hidden in [*output_dir.glob(".checkpoint-*.*"), *output_dir.glob(".pipeline.*")]:
        name, _, kind = hidden.name[1:].rpartition(".")
        if kind == "old" and not (output_dir / name).exists():
            os.replace(hidden, output_dir / name)
        elif kind in ("tmp", "trash", "old"):
            shutil.rmtree(hidden, ignore_errors=True)


SHARED_MARKER = re.compile(r"\.shared-[0-9a-f]{16}")


def check_output_dir_shared(accelerator, output_dir: Path, wait_s: float = 5.0) -> None:
    """Stop the run unless every process sees the main process's ``output_dir``: every process writes into a
    checkpoint that the main one publishes, and a resume loads it on every process. Machines that each have their
    own folder under that name would resume some processes and start the others afresh, which then wait for each
    other in mismatched collectives instead of stopping. The main process writes a file of a random name into the
    folder (or, before the run creates it, into its nearest existing parent); each process looks for it where its
    own ``output_dir`` resolves (for up to ``wait_s``: a network filesystem may show a new file late). Every process
    reaches both collectives whatever fails, and all stop together."""
    from accelerate.utils import broadcast_object_list, gather_object

    if accelerator.num_processes == 1:
        return
    chain = (output_dir.absolute(), *output_dir.absolute().parents)
    message = [None, None, None]  # the marker's name, its folder's place in chain, or why it could not be written
    if accelerator.is_main_process:
        try:
            levels = next(k for k, folder in enumerate(chain) if folder.is_dir())
            name = f".shared-{secrets.token_hex(8)}"
            (chain[levels] / name).write_text(socket.gethostname())
            message[:2] = name, levels
        except OSError as err:
            message[2] = f"cannot write in --output_dir {output_dir} or the folder above it: {err}"
    broadcast_object_list(message)  # from the main process, once it has written the file
    if message[2] is not None:
        raise stop_all(message[2])
    marker = chain[message[1]] / message[0]

    def seen() -> object:  # True, False, or why the folder cannot be looked into
        try:
            return marker.is_file()
        except OSError as err:
            return f"{type(err).__name__}: {err}"

    deadline = time.monotonic() + wait_s
    while seen() is False and time.monotonic() < deadline:
        time.sleep(0.1)
    found = gather_object([(accelerator.process_index, socket.gethostname(), seen())])
    if accelerator.is_main_process:
        try:
            marker.unlink(missing_ok=True)
        except OSError:  # (the next start's recover_folders removes it)
            pass
    blind = [(index, host, what) for index, host, what in found if what is not True]
    if blind:
        raise stop_all(
            f"--output_dir {output_dir} is not one folder for every process: process(es) "
            + ", ".join(f"{i} (on {host}{': ' + what if isinstance(what, str) else ''})" for i, host, what in blind)
            + f" do not see the file the main process (on {found[0][1]}) wrote in {chain[message[1]]}. Checkpoints are "
            "written by every process and resumed on every process: on several machines pass an --output_dir on a "
            "filesystem they all mount (NFS, a cluster filesystem).")


class CheckpointSaver:
    """A run's checkpoints: ``save(step)`` writes accelerate's state into a hidden folder on every process, then the
    main process publishes it in a thread of its own while training goes on (the checkpoint's pipeline written, every
    file flushed to disk, the folder renamed into place, the oldest pruned to ``limit``): the flush, the slowest part
    on a network filesystem, no longer holds up the GPUs (bench/checkpoint.py: the loop held 0.27 s instead of 0.66 s
    for a ``ddpm-cifar10`` checkpoint here).
    A kill or a full disk while saving leaves the previous checkpoint intact; a failed write stops the run with the
    reason (at the next step, for the publishing thread's) and the half-written folder removed. The next checkpoint,
    an upload or the final pipeline first waits for the publishing (``wait``): each is written after the checkpoint
    of its step, which a resume then finds."""

    def __init__(self, accelerator, output_dir: Path, limit: int):
        self.accelerator, self.output_dir, self.limit = accelerator, output_dir, limit
        self._failure: Optional[SystemExit] = None

    def save(self, step: int, pipeline: Optional[Callable] = None) -> None:
        """Checkpoint ``step``; ``pipeline()`` (the main process's, when given; None: none) is saved in it as
        ``pipeline/``: a folder that diffusers and ``ddpm-hf sample``/``evaluate`` load, as diffusers' example saves
        its checkpoints' U-Nets. Every process calls it."""
        accelerator = self.accelerator
        tmp, final = self.output_dir / f".checkpoint-{step}.tmp", self.output_dir / f"checkpoint-{step}"
        if accelerator.is_main_process:
            self.wait()
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            made = pipeline() if accelerator.is_main_process and pipeline is not None else None
            accelerator.wait_for_everyone()  # every process's files are in tmp
        except Exception as err:  # ENOSPC, EFBIG, EDQUOT, EIO surface as OSError, RuntimeError or SafetensorError
            raise write_failed(self.output_dir, str(final), err, partial=tmp) from err
        if accelerator.is_main_process:
            publishing = threading.Thread(target=self._publish, args=(tmp, final, made),
                                          name=f"publish checkpoint-{step}")
            _PUBLISHING.append(publishing)
            publishing.start()

    def _publish(self, tmp: Path, final: Path, made) -> None:
        try:
            if made is not None:  # (None: it could not be made, as a warning said)
                made.save_pretrained(tmp / "pipeline")
            fsync_tree(tmp)
            publish_folder(tmp, final)
        except Exception as err:  # noqa: BLE001 (as in save: the run stops at its next step, naming the reason)
            self._failure = write_failed(self.output_dir, str(final), err, partial=tmp)
            self._failure.__cause__ = err
            logger.error("%s", self._failure.code)
            return
        try:
            for old in checkpoints(self.output_dir)[:-self.limit] if self.limit else []:
                delete_folder(old)
                logger.info("removed %s (--checkpoints_total_limit %d)", old.name, self.limit)
        except OSError as err:  # the new checkpoint is in place: an old one left is no reason to stop
            logger.warning("could not remove an old checkpoint (%s); --checkpoints_total_limit %d is exceeded until "
                           "the next checkpoint removes it", err, self.limit)

    def raise_if_failed(self) -> None:
        """Stop the run if publishing a checkpoint failed (cheap: called after every step; the main process publishes,
        the others return at once)."""
        if self.accelerator.is_main_process and self._failure is not None:
            raise self._failure

    def wait(self) -> None:
        """Wait for the checkpoint being published, then raise_if_failed (the others return at once)."""
        if self.accelerator.is_main_process:
            _publishing_done()
            self.raise_if_failed()


def from_diffusers_example(checkpoint: Path) -> bool:
    """A checkpoint-N folder of diffusers' train_unconditional.py (its U-Net in unet/, and unet_ema/), which holds
    no accelerate state of this script's (model.safetensors, the optimizer's, the data's)."""
    return (checkpoint / "unet" / "config.json").is_file() and not any(checkpoint.glob("model*.safetensors")) \
        and not any(checkpoint.glob("pytorch_model*.bin"))


def diffusers_example_message(output_dir: Path, found: List[Path]) -> str:
    names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
    return (f"--output_dir {output_dir} holds checkpoints of diffusers' train_unconditional.py ({names}: unet/, "
            "unet_ema/), not of this script: they hold no optimizer, EMA or data state it could resume (they are "
            "intact; their U-Net loads with ddpm_hf.DDPMUNet.from_pretrained('checkpoint-N/unet')). Start this "
            "script's run in another --output_dir")


def in_run(output_dir: Path, checkpoint: Union[str, Path]) -> bool:
    """Whether ``checkpoint`` is a checkpoint of the run in ``output_dir`` (its folder is there)."""
    return Path(checkpoint).resolve().parent == output_dir.resolve()


def starts_a_new_run(output_dir: Path, resume: Optional[str], overwrite: bool) -> bool:
    """Whether a run with --resume_from_checkpoint ``resume`` is a new one in ``output_dir`` (from scratch, or from
    another run's checkpoint: its checkpoints were written beside the ones there), not the continuation of its run
    ('latest' where it has a checkpoint, or one of its own). A new run is checked by :func:`refuse_an_earlier_run`."""
    continues = bool(checkpoints(output_dir)) if resume == "latest" else bool(resume) and in_run(output_dir, resume)
    if not continues:
        refuse_an_earlier_run(output_dir, overwrite)
    return not continues


def set_aside_later_checkpoints(output_dir: Path, resumed: Path, step: int) -> Optional[Path]:
    """A run resumed from a checkpoint of its own at ``step``, before its newest (to train again from there, or
    past an unreadable newest one), trains the later checkpoints' steps again: they are moved into
    ``abandoned-after-checkpoint-N/``, out of the way of 'latest' (which would go back to them), of
    --checkpoints_total_limit's pruning (by step: it removed this run's own first) and of this run's checkpoints of
    the same names. Returns that folder, or None."""
    if not in_run(output_dir, resumed):  # another run's checkpoint: a new run, checked as one
        return None
    later = [path for path in checkpoints(output_dir) if checkpoint_step(path) > step]
    if not later:
        return None
    aside = output_dir / f"abandoned-after-checkpoint-{step}"
    for number in range(2, 10**6):  # a second return to the same step keeps the first one's
        if not aside.exists():
            break
        aside = output_dir / f"abandoned-after-checkpoint-{step}-{number}"
    aside.mkdir()
    for path in later:
        os.replace(path, aside / path.name)
    pipeline = (" The pipeline in --output_dir is theirs until this run ends." if (output_dir / "model_index.json")
                .is_file() else "")
    logger.warning("resumed at step %d, before the run's later %s: moved into %s (this run trains %s steps again; "
                   "delete the folder when you no longer need it).%s", step, ", ".join(p.name for p in later), aside,
                   "that checkpoint's" if len(later) == 1 else "their", pipeline)
    return aside


def abandoned_checkpoints(output_dir: Path) -> List[Path]:
    """The folders :func:`set_aside_later_checkpoints` made in ``output_dir``: an earlier run's too."""
    return sorted(path for path in output_dir.glob("abandoned-after-checkpoint-*") if path.is_dir())


def refuse_an_earlier_run(output_dir: Path, overwrite: bool) -> None:
    """A new run does not go beside an earlier run's checkpoints or over its final pipeline: the next 'latest' would
    resume the earlier run, the checkpoint limit would prune the new run's first, and the pipeline would be replaced
    (a finished run's, whose checkpoints were removed to save room). Raises a ValueError naming the choices, unless
    ``overwrite`` (then :func:`clear_earlier_run` removes that run)."""
    listed = checkpoints(output_dir)
    found = [p.name for p in listed + abandoned_checkpoints(output_dir)]
    foreign = [p for p in listed if from_diffusers_example(p)]
    if foreign and not overwrite:
        raise ValueError(diffusers_example_message(output_dir, foreign) + " (--overwrite_output_dir would remove "
                         "them).")
    if found and not overwrite:
        raise ValueError(f"--output_dir {output_dir} holds the checkpoints of an earlier run ({', '.join(found[:3])}"
                         f"{', ...' if len(found) > 3 else ''}): continue it with --resume_from_checkpoint latest, "
                         "start a new run in another --output_dir, or start one there with --overwrite_output_dir "
                         "(which removes that run's checkpoints, pipeline, samples and logs)")
    if (output_dir / "model_index.json").is_file() and not overwrite:
        raise ValueError(f"--output_dir {output_dir} holds a pipeline (model_index.json) and no checkpoint to resume: "
                         "a new run there would replace it. Start the new run in another --output_dir, or there with "
                         "--overwrite_output_dir (which removes that pipeline, and an earlier run's samples and logs)")


def clear_earlier_run(output_dir: Path, logging_dir: Path) -> None:
    """Remove what an earlier run wrote in ``output_dir`` (--overwrite_output_dir): its checkpoints, its final
    pipeline, and where a run of this script was there (its run_info.json) samples/ and its logs (``logging_dir``,
    when inside ``output_dir``: TensorBoard would show two runs' steps as one). Other files stay, and a folder no run
    wrote in keeps its samples/ and logs/ (they were removed whatever they held)."""
    from ddpm_hf.pipelines.pipeline_ddpm_hf import PIPELINE_FILE

    earlier = checkpoints(output_dir) + abandoned_checkpoints(output_dir)
    removed = [old.name for old in earlier]
    for old in earlier:
        delete_folder(old)
    if (output_dir / "model_index.json").exists():
        removed.append("the pipeline")
    (output_dir / "model_index.json").unlink(missing_ok=True)  # first: nothing loads a half-removed pipeline
    for name in ("unet", "scheduler", PIPELINE_FILE, "training_config.json"):
        remove(output_dir / name)
    if (output_dir / "run_info.json").is_file():  # an earlier run's samples and logs, not a user's own folders
        removed += [name for name in ("samples", logging_dir.name) if (output_dir / name).exists()]
        remove(output_dir / "samples")
        if logging_dir.resolve().is_relative_to(output_dir.resolve()) and logging_dir.resolve() != output_dir.resolve():
            remove(logging_dir)
        remove(output_dir / "run_info.json")
    if removed:
        logger.info("--overwrite_output_dir: removed the earlier run's %s from %s", ", ".join(removed), output_dir)


def write_failed(output_dir: Path, what: str, err: Exception, partial: Path) -> SystemExit:
    """The error that stops a run whose write of ``what`` (a path) failed, once the ``partial`` copy is removed: the
    path, the likely reason with the space left, and the checkpoint to resume from."""
    remove(partial)
    latest = published_checkpoints(output_dir)
    then = (f"The checkpoint {latest[-1].name} is intact: make room, then resume with --resume_from_checkpoint "
            "latest." if latest else "There is no checkpoint to resume from.")
    return SystemExit(f"could not write {what} ({type(err).__name__}: {err}): "
                      f"{write_failure_reason(output_dir, err, latest)}. {then}")


def write_failure_reason(output_dir: Path, err: Exception, latest: List[Path]) -> str:
    """Why a write most likely failed; torch.save reports a short write without the OS error behind it, so a disk
    with less room than the last checkpoint took counts as full too."""
    import resource

    if is_out_of_memory(err):
        return "the process ran out of memory writing it"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"this process may not write files over {limit} bytes (ulimit -f)"
    free = shutil.disk_usage(output_dir).free
    needed = folder_bytes(latest[-1]) if latest else 0
    full = free < needed or _no_space_left(err)
    return (f"{'the disk is full' if full else 'the disk may be full or failing'} ({size_text(free)} free in "
            f"{output_dir}" + (f"; a checkpoint takes {size_text(needed)})" if needed else ")"))


def _no_space_left(err: Optional[BaseException]) -> bool:
    while err is not None:
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def size_text(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024


def publish_file(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(hidden_path)``, then the rename to ``path``: never a truncated file under the final name, and a
    failed write's partial file removed."""
    try:
        write(partial_path(path))
        os.replace(partial_path(path), path)
    except BaseException:
        partial_path(path).unlink(missing_ok=True)
        raise
    return path


def partial_path(path: Path) -> Path:
    """Where :func:`publish_file` writes ``path`` before its rename."""
    return path.with_name(f".{path.name}.tmp")


def write_file(path: Path, write: Callable[[Path], None], output_dir: Path) -> Path:
    """A file of a training run, published whole (:func:`publish_file`); a failed write removes the partial file
    and stops the run (see write_failed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return publish_file(path, write)
    except OSError as err:
        raise write_failed(output_dir, str(path), err, partial_path(path)) from err


# What torch and accelerate say when a readable checkpoint holds another network's weights or another count of states
OTHER_SETTINGS = re.compile(r"size mismatch for|Missing key\(s\) in state_dict|Unexpected key\(s\) in state_dict|"
                            r"Number of custom checkpoints")


def resume(accelerator, output_dir: Path, requested: str) -> Optional[Path]:
    """Load the requested checkpoint, or with 'latest' the newest one that every process can read (an unreadable one
    is reported and skipped). Returns the folder loaded, None when there is none."""
    from accelerate.utils import broadcast_object_list

    if requested != "latest":
        candidates = [Path(requested)]
    else:  # the main process's list, on every process: each tries the same folders, and meets the others' reduce
        candidates = broadcast_object_list([list(reversed(checkpoints(output_dir)))])[0]
        if not candidates:
            logger.info("no checkpoint in %s: starting from scratch", output_dir)
            return None
    # diffusers' example's checkpoints, here or asked for, as the main process sees them (every process meets the
    # same answer): none is resumed, and beside this run's own they would count in --checkpoints_total_limit's
    # pruning, which would remove this run's newest
    foreign = broadcast_object_list([[path for path in dict.fromkeys(checkpoints(output_dir) + candidates)
                                      if from_diffusers_example(path)]])[0]
    if foreign:
        raise SystemExit(diffusers_example_message(foreign[0].parent, foreign) + ", without "
                         "--resume_from_checkpoint, or move them out of it.")
    for path in candidates:
        try:
            accelerator.load_state(str(path))
            failed, out_of_memory, mismatch, reason = 0.0, 0.0, 0.0, ""
        except ResumeMismatch as err:  # readable, but written for other settings
            failed, out_of_memory, mismatch, reason = 1.0, 0.0, 1.0, str(err)
        except Exception as err:  # truncated or corrupt file, or another network's: the processes must agree first
            said = [line.strip() for line in str(err).splitlines() if OTHER_SETTINGS.search(line)]
            other_settings = isinstance(err, RuntimeError) and bool(said)
            failed, out_of_memory, mismatch = 1.0, float(is_out_of_memory(err)), float(other_settings)
            reason = (f"it was written by a run with other settings ({said[0][:200]}): resume with "
                      "the flags that run had (--preset or --model_config, --variance_type, --use_ema, ...), or start "
                      "a new run in another --output_dir" if other_settings else f"{type(err).__name__}: {err}")
        failures, out_of_memory, mismatch = accelerator.reduce(
            torch.tensor([failed, out_of_memory, mismatch], device=accelerator.device), "sum").tolist()
        if failures == 0:
            return path
        if mismatch:  # an older checkpoint of the same run would be refused alike
            raise SystemExit(f"cannot resume from {path}: {reason or 'its settings differ on another process'}")
        if out_of_memory:  # not the file's fault: an older checkpoint would only lose steps
            where = reason.splitlines()[0] if reason else "on another process"
            raise SystemExit(f"out of memory loading {path} ({where}); the checkpoint is not at fault: free the memory "
                             "other programs hold, then resume again.")
        if requested != "latest":
            raise SystemExit(f"--resume_from_checkpoint {path} is unreadable ({reason or 'on another process'}); "
                             "pass an older checkpoint-N folder or 'latest'.")
        logger.warning("checkpoint %s is unreadable (%s): trying the previous one", path, reason or "on another process")
    raise SystemExit(f"no checkpoint in {output_dir} could be loaded (see the warnings above). Files that are cut "
                     "short or corrupt may be removed; if the run's flags changed since they were written, resume "
                     "with the original ones instead. Or start without --resume_from_checkpoint.")



def save_pipeline(pipe, output_dir: Path, training_config: dict) -> None:
    """The final pipeline and the run's training_config.json into ``output_dir`` itself, as diffusers'
    train_unconditional.py lays it out: ``DiffusionPipeline.from_pretrained(output_dir)`` loads it. Written whole
    under a hidden name and flushed first, then moved into place with model_index.json last (see install_pipeline):
    a kill leaves the previous pipeline, the new one, or a folder without model_index.json that nothing loads and
    that the next start completes."""
    tmp, ready = output_dir / ".pipeline.tmp", output_dir / ".pipeline.ready"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp)
        (tmp / "training_config.json").write_text(json.dumps(training_config, indent=2, default=str))
        fsync_tree(tmp)
    except Exception as err:  # a full disk: OSError, or SafetensorError from the weights
        raise write_failed(output_dir, f"the final pipeline into {output_dir}", err, partial=tmp) from err
    shutil.rmtree(ready, ignore_errors=True)
    os.replace(tmp, ready)
    install_pipeline(output_dir)


def install_pipeline(output_dir: Path) -> None:
    """Move the complete pipeline of ``.pipeline.ready`` into ``output_dir`` by renames: the previous pipeline's
    model_index.json goes first (from then on nothing loads a half-replaced pipeline), then its parts, then (as
    ``.pipeline.moving``) the new parts come in, model_index.json last. Each step can be redone, so after a kill the
    next call finishes the job; without a pipeline on its way it does nothing."""
    ready, moving = output_dir / ".pipeline.ready", output_dir / ".pipeline.moving"
    if ready.is_dir():
        from ddpm_hf.pipelines.pipeline_ddpm_hf import PIPELINE_FILE

        # what a final pipeline may hold in --output_dir besides model_index.json (diffusers' train_unconditional.py
        # layout: the pipeline beside checkpoint-N/, logs/ and samples/); a part the new one lacks goes with the old
        parts = ("unet", "scheduler", PIPELINE_FILE, "training_config.json")
        (output_dir / "model_index.json").unlink(missing_ok=True)
        for name in sorted({*parts, *(p.name for p in ready.iterdir())} - {"model_index.json"}):
            remove(output_dir / name)
        os.replace(ready, moving)
    if not moving.is_dir():
        return
    for part in sorted(moving.iterdir()):
        if part.name != "model_index.json":
            os.replace(part, output_dir / part.name)
    if (moving / "model_index.json").exists():
        fsync_path(output_dir)  # the parts' renames reach the disk before the one that publishes them
        os.replace(moving / "model_index.json", output_dir / "model_index.json")
        fsync_path(output_dir)
    moving.rmdir()
    if (output_dir / "pipeline" / "model_index.json").is_file():
        logger.info("the final pipeline is now %s itself: removing %s, the layout of ddpm_hf < 0.2", output_dir,
                    output_dir / "pipeline")
        delete_folder(output_dir / "pipeline")

