"""What a checkpoint costs the training loop: the time it blocks the loop with the checkpoint published in the
background (CheckpointSaver.save) against published in the loop (save, then wait for the publishing, as before), side
by side in one process, alternating, for a preset's U-Net, its AdamW state, its EMA and the checkpoint's pipeline.

    python bench/checkpoint.py --preset ddpm-cifar10 --repeats 5 --output_dir /path/on/the/training/disk

The flush to disk is what the background takes off the loop: on a network filesystem, most of a checkpoint.

Each checkpoint is also checked: once ``save`` has returned, the training weights and the EMA are changed in place
(as the next steps would change them, on the GPU in a GPU run), and the published checkpoint must still hold exactly
the EMA weights of its step in its pipeline, and the training weights in accelerate's state. A copy from the device
left to finish after ``save`` returned (a non-blocking one, or one moved into the publishing thread) would fail it.
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
from safetensors.torch import load_file

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
    weights = accelerator.unwrap_model(model)

    def saved_as_they_were(step, ema_weights, training_weights):
        """checkpoint-``step`` holds the weights of its step, however they changed after ``save`` returned."""
        checkpoint = folder / f"checkpoint-{step}"
        published = load_file(checkpoint / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
        state = load_file(next(checkpoint.glob("model*.safetensors")))
        return (all(torch.equal(published[name], value) for name, value in ema_weights.items())
                and all(torch.equal(state[name], value) for name, value in training_weights.items()))

    try:
        saver.save(0, pipeline)  # warm-up: imports, first allocations
        saver.wait()
        for step in range(1, 2 * args.repeats + 1):
            how = "background" if step % 2 else "in the loop"
            names = [name for name, _ in weights.named_parameters()]
            ema_weights = {name: shadow.cpu().clone() for name, shadow in zip(names, ema.shadow)}
            training_weights = {name: p.detach().cpu().clone() for name, p in weights.state_dict().items()}
            started = time.perf_counter()
            saver.save(step, pipeline)
            if how == "in the loop":
                saver.wait()
            blocked[how].append(time.perf_counter() - started)
            with torch.no_grad():  # what the next steps do, while the checkpoint is published
                torch._foreach_add_(list(weights.parameters()), 1.0)
                torch._foreach_add_(ema.shadow, 1.0)
            saver.wait()  # (the background's publishing is not timed: training would go on meanwhile)
            if not saved_as_they_were(step, ema_weights, training_weights):
                sys.exit(f"checkpoint-{step} ({how}) does not hold the weights of its step: they changed after "
                         "save() returned, before the copy from the device was done")
        size = folder_bytes(folder / f"checkpoint-{2 * args.repeats}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    background, in_loop = (statistics.median(blocked[k]) for k in ("background", "in the loop"))
    print(f"{args.preset}: a checkpoint of {size / 2**20:.0f} MiB, {accelerator.device}, {torch.get_num_threads()} "
          f"thread(s), median of {args.repeats}")
    print(f"loop blocked: {background:.3f} s published in the background, {in_loop:.3f} s published in the loop; "
          f"ratio {background / in_loop:.2f}; every checkpoint holds the weights of its step")


if __name__ == "__main__":
    main()
