"""How fast the training stream decodes, per worker, against how fast the matching preset's network consumes images.

    python bench/data.py                       # CPU: 0, 1 and 2 workers
    python bench/data.py --workers 0 4 8 --device cuda

Two synthetic datasets in 16 parquet shards: 32×32 PNG (CIFAR-10-like, for ddpm-cifar10) and 256×256 JPEG (LSUN-like,
for ddpm-256, decoded and resized from 320×256). For each, ddpm_hf.data.TrainStream is read for --seconds per worker
count (after one warm-up batch) and prints images/s, images/s per worker, and the CPU time the training process itself
spends per batch (its threads, not the workers or the reader process): the time it holds, or competes for, the
interpreter lock the step's kernel launches need. Then the hand-off: the median time next_batch takes in the training
loop's thread when its batch is ready (a step of --step_s between calls, long enough for the reader to refill; pinned
memory on CUDA): what train.py's data_wait counts for each step when the stream keeps up. Then one training step of
the preset's U-Net (forward, backward, AdamW; bf16 autocast on CUDA) is timed on the same machine, and the ratio
decode/consume is printed: above 1, the stream keeps the model fed.
"""

import argparse
import io
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def write_dataset(folder: Path, kind: str, count: int, shards: int = 16) -> Path:
    from datasets import Dataset, Features, Image as ImageFeature
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for _ in range(count):
        buffer = io.BytesIO()
        if kind == "png32":
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        else:  # a smooth image, as photos are (noise would make JPEG decoding unrealistically slow)
            base = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
            Image.fromarray(base).resize((320, 256), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
        rows.append({"bytes": buffer.getvalue(), "path": None})
    ds = Dataset.from_dict({"image": rows}, features=Features({"image": ImageFeature()}))
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        ds.shard(shards, k, contiguous=True).to_parquet(str(folder / f"train-{k:05d}-of-{shards:05d}.parquet"))
    return folder


@contextmanager
def started_stream(folder: Path, resolution: int, batch: int, workers: int, pin: bool = False):
    """A TrainStream over ``folder`` after its first (warm-up) batch, closed after the block."""
    from ddpm_hf.data import TrainStream, load_image_dataset

    stream = TrainStream(load_image_dataset(str(folder)), "image", resolution, 3, batch, 1, 0, 1, seed=0,
                         shuffle_buffer_size=0, random_flip=True, num_workers=workers, pin_memory=pin)
    try:
        stream.next_batch()
        yield stream
    finally:
        stream.close()


def decode_rate(folder: Path, resolution: int, batch: int, workers: int, seconds: float) -> tuple:
    """Images/s and the training process's own CPU milliseconds per batch."""
    with started_stream(folder, resolution, batch, workers) as stream:
        start, cpu, images, batches = time.perf_counter(), time.process_time(), 0, 0
        while time.perf_counter() - start < seconds:
            images += len(stream.next_batch())
            batches += 1
        return images / (time.perf_counter() - start), (time.process_time() - cpu) / batches * 1e3


def handoff_ms(folder: Path, resolution: int, batch: int, workers: int, step_s: float, calls: int,
               pin: bool) -> tuple:
    """The median milliseconds next_batch takes ``step_s`` after the previous call, and how many of the calls found
    their batch ready (the others waited for it, and the median may include that wait)."""
    with started_stream(folder, resolution, batch, workers, pin) as stream:
        times, ready = [], 0
        for _ in range(calls):
            time.sleep(step_s)
            ready += not stream._queue.empty()
            start = time.perf_counter()
            stream.next_batch()
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1e3, ready


def consume_rate(preset: str, batch: int, device: torch.device) -> float:
    from ddpm_hf import DDPMUNet
    from ddpm_hf.presets import unet_config

    config = unet_config(preset)
    model = DDPMUNet(**config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = config["sample_size"]
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(x, t).sample.float().square().mean()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    start = time.perf_counter()
    repeats = 3 if device.type == "cpu" else 10
    for _ in range(repeats):
        step()
    return repeats * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--step_s", type=float, default=0.3, help="the step simulated between two hand-offs")
    parser.add_argument("--handoffs", type=int, default=20, help="hand-offs timed per worker count (0: none)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cases = [("png32", 32, 128, "ddpm-cifar10", 128 if device.type == "cuda" else 4, 4096),
             ("jpeg256", 256, 64, "ddpm-256", 16 if device.type == "cuda" else 1, 1024)]  # 64 at 256²: over 80 GB
    with tempfile.TemporaryDirectory() as tmp:
        for kind, resolution, batch, preset, model_batch, count in cases:
            folder = write_dataset(Path(tmp) / kind, kind, count)
            consumed = consume_rate(preset, model_batch, device)
            print(f"{kind}: {preset} consumes {consumed:.1f} images/s on {device} (training step, batch {model_batch})")
            for workers in args.workers:
                rate, cpu_ms = decode_rate(folder, resolution, batch, workers, args.seconds)
                print(f"{kind} decode with {workers} workers: {rate:8.1f} images/s ({rate / max(workers, 1):.1f} per "
                      f"worker); ratio decode/consume {rate / consumed:.2f}; training process CPU {cpu_ms:.2f} ms "
                      f"per batch of {batch}")
            for workers in args.workers if args.handoffs else ():
                waited, ready = handoff_ms(folder, resolution, batch, workers, args.step_s, args.handoffs,
                                           pin=device.type == "cuda")
                print(f"{kind} hand-off with {workers} workers: next_batch takes {waited:.3f} ms (median of "
                      f"{args.handoffs}, {ready} of them with the batch ready)")


if __name__ == "__main__":
    main()
