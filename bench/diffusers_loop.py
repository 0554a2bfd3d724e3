"""The core of diffusers' examples/unconditional_image_generation/train_unconditional.py, for side-by-side benchmarks.

Map-style dataset with per-item transforms (PIL instead of torchvision, which the CPU torch build cannot import),
shuffled DataLoader, UNet2DModel, AdamW(β 0.95/0.999, wd 1e-6), cosine schedule with 500 warm-up steps, clip 1.0,
EMAModel with warm-up (inv_gamma 1, power 3/4, max 0.9999), accelerate. Runs under `accelerate launch` like the
original. Writes {"step_times": {...}, "maxrss_kib": ...} to --report and the EMA pipeline to --output_dir.

    python bench/diffusers_loop.py --preset small-28 --steps 40 --report r.json
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 bench/diffusers_loop.py --minutes 15 ...
"""

import argparse
import glob
import json
import resource
import time

import numpy as np
import torch
from accelerate import Accelerator
from datasets import load_dataset
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ddpm_hf.data import EMBEDDED_DIR
from ddpm_hf.presets import unet_config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-28")
    parser.add_argument("--data_dir", default=str(EMBEDDED_DIR), help="folder with data/train-*.parquet")
    parser.add_argument("--train_batch_size", type=int, default=64, help="per process")
    parser.add_argument("--steps", type=int, default=10**9)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--report", required=True)
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    config = unet_config(args.preset)
    size = config["sample_size"]
    model = UNet2DModel(**config)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.95, 0.999), weight_decay=1e-6,
                                  eps=1e-8)
    files = sorted(glob.glob(f"{args.data_dir}/data/train-*.parquet"))
    dataset = load_dataset("parquet", data_files={"train": files}, split="train")

    def transform(examples):
        images = []
        for image in examples["image"]:
            image = image.convert("L" if config["in_channels"] == 1 else "RGB").resize((size, size), 2)
            array = np.asarray(image, dtype=np.float32).reshape(size, size, -1).transpose(2, 0, 1)
            images.append(torch.from_numpy(array / 127.5 - 1))
        return {"input": images}

    dataset.set_transform(transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, num_workers=0)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500 * accelerator.num_processes,
                                 num_training_steps=max(args.steps, 10_000) * accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=accelerator.unwrap_model(model).config)
    step, times, start = 0, {}, time.time()
    done = False
    while not done:
        for batch in loader:
            clean = batch["input"]
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
            out_of_time = float(args.minutes is not None and time.time() - start > 60 * args.minutes)
            out_of_time = accelerator.reduce(torch.tensor([out_of_time], device=accelerator.device), "sum").item()
            if step >= args.steps or out_of_time:
                done = True
                break
    if accelerator.is_main_process:
        if args.output_dir:
            unet = accelerator.unwrap_model(model)
            ema.copy_to(unet.parameters())
            DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(args.output_dir)
        with open(args.report, "w") as f:
            json.dump({"step_times": times, "steps": step,
                       "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)


if __name__ == "__main__":
    main()
