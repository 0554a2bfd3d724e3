"""Run training/train.py with a NaN loss injected: the loss evaluations numbered in $DDPM_HF_NAN_AT (1, 2, ... per
process) return NaN on the ranks listed in $DDPM_HF_NAN_RANKS. Everything else is the real script."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for runs.py
from runs import load_train_script  # noqa: E402

train = load_train_script()

NAN_AT = {int(s) for s in os.environ["DDPM_HF_NAN_AT"].split(",")}
RANKS = {int(s) for s in os.environ.get("DDPM_HF_NAN_RANKS", "0").split(",")}
RANK = int(os.environ.get("RANK", "0"))
real_make_loss = train.make_loss


def make_loss(*args, **kwargs):
    loss = real_make_loss(*args, **kwargs)
    calls = [0]

    def poisoned(*inputs):
        calls[0] += 1
        value = loss(*inputs)
        return value * float("nan") if calls[0] in NAN_AT and RANK in RANKS else value

    return poisoned


train.make_loss = make_loss
sys.exit(train.main(sys.argv[1:]))
