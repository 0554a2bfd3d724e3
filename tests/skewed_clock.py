"""Run training/train.py with process 1's clock of the run's start $DDPM_HF_CLOCK_SKEW_S seconds early, as a process
that started its steps that much before the others would have it: it uses up --max_train_minutes first. Everything
else is the real script."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/, for runs.py
from runs import load_train_script  # noqa: E402

train = load_train_script()
SKEW_S = float(os.environ["DDPM_HF_CLOCK_SKEW_S"]) if os.environ.get("RANK") == "1" else 0.0
real_out_of_time = train.out_of_time


def out_of_time(accelerator, started, minutes):
    return real_out_of_time(accelerator, started - SKEW_S, minutes)


train.out_of_time = out_of_time
sys.exit(train.main(sys.argv[1:]))
