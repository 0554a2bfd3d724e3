"""Streaming from the Hub against reading local files: images/s of the training stream, side by side in one run.

    python bench/stream.py                    # 1 and 2 processes, 0 and 2 decoding workers, 32² PNG
    python bench/stream.py --kind jpeg256 --seconds 20
    python bench/stream.py --count 32000 --batch 128 --processes 1 --workers 2 --latency_ms 0 50 200

The same synthetic dataset (bench/data.py's, 16 parquet shards) is read by ddpm_hf.data.TrainStream from local
parquet files and from a dataset repo on the local Hub server of the tests (tests/fakehub.py, unmodified datasets and
huggingface_hub clients over HTTP on 127.0.0.1, parquet read by Range requests). The network is loopback: what is
measured is the overhead of the Hub path (HTTP, fsspec, retries), not bandwidth. For each number of processes and
workers it prints images/s of both sources and the ratio hub/local (goal: ≥ 0.9). Each process serves its own data
stream (rank r of P, as in a P-process training run) and decodes as training does; the rate is all processes' images
over the wall time. ``--latency_ms`` makes the server wait that long before every answer, as a network round trip
would (the server answers requests concurrently, as the Hub's CDN does): the reads are counted, and their sizes show
what the latency is paid for.
"""

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

from fakehub import serve_for_benchmark  # noqa: E402

HUB = serve_for_benchmark({"hf_bench": "bench"}, "bench_stream_hf_")  # before huggingface_hub is imported

from data import write_dataset  # noqa: E402  (bench/data.py)

RESOLUTION = {"png32": 32, "jpeg256": 256}


def read_stream(source: str, resolution: int, batch: int, rank: int, world: int, workers: int, seconds: float,
                result: "multiprocessing.Queue") -> None:
    import datasets

    from ddpm_hf.data import TrainStream, load_image_dataset

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    stream = TrainStream(load_image_dataset(source), "image", resolution, 3, batch, world, rank, world, seed=0,
                         shuffle_buffer_size=256, random_flip=True, num_workers=workers)
    try:
        stream.next_batch()  # warm-up: the first shard opened, the workers started
        start, images = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            images += len(stream.next_batch())
        result.put((images, time.perf_counter() - start))
    finally:
        stream.close()


def rate(source: str, resolution: int, batch: int, processes: int, workers: int, seconds: float) -> float:
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    procs = [context.Process(target=read_stream, args=(source, resolution, batch, rank, processes, workers, seconds,
                                                       result)) for rank in range(processes)]
    for proc in procs:
        proc.start()
    parts = [result.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return sum(images for images, _ in parts) / max(wall for _, wall in parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=sorted(RESOLUTION), default="png32")
    parser.add_argument("--count", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--latency_ms", type=float, nargs="+", default=[0.0],
                        help="the server's wait before every answer (a network's round trip), one case per value")
    args = parser.parse_args()

    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_dataset(Path(tmp) / "data" / "data", args.kind, args.count)
        api = HfApi(token="hf_bench")
        api.create_repo("bench/stream", repo_type="dataset")
        api.upload_folder(repo_id="bench/stream", repo_type="dataset", folder_path=str(folder.parent))
        local, hub = str(folder.parent), "bench/stream"
        shard_mb = sum(f.stat().st_size for f in folder.iterdir()) / 16 / 1e6
        print(f"{args.kind}, {args.count} images in 16 shards of {shard_mb:.1f} MB, batch {args.batch} per process, "
              f"{args.seconds:.0f} s per case; local parquet against {HUB.url}")
        for processes in args.processes:
            for workers in args.workers:
                on_disk = rate(local, RESOLUTION[args.kind], args.batch, processes, workers, args.seconds)
                for latency_ms in args.latency_ms:
                    HUB.faults.clear()
                    for method in ("GET", "HEAD") if latency_ms else ():
                        HUB.inject(method, "/", "stall", times=-1, seconds=latency_ms / 1000)
                    HUB.reads.clear()
                    streamed = rate(hub, RESOLUTION[args.kind], args.batch, processes, workers, args.seconds)
                    sizes = sorted(read.end - read.start for read in HUB.reads)
                    reads = (f"; {len(sizes)} range reads, median {sizes[len(sizes) // 2] / 1e3:.0f} kB, mean "
                             f"{sum(sizes) / len(sizes) / 1e3:.0f} kB" if sizes else "")
                    print(f"{processes} process(es), {workers} workers, latency {latency_ms:.0f} ms: local "
                          f"{on_disk:8.1f} images/s, hub {streamed:8.1f} images/s, ratio hub/local "
                          f"{streamed / on_disk:.3f}{reads}", flush=True)
                HUB.faults.clear()
    HUB.stop()


if __name__ == "__main__":
    main()
