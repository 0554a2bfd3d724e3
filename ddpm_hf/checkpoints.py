"""Training checkpoints that survive a kill at any moment: accelerate state written into hidden folders and published
by a rename, pruned to a limit, and resumed from the newest readable one.

Folders are written under a hidden name and renamed into place, so a crash at any moment leaves every visible folder
complete. Hidden leftovers: ".X.tmp" (half written), ".X.trash" (half deleted), ".X.old" (the previous X, moved aside
for the instant of a swap); ``recover_folders`` finishes what a crash interrupted.
"""

import logging
import os
import shutil
from pathlib import Path
from typing import List, Optional

import torch

logger = logging.getLogger(__name__)


def checkpoints(output_dir: Path) -> List[Path]:
    """The visible checkpoint-N folders, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, so that the rename that publishes it cannot outlive its contents."""
    for path in sorted(folder.rglob("*")) + [folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    """Finish what a crash interrupted: drop half-written and half-deleted folders, restore a swapped-out one."""
    for hidden in [*output_dir.glob(".checkpoint-*.*"), *output_dir.glob(".pipeline.*")]:
        name, _, kind = hidden.name[1:].rpartition(".")
        if kind == "old" and not (output_dir / name).exists():
            os.replace(hidden, output_dir / name)
        elif kind in ("tmp", "trash", "old"):
            shutil.rmtree(hidden, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int):
    """accelerate.save_state into a hidden folder, published when every process has written and the files are on
    disk: a kill or a full disk while saving leaves the previous checkpoint intact. A failed write stops the run with
    the reason; the half-written folder is removed."""
    tmp, final = output_dir / f".checkpoint-{step}.tmp", output_dir / f"checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            fsync_tree(tmp)
    except Exception as err:  # ENOSPC, EFBIG, EDQUOT, EIO surface as OSError, RuntimeError or SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoints(output_dir)
        raise SystemExit(
            f"could not write checkpoint-{step} in {output_dir} ({type(err).__name__}: {err}): "
            f"{write_failure_reason(output_dir, previous)}. "
            + (f"The previous checkpoint {previous[-1].name} is intact: make room, then resume with "
               "--resume_from_checkpoint latest." if previous else "No earlier checkpoint exists.")) from err
    if accelerator.is_main_process:
        publish_folder(tmp, final)
        for old in checkpoints(output_dir)[:-limit] if limit else []:
            delete_folder(old)
    accelerator.wait_for_everyone()


def write_failure_reason(output_dir: Path, previous) -> str:
    """Why a write most likely failed; torch.save reports a short write without the OS error behind it."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"this process may not write files over {limit} bytes (ulimit -f)"
    free = shutil.disk_usage(output_dir).free
    needed = sum(f.stat().st_size for f in previous[-1].iterdir()) if previous else 0
    if free < max(needed, 1):
        return f"the disk is full ({free / 2**20:.0f} MiB free, a checkpoint takes {needed / 2**20:.0f} MiB)"
    return f"the disk may be full or failing ({free / 2**20:.0f} MiB free now)"


def resume(accelerator, output_dir: Path, requested: str) -> Optional[Path]:
    """Load the requested checkpoint, or with 'latest' the newest one that every process can read (an unreadable one
    is reported and skipped). Returns the folder loaded, None when there is none."""
    if requested != "latest":
        candidates = [Path(requested)]
    else:
        candidates = list(reversed(checkpoints(output_dir)))
        if not candidates:
            logger.info("no checkpoint in %s: starting from scratch", output_dir)
            return None
    for path in candidates:
        try:
            accelerator.load_state(str(path))
            failed, reason = 0.0, ""
        except Exception as err:  # truncated or corrupt file: the processes must agree before going on
            failed, reason = 1.0, f"{type(err).__name__}: {err}"
        if accelerator.reduce(torch.tensor([failed], device=accelerator.device), "sum").item() == 0:
            return path
        if requested != "latest":
            raise SystemExit(f"--resume_from_checkpoint {path} is unreadable ({reason or 'on another process'}); "
                             "pass an older checkpoint-N folder or 'latest'.")
        logger.warning("checkpoint %s is unreadable (%s): trying the previous one", path, reason or "on another process")
    raise SystemExit(f"no readable checkpoint in {output_dir}; remove the broken ones or start without "
                     "--resume_from_checkpoint.")



def save_pipeline(pipe, folder: Path, training_config: dict) -> None:
    """``pipe.save_pretrained`` plus the run's training_config.json, published atomically as ``folder``: a kill
    leaves the previous pipeline or the new one, never a half-written folder that looks loadable."""
    import json

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    (tmp / "training_config.json").write_text(json.dumps(training_config, indent=2, default=str))
    fsync_tree(tmp)
    publish_folder(tmp, folder)
