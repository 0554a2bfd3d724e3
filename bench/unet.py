"""Side-by-side speed of ddpm_hf.DDPMUNet vs diffusers.UNet2DModel: same config, same weights, one process.

Alternates A/B runs (ours, diffusers, ours, ...) so that load on a shared machine hits both sides alike, and prints
medians and one ``ratio ours/diffusers`` line per case (below 1.0: ours is faster).

    python bench/unet.py                          # 1 thread, both cases, CPU
    python bench/unet.py --device cuda --threads 0  # on a GPU (0 threads: leave torch's default)

Memory: on CUDA the peak allocated memory of each step; on CPU the bytes that autograd saves for the backward pass
(the activation memory of a training step, deterministic, unlike RSS).
"""

import argparse
import statistics
import time

import torch
from diffusers import UNet2DModel

from ddpm_hf import DDPMUNet
from ddpm_hf.presets import unet_config

CASES = {"cifar10-b8": ("ddpm-cifar10", 8), "small32-b64": ("small-32", 64)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _forward(model, x, t):
    with torch.no_grad():
        return model(x, t).sample


def _train_step(model, optimizer, x, t, target):
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x, t).sample, target)
    loss.backward()
    optimizer.step()


def _saved_bytes(model, x, t):
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t).sample.sum()
    return total


def _measure(fn, device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return elapsed, peak


def run_case(name, repeats, device, dtype):
    preset, batch = CASES[name]
    config = unet_config(preset, dropout=0.0)
    torch.manual_seed(0)
    theirs = UNet2DModel(**config).to(device, dtype)
    ours = DDPMUNet(**config).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    size = config["sample_size"]
    x = torch.randn(batch, config["in_channels"], size, size, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    target = torch.randn_like(x)
    models = {"ours": ours, "diffusers": theirs}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    diff = (_forward(ours, x, t) - _forward(theirs, x, t)).abs().max().item()

    results = {}
    for mode in ("forward", "train"):
        times = {k: [] for k in models}
        peaks = {k: 0 for k in models}
        for k, m in models.items():  # warm-up
            m.train(mode == "train")
            (_forward(m, x, t) if mode == "forward" else _train_step(m, optimizers[k], x, t, target))
        for _ in range(repeats):
            for k, m in models.items():
                fn = (lambda m=m: _forward(m, x, t)) if mode == "forward" else (
                    lambda m=m, k=k: _train_step(m, optimizers[k], x, t, target))
                elapsed, peak = _measure(fn, device)
                times[k].append(elapsed)
                peaks[k] = max(peaks[k], peak or 0)
        if device.type != "cuda" and mode == "train":
            peaks = {k: _saved_bytes(m, x, t) for k, m in models.items()}
        results[mode] = (times, peaks)

    print(f"\n## {name}: preset {preset}, batch {batch}, {dtype}, {device}, max |ours − diffusers| = {diff:.2e}")
    for mode, (times, peaks) in results.items():
        med = {k: statistics.median(v) for k, v in times.items()}
        mem_label = "peak" if device.type == "cuda" else "saved activations"
        for k in models:
            mem = f", {mem_label} {peaks[k] / 2**20:.0f} MiB" if peaks[k] else ""
            print(f"{mode:8s} {k:9s} median {med[k] * 1000:8.1f} ms  (min {min(times[k]) * 1000:.1f}, n={repeats})"
                  f"  {batch / med[k]:7.1f} img/s{mem}")
        mem_ratio = f", memory {peaks['ours'] / peaks['diffusers']:.2f}" if peaks["diffusers"] else ""
        print(f"ratio ours/diffusers {name} {mode}: time {med['ours'] / med['diffusers']:.3f}{mem_ratio}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    for name in args.cases:
        run_case(name, args.repeats, device, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
