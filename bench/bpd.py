"""Exact bits/dim of 64 test images: ddpm_hf.likelihood.bits_per_dim (timesteps batched per network call) vs a
straightforward loop that evaluates one timestep of the batch at a time (improved-diffusion's calc_bpd_loop shape).

    python bench/bpd.py                            # small-32 preset, random weights, T = 1000, 1 thread
    python bench/bpd.py --pipeline runs/quickstart --timesteps 1000

Both compute the same quantity (printed side by side); the ratio line is baseline time / ours (above 1: ours is
faster).
"""

import argparse
import math
import time

import torch

from ddpm_hf import DDPMPipeline, DDPMScheduler, DDPMUNet, unet_config
from ddpm_hf.evaluation import load_eval_images
from ddpm_hf.likelihood import LN2, VariationalBound, bits_per_dim


@torch.no_grad()
def one_timestep_at_a_time(model, scheduler, images, generator):
    """The plain loop: for t = T−1 … 0, noise the whole batch to x_t, one network call, one bound term."""
    bound = VariationalBound(model, scheduler)
    x0 = images.float() / 127.5 - 1
    total = bound.prior(x0).double()
    for t in range(scheduler.config.num_train_timesteps - 1, -1, -1):
        noise = torch.randn(x0.shape, generator=generator)
        total += bound.terms(x0, torch.full((len(x0),), t), noise)["term"].double()
    return float((total / (x0[0].numel() * LN2)).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=None, help="a trained pipeline (default: small-32, random weights)")
    parser.add_argument("--timesteps", type=int, default=1000, help="T of the scheduler when no pipeline is given")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--timesteps_per_batch", type=int, default=None, help="default: bits_per_dim's choice")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.pipeline:
        pipe = DDPMPipeline.from_pretrained(args.pipeline)
        model, scheduler = pipe.unet.eval(), pipe.scheduler
    else:
        torch.manual_seed(0)
        model = DDPMUNet(**unet_config("small-32", dropout=0.0)).eval()
        scheduler = DDPMScheduler(num_train_timesteps=args.timesteps, variance_type="fixed_large")
    size, channels = model.config.sample_size, model.config.in_channels
    images = load_eval_images("embedded:fashion_mnist", args.num_images, size, channels, split="test")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.num_images} images {channels}×{size}²,"
          f" T = {scheduler.config.num_train_timesteps}, {sum(p.numel() for p in model.parameters()):,} parameters")

    start = time.perf_counter()
    ours = bits_per_dim(model, scheduler, images, timesteps_per_batch=args.timesteps_per_batch,
                        batch_size=args.num_images, progress=False)
    ours_time = time.perf_counter() - start
    start = time.perf_counter()
    plain = one_timestep_at_a_time(model, scheduler, images, torch.Generator().manual_seed(1))
    plain_time = time.perf_counter() - start
    print(f"ours     {ours_time:8.1f} s  bits/dim {ours.mean:.4f}")
    print(f"baseline {plain_time:8.1f} s  bits/dim {plain:.4f}  (different noise draws: equal within Monte-Carlo error)")
    print(f"ratio baseline/ours bpd: {plain_time / ours_time:.2f}x faster")
    assert math.isfinite(ours.mean) and math.isfinite(plain)


if __name__ == "__main__":
    main()
