"""Run a command unchanged (a script's path, or ``-m module``, with its arguments) and say, as the interpreter exits,
whether this process still holds a torch.distributed process group: one left to the exit may abort the process
(see ddpm_hf.processes.leave_process_group). Each process prints ``EXIT_PROBE rank R holds a process group: BOOL``."""

import atexit
import os
import runpy
import sys

import torch


def _report() -> None:
    held = torch.distributed.is_available() and torch.distributed.is_initialized()
    print(f"EXIT_PROBE rank {os.environ.get('RANK')} holds a process group: {held}", flush=True)


atexit.register(_report)  # after the command's own cleanup, before the interpreter's teardown
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
