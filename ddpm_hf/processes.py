"""How a process of a command ends with the processes around it: with its parent (a launcher killed by SIGKILL, a
training process that died), and out of its torch.distributed process group, whatever ends it."""

import os
import signal

import torch


def die_with_parent(parent: int, sig: int) -> None:
    """This process gets ``sig`` when its parent, pid ``parent``, dies (even by SIGKILL; Linux's parent-death signal,
    which follows the thread that started this process). A parent that died before the request is found by the pid
    check after it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG (glibc or musl)
    except (OSError, AttributeError):  # not Linux: the parent's own shutdown still ends it on a normal exit
        pass
    if os.getppid() != parent:
        os._exit(1)


def die_with_launcher() -> None:
    """A process started by `accelerate launch` (torch's elastic agent, which starts each in a session of its own)
    ends when its launcher does, however: killed by SIGKILL, the launcher left its processes training, checkpointing
    and pushing to the Hub to the end, beside whatever the user started next in the same --output_dir. They get
    SIGTERM, as from the launcher's own shutdown (a checkpoint being written is left unpublished, as by any kill)."""
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        die_with_parent(os.getppid(), signal.SIGTERM)


def leave_process_group(failed: bool = False) -> None:
    """Destroy this process's torch.distributed process group, if it has one, as a command ends. One left to the
    interpreter's exit may abort the process as it exits ("terminate called without an active exception",
    pytorch/pytorch#190489): measured here, two CPU processes stopped together by a SystemExit after one collective
    aborted in 14 of 30 launches, 0 of 30 once they left their group first. After a failure (``failed``) only a gloo
    group is destroyed: NCCL's destruction flushes the pending collectives, and one the other processes never join
    would hang it (pytorch/pytorch#141510); such a group is left to the interpreter's exit, as before."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if failed and torch.distributed.get_backend() != "gloo":
        return
    torch.distributed.destroy_process_group()
