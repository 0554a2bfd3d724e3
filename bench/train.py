"""Training throughput: training/train.py vs a loop equivalent to diffusers' train_unconditional.py, on the same
small preset, data (the embedded Fashion-MNIST subset), batch and machine, one process and 1 thread each.

    python bench/train.py                 # small-28, batch 64, 40 steps, steady-state images/s from step 10 on
    python bench/train.py --preset small-32 --steps 30

Each side runs in its own child process (one after the other, same settings), so that its peak RSS can be read;
images/s is measured between step --warmup and the last step (start-up excluded). Prints one
``ratio ours/diffusers`` line for throughput (above 1: ours is faster) and one for peak memory.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DIFFUSERS_LOOP = textwrap.dedent("""
    # The core of diffusers' examples/unconditional_image_generation/train_unconditional.py, with PIL instead of
    # torchvision (not installable with the CPU torch build): map-style dataset, shuffled DataLoader, AdamW(0.95,
    # 0.999, 1e-6), cosine schedule with warm-up, EMAModel with warm-up, clip 1.0, accelerate.
    import glob, json, resource, sys, time
    import numpy as np, torch
    from accelerate import Accelerator
    from datasets import load_dataset
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from ddpm_hf.data import EMBEDDED_DIR
    from ddpm_hf.presets import unet_config

    preset, steps, warmup, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    config = unet_config(preset)
    size = config["sample_size"]
    accelerator = Accelerator()
    model = UNet2DModel(**config)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    files = sorted(glob.glob(str(EMBEDDED_DIR / "data" / "train-*.parquet")))
    dataset = load_dataset("parquet", data_files={"train": files}, split="train")

    def transform(examples):
        images = []
        for image in examples["image"]:
            image = image.convert("L").resize((size, size), 2)  # Resize (bilinear) + CenterCrop at equal size
            images.append(torch.from_numpy(np.asarray(image, dtype=np.float32)[None] / 127.5 - 1))
        return {"input": images}

    dataset.set_transform(transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=10_000)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=model.config)
    step, times = 0, {}
    while step < steps:
        for batch_data in loader:
            clean = batch_data["input"]
            noise = torch.randn(clean.shape, dtype=clean.dtype, device=clean.device)
            timesteps = torch.randint(0, 1000, (clean.shape[0],), device=clean.device).long()
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            with accelerator.accumulate(model):
                pred = model(noisy, timesteps, return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema.step(model.parameters())
                step += 1
                times[step] = time.time()
            if step >= steps:
                break
    print(json.dumps({"start": times[warmup], "end": times[steps],
                      "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")

OURS = textwrap.dedent("""
    import json, resource, runpy, sys
    import torch
    torch.set_num_threads(1)
    sys.argv = ["training/train.py"] + sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def _run(code, args, env):
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode:
        raise SystemExit(f"child failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _step_times(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(logdir.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(files[-1].parent))
    acc.Reload()
    return {e.step: e.wall_time for e in acc.Scalars("loss")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-28")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ours"
        ours = _run(OURS, ["--preset", args.preset, "--max_train_steps", str(args.steps), "--train_batch_size",
                           str(args.batch), "--checkpointing_steps", "0", "--num_sample_images", "1",
                           "--ddpm_num_inference_steps", "2", "--output_dir", str(out), "--dropout", "0.1"], env)
        times = _step_times(out / "logs")
        ours_rate = (args.steps - args.warmup) * args.batch / (times[args.steps] - times[args.warmup])
    theirs = _run(DIFFUSERS_LOOP, [args.preset, str(args.steps), str(args.warmup), str(args.batch)], env)
    theirs_rate = (args.steps - args.warmup) * args.batch / (theirs["end"] - theirs["start"])
    print(f"preset {args.preset}, batch {args.batch}, steps {args.warmup}..{args.steps}, 1 thread, CPU")
    print(f"ours      {ours_rate:7.1f} img/s  peak RSS {ours['maxrss_kib'] / 1024:7.0f} MiB")
    print(f"diffusers {theirs_rate:7.1f} img/s  peak RSS {theirs['maxrss_kib'] / 1024:7.0f} MiB")
    print(f"ratio ours/diffusers train throughput: {ours_rate / theirs_rate:.3f}")
    print(f"ratio ours/diffusers train peak memory: {ours['maxrss_kib'] / theirs['maxrss_kib']:.3f}")


if __name__ == "__main__":
    main()
