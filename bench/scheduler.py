"""Side-by-side cost of one reverse step (Algorithm 2), ddpm_hf.DDPMScheduler.step vs diffusers.DDPMScheduler.step,
over a whole 1000-step chain, in one process.

With a one-element sample the step's arithmetic is nothing and what is timed is the host's work per step (the
coefficients, the checks of t): what a network compiled with CUDA graphs leaves the host to do between two calls.
With a batch of 32² images the arithmetic counts too. Chains alternate (ours, diffusers, ours, ...) so that load on a
shared machine hits both alike; every pair is checked to give the same samples bit for bit.

    python bench/scheduler.py               # 1 thread, CPU
"""

import argparse
import statistics
import time

import diffusers
import torch

from ddpm_hf import DDPMScheduler

CASES = {"1 element": (1, 1, 1, 1), "64 × 3 × 32²": (64, 3, 32, 32)}


def chain(scheduler, model_output, sample):
    generator = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps:
        sample = scheduler.step(model_output, t, sample, generator=generator).prev_sample
    return sample


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()}")
    for variance_type in ("fixed_small", "fixed_large"):
        for case, shape in CASES.items():
            ours = DDPMScheduler(variance_type=variance_type)
            theirs = diffusers.DDPMScheduler(variance_type=variance_type)
            for scheduler in (ours, theirs):
                scheduler.set_timesteps(1000)
            model_output = torch.randn(shape, generator=torch.Generator().manual_seed(1))
            sample = torch.randn(shape, generator=torch.Generator().manual_seed(2))
            times = {"ours": [], "diffusers": []}
            for _ in range(args.repeats):
                results = []
                for name, scheduler in (("ours", ours), ("diffusers", theirs)):
                    started = time.perf_counter()
                    results.append(chain(scheduler, model_output, sample))
                    times[name].append((time.perf_counter() - started) / len(scheduler.timesteps))
                assert torch.equal(*results), f"{variance_type} {case}: the chains differ"
            ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
            print(f"ratio ours/diffusers step {variance_type} {case}: time {ms['ours'] / ms['diffusers']:.2f} "
                  f"(ours {ms['ours']:.3f} ms, diffusers {ms['diffusers']:.3f} ms per step; same samples)")


if __name__ == "__main__":
    main()
