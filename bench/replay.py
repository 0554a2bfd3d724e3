"""What a parquet resume's replay costs: the order of one stream's epoch recomputed over stand-ins of N rows
(Replay.order), with the rows still due from the middle of the epoch (_RowsDue), timed, with the
process's peak memory.

    python bench/replay.py --rows 10000000 --streams 1     # 1,000-row groups, 10 of them a shard, buffer 1000

The replay of the code before 2026-11-28 h (rows read back one by one as Python dicts): about 10.6 µs a row of the
stream here (docs/benchmarks.md).
"""

import argparse
import resource
import time

import torch

from ddpm_hf.data.replay import Replay, _RowsDue


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--shuffle_buffer_size", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shards = max(args.streams, args.rows // 10_000)
    row_groups = [[1000] * 10 for _ in range(shards)]
    started = time.perf_counter()
    replay = Replay(None, shards, args.streams, 0, args.shuffle_buffer_size, "image", None, None, None)  # order alone
    order = replay.order(0, 1, row_groups)
    took = time.perf_counter() - started
    half = len(order[0]) // 2
    started = time.perf_counter()
    _RowsDue(row_groups, order[0][half:], order[1][half:])
    due = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # (kB on Linux)
    print(f"{shards * 10_000:,} rows in {shards} shards, {args.streams} stream(s), buffer {args.shuffle_buffer_size}: "
          f"a stream of {len(order[0]):,} rows replayed in {took:.1f} s ({took / len(order[0]) * 1e6:.2f} µs a row), "
          f"its rows due from the middle in {due:.2f} s; peak RSS {peak:.2f} GB")


if __name__ == "__main__":
    main()
