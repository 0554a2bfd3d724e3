"""Run training/train.py with no room left in the address space while the main process copies the network with the
EMA weights (see test_out_of_memory.py). A process of its own, with glibc told at its start to map every allocation
above 64 kB anew: in a test process, the memory that earlier tests freed (hundreds of MB, kept by glibc for reuse)
would hold the copy without any new mapping, and the copy would not fail."""

import ctypes
import sys
from pathlib import Path

if not ctypes.CDLL(None).mallopt(-3, 2**16):  # glibc's M_MMAP_THRESHOLD, before torch allocates anything
    sys.exit("mallopt(M_MMAP_THRESHOLD) refused")

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # tests/ (runs.py), tests/faults/ (the address space's limit)
from runs import load_train_script  # noqa: E402
from test_out_of_memory import address_space  # noqa: E402

train = load_train_script()
made = train.ema_pipeline


def with_no_room(*args, **kwargs):
    with address_space(room=0):
        return made(*args, **kwargs)


train.ema_pipeline = with_no_room
sys.exit(train.main(sys.argv[1:]))
