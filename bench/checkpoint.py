"""What a checkpoint costs the training loop: the time it blocks the loop with the checkpoint published in the
background (CheckpointSaver.save) against published in the loop (save, then wait for the publishing, as before), side
by side in one process, alternating, for a preset's U-Net, its AdamW state, its EMA and the checkpoint's pipeline.

    python bench/checkpoint.py --preset ddpm-cifar10 --repeats 5 --output_dir /path/on/the/training/disk

The flush to disk is what the background takes off the loop: on a network filesystem, most of a checkpoint.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from ddpm_hf import DDPMScheduler, DDPMUNet
from ddpm_hf.checkpoints import CheckpointSaver, folder_bytes
from ddpm_hf.ema import EMA
from ddpm_hf.presets import unet_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from runs import load_train_script  # noqa: E402  (training/train.py as a module)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ddpm-cifar10")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output_dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = load_train_script()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = DDPMUNet(**unet_config(args.preset))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one update, so that the optimizer holds its two moments
        p.grad = torch.zeros_like(p)
    optimizer.step()
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(accelerator.unwrap_model(model).parameters(), 0.9999, False)
    accelerator.register_for_checkpointing(ema)
    scheduler_config = DDPMScheduler().config

    def pipeline():
        return train.ema_pipeline(accelerator.unwrap_model(model), ema, scheduler_config, torch.device("cpu"))

    folder = Path(tempfile.mkdtemp(dir=args.output_dir, prefix="bench_checkpoint_"))
    saver = CheckpointSaver(accelerator, folder, limit=2)
    blocked = {"background": [], "in the loop": []}
    try:
        saver.save(0, pipeline)  # warm-up: imports, first allocations
        saver.wait()
        for step in range(1, 2 * args.repeats + 1):
            how = "background" if step % 2 else "in the loop"
            started = time.perf_counter()
            saver.save(step, pipeline)
            if how == "in the loop":
                saver.wait()
            blocked[how].append(time.perf_counter() - started)
            saver.wait()  # (the background's publishing is not timed: training would go on meanwhile)
        size = folder_bytes(folder / f"checkpoint-{2 * args.repeats}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    background, in_loop = (statistics.median(blocked[k]) for k in ("background", "in the loop"))
    print(f"{args.preset}: a checkpoint of {size / 2**20:.0f} MiB, {accelerator.device}, {torch.get_num_threads()} "
          f"thread(s), median of {args.repeats}")
    print(f"loop blocked: {background:.3f} s published in the background, {in_loop:.3f} s published in the loop; "
          f"ratio {background / in_loop:.2f}")


if __name__ == "__main__":
    main()
