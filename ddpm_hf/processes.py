"""How a process of a command ends with the processes around it: with its parent (a launcher killed by SIGKILL, a
training process that died), out of its torch.distributed process group, whatever ends it, and saying once per
machine what stops every process alike."""

import argparse
import os
import signal
import time

DDP_TIMEOUT_S = 1800.0  # seconds the processes of a command wait for each other (--ddp_timeout's default)
# This process and its parent as ddpm_hf was first imported: its __init__ imports this module before torch and the
# rest (seconds; only its check of the installed versions comes first), so that a launcher killed meanwhile is told
# from the process that then adopts this one.
STARTED_AS = (os.getpid(), os.getppid())


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
    SIGKILL: with the launcher gone, nothing would end a process whose SIGTERM waits (see stop_on_sigterm) in a
    collective that the others left (a checkpoint being written is left unpublished, as by any kill). The launcher is
    the parent this process had as it started (STARTED_AS; a process forked since: its parent now): one killed while
    this process still imported is noticed too (its processes would otherwise wait for a rendezvous whose store had
    gone with it, up to --ddp_timeout)."""
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        pid, parent = STARTED_AS
        die_with_parent(parent if pid == os.getpid() else os.getppid(), signal.SIGKILL)


def stop_on_sigterm() -> None:
    """SIGTERM (a job scheduler's, or torch's launcher ending the other processes once one has failed) unwinds this
    process as an exception does: its cleanups run and the interpreter finishes the checkpoint being published in the
    background before it exits, where SIGTERM's default killed it at once (the run then resumed from the checkpoint
    before). A process stuck where Python does not run (a collective the others left) gets the launcher's SIGKILL
    after its grace period (30 s), the publishing thread working on meanwhile."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def leave_process_group(failed: bool = False) -> None:
    """Destroy this process's torch.distributed process group, if it has one, as a command ends. One left to the
    interpreter's exit may abort the process as it exits ("terminate called without an active exception",
    pytorch/pytorch#190489): measured here, two CPU processes stopped together by a SystemExit after one collective
    aborted in 14 of 30 launches, 0 of 30 once they left their group first. After a failure (``failed``) only a gloo
    group is destroyed: NCCL's destruction flushes the pending collectives, and one the other processes never join
    would hang it (pytorch/pytorch#141510); such a group is left to the interpreter's exit, as before."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gloo = torch.distributed.get_backend() == "gloo"
    if failed and not gloo:
        return
    # torch < 2.8 destroys a group holding the GIL (pytorch/pytorch#154976) while gloo joins its worker threads, one of
    # which may still need the GIL to free the last collective's tensors: a deadlock that only the launcher's SIGKILL
    # ended (torch 2.6, two CPU processes refusing a run together: 3 of 12 launches). The gloo backend, held here past
    # its group, is destroyed last, by gloo's own binding, which releases the GIL.
    backend = torch.distributed.group.WORLD._get_backend(torch.device("cpu")) if gloo else None
    torch.distributed.destroy_process_group()
    del backend


def says_shared_messages() -> bool:
    """Whether this process says what stops every process of a launch alike (a bad flag, dataset or --output_dir):
    the first process of each machine (LOCAL_RANK 0), not all 8 of a machine's GPUs; and every process that torch's
    launcher did not start (nothing would end a quiet one: see quiet_exit)."""
    return os.environ.get("TORCHELASTIC_RUN_ID") is None or os.environ.get("LOCAL_RANK", "0") == "0"


def stop_all(message: str) -> SystemExit:
    """The SystemExit of a failure that every process meets alike: its ``message`` said once per machine (see
    says_shared_messages), the other processes exiting with status 1 quietly (see quiet_exit)."""
    return SystemExit(message) if says_shared_messages() else quiet_exit(1)


SAY_FIRST_S = 30.0  # how long a quiet process leaves the one that speaks to say why and exit (see quiet_exit)


def quiet_exit(status: int) -> SystemExit:
    """The exit of a process that leaves the failure to the machine's first process to say. It waits for it first:
    torch's launcher ends every process once one exits, and a quiet process gone first would take the message with
    it (the first process may still be importing when the others find a bad flag). The launcher ends this one as the
    other exits; where none does, it exits after SAY_FIRST_S."""
    time.sleep(SAY_FIRST_S)
    return SystemExit(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's, its errors said once per machine, the other processes exiting with status 2 quietly (see
    quiet_exit): for flags whose checks every process meets alike (the same command line, nothing read that one
    process could fail to read and another not)."""

    def error(self, message: str):
        if not says_shared_messages():
            raise quiet_exit(2)
        super().error(message)


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a job scheduler's share of the machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
