"""Run training/train.py with the flush of checkpoint $DDPM_HF_SLOW_PUBLISH (a step) held $DDPM_HF_SLOW_PUBLISH_S
seconds in the publishing thread, the file $DDPM_HF_PUBLISHING written as it starts. Everything else is the real
script."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for runs.py
from runs import load_train_script  # noqa: E402

import ddpm_hf.checkpoints  # noqa: E402

train = load_train_script()
flush = ddpm_hf.checkpoints.fsync_tree


def slow_flush(folder):
    if folder.name == f".checkpoint-{os.environ['DDPM_HF_SLOW_PUBLISH']}.tmp":
        Path(os.environ["DDPM_HF_PUBLISHING"]).write_text("publishing")
        time.sleep(float(os.environ["DDPM_HF_SLOW_PUBLISH_S"]))
    return flush(folder)


ddpm_hf.checkpoints.fsync_tree = slow_flush
sys.exit(train.main(sys.argv[1:]))
