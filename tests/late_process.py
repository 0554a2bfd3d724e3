"""Run ``ddpm-hf`` (its arguments) with process 1 late to the others: it sleeps $DDPM_HF_LATE_S seconds after loading
the pipeline, as a slower GPU would come late to the processes' next meeting. Everything else is the real command."""

import os
import sys
import time

from ddpm_hf import evaluation
from ddpm_hf.cli import main

load_pipeline = evaluation.load_pipeline


def late_load_pipeline(*args, **kwargs):
    pipe = load_pipeline(*args, **kwargs)
    if os.environ.get("RANK") == "1":
        time.sleep(float(os.environ["DDPM_HF_LATE_S"]))
    return pipe


evaluation.load_pipeline = late_load_pipeline
sys.exit(main())
