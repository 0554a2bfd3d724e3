"""What a resume downloads again: a WebDataset (tar shards) on the local Hub, resumed with and without its tars'
sample counts, side by side in one run.

    python bench/resume.py                               # 200 tars of 50 samples, resumed in the first and second epoch
    python bench/resume.py --tars 400 --at 0.3 0.9 --latency_ms 50

The tars (32² PNG, as CIFAR-10's) are published to a dataset repo on the tests' local Hub server (tests/fakehub.py,
the unmodified datasets and huggingface_hub clients over HTTP on 127.0.0.1). One stream reads to a position (the
fraction ``--at`` of an epoch, in the first epoch and in the second), and its state is taken as a checkpoint takes
it. The same state is then resumed twice: as it is (the tars counted so far stand in for their rows, see
Replay._tar_rows_from), and with its counts removed (the epoch is read again up to the position, as every
first-epoch resume did before). For each it prints the bytes the server sent until the resumed stream's first batch
and the seconds that took, and checks that both resumes hand out the same batches as the stream never stopped. ``--latency_ms`` makes the
server wait that long before every answer, as a network round trip would.
"""

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from fakehub import serve_for_benchmark  # noqa: E402

HUB = serve_for_benchmark({"hf_bench": "bench"}, "bench_resume_hf_")  # before huggingface_hub is imported

BATCH = 64


def write_tars(folder: Path, tars: int, samples: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(tars):
        with tarfile.open(folder / f"train-{k:05d}.tar", "w") as tar:
            for s in range(k * samples, (k + 1) * samples):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png, "PNG")
                member = tarfile.TarInfo(f"{s:07d}.png")
                member.size = png.tell()
                tar.addfile(member, io.BytesIO(png.getvalue()))


def stream(dataset):
    from ddpm_hf.data import TrainStream

    return TrainStream(dataset, "png", 32, 3, BATCH, 1, 0, 1, seed=0, shuffle_buffer_size=1000, record_ids=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tars", type=int, default=200)
    parser.add_argument("--samples", type=int, default=50, help="samples per tar")
    parser.add_argument("--at", type=float, nargs="+", default=[0.6], help="where to resume, a fraction of an epoch")
    parser.add_argument("--latency_ms", type=float, default=0.0)
    args = parser.parse_args()

    import datasets
    import torch
    from huggingface_hub import HfApi

    from ddpm_hf.data import load_image_dataset

    torch.set_num_threads(1)
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    rows = args.tars * args.samples
    with tempfile.TemporaryDirectory() as tmp:
        write_tars(Path(tmp) / "tars", args.tars, args.samples)
        megabytes = sum(f.stat().st_size for f in (Path(tmp) / "tars").iterdir()) / 1e6
        api = HfApi(token="hf_bench")
        api.create_repo("bench/tars", repo_type="dataset")
        api.upload_folder(repo_id="bench/tars", repo_type="dataset", folder_path=str(Path(tmp) / "tars"))
        print(f"{args.tars} tars of {args.samples} 32² PNG samples ({rows} rows, {megabytes:.1f} MB), one stream, "
              f"batch {BATCH}, shuffle buffer 1000, server latency {args.latency_ms:.0f} ms")
        if args.latency_ms:
            for method in ("GET", "HEAD"):
                HUB.inject(method, "/", "stall", times=-1, seconds=args.latency_ms / 1000)
        dataset = load_image_dataset("bench/tars", check_shards=False)
        for epoch in (0, 1):
            for at in args.at:
                batches = (epoch * rows + int(at * rows)) // BATCH
                stopped = stream(dataset)
                try:
                    for _ in range(batches):
                        stopped.next_batch()
                    state = stopped.state_dict()
                    expected = stopped.next_batch()
                finally:
                    stopped.close()
                line = []
                for name, resumed_from in (("with counts", state), ("without", dict(state, tar_rows_known={}))):
                    resumed = stream(dataset)
                    resumed.load_state_dict(resumed_from)
                    HUB.reads.clear()
                    start = time.perf_counter()
                    try:
                        batch = resumed.next_batch()
                        seconds = time.perf_counter() - start
                        sent = sum(read.sent for read in list(HUB.reads)) / 1e6  # (its read-ahead is under way)
                    finally:
                        resumed.close()
                    assert torch.equal(batch, expected), f"{name}: not the batch of the stream never stopped"
                    line.append(f"{name} {sent:6.2f} MB in {seconds:5.2f} s")
                (e, row), = state["position"].values()
                print(f"resume at epoch {e} row {row} ({len(state['tar_rows_known'])} tars counted): "
                      f"{line[0]}; {line[1]}", flush=True)
    HUB.stop()


if __name__ == "__main__":
    main()
