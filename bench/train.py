"""Training throughput: training/train.py vs a loop equivalent to diffusers' train_unconditional.py, on the same
small preset, data (the embedded Fashion-MNIST subset), batch and machine, one process and 1 thread each.

    python bench/train.py                 # small-28, batch 64, 40 steps, steady-state images/s from step 10 on
    python bench/train.py --preset small-32 --steps 30
    python bench/train.py --processes 2   # both sides under `accelerate launch`, 2 DDP processes (gloo) of 1 thread

The diffusers side is bench/diffusers_loop.py. Each side runs in its own child process (one after the other, same
settings, OMP_NUM_THREADS=1 and torch.set_num_threads(1)), so that its peak RSS (of one process) can be read;
images/s is measured between step --warmup and the last step (start-up excluded). Prints one
``ratio ours/diffusers`` line for throughput (above 1: ours is faster) and one for peak memory.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OURS = textwrap.dedent("""
    import json, resource, runpy, sys
    import torch
    torch.set_num_threads(1)
    sys.argv = ["training/train.py"] + sys.argv[1:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as done:  # train.py ends with sys.exit(main())
        if done.code not in (None, 0):
            raise
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def _launcher(processes: int):
    """The interpreter, or ``accelerate launch`` of ``processes`` DDP processes on the CPU."""
    if processes == 1:
        return [sys.executable]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(port)]


def _run(script, args, env, processes):
    result = subprocess.run([*_launcher(processes), str(script), *args], capture_output=True, text=True, cwd=ROOT,
                            env=env)
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
    parser.add_argument("--processes", type=int, default=1, help="DDP processes per side (--batch is per process)")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", **({"ACCELERATE_USE_CPU": "1"} if args.processes > 1 else {}))
    env.pop("WORLD_SIZE", None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ours"
        ours_script = Path(tmp) / "ours.py"
        ours_script.write_text(OURS)
        ours = _run(ours_script, ["--preset", args.preset, "--max_train_steps", str(args.steps), "--train_batch_size",
                                  str(args.batch), "--checkpointing_steps", "0", "--num_sample_images", "1",
                                  "--ddpm_num_inference_steps", "2", "--output_dir", str(out), "--dropout", "0.1"],
                    env, args.processes)
        times = _step_times(out / "logs")
        images = (args.steps - args.warmup) * args.batch * args.processes
        ours_rate = images / (times[args.steps] - times[args.warmup])
        report = Path(tmp) / "diffusers.json"
        result = subprocess.run([*_launcher(args.processes), str(ROOT / "bench" / "diffusers_loop.py"), "--preset",
                                 args.preset, "--steps", str(args.steps), "--train_batch_size", str(args.batch),
                                 "--report", str(report)], capture_output=True, text=True, cwd=ROOT, env=env)
        if result.returncode:
            raise SystemExit(f"diffusers loop failed:\n{result.stderr[-4000:]}")
        theirs = json.loads(report.read_text())
    step_times = {int(k): v for k, v in theirs["step_times"].items()}
    theirs_rate = images / (step_times[args.steps] - step_times[args.warmup])
    print(f"preset {args.preset}, batch {args.batch} per process, steps {args.warmup}..{args.steps}, "
          f"{args.processes} process(es) of 1 thread, CPU")
    print(f"ours      {ours_rate:7.1f} img/s  peak RSS {ours['maxrss_kib'] / 1024:7.0f} MiB")
    print(f"diffusers {theirs_rate:7.1f} img/s  peak RSS {theirs['maxrss_kib'] / 1024:7.0f} MiB")
    print(f"ratio ours/diffusers train throughput: {ours_rate / theirs_rate:.3f}")
    print(f"ratio ours/diffusers train peak memory: {ours['maxrss_kib'] / theirs['maxrss_kib']:.3f}")


if __name__ == "__main__":
    main()
