"""Sample quality and likelihood on real data for a fixed CPU budget: ddpm_hf's training/train.py vs a loop equivalent
to diffusers' example (bench/diffusers_loop.py), same preset, data, processes and minutes. Not run in CI.

    python bench/quality.py                                  # 60 minutes each, 2 DDP processes, small-32
    python bench/quality.py --minutes 15 --num_samples 500   # shorter

Data: the full Fashion-MNIST (60k train / 10k test) converted to 16 parquet shards when Debian's
dataset-fashion-mnist package is installed (apt-get install dataset-fashion-mnist), else the embedded subset.
Metrics (ddpm-hf evaluate): bits/dim on --num_bpd_images test images (sampled bound, --bpd_timesteps per image),
FID-FMNIST and KID on --num_samples samples against --num_reference training images, sample grids, and for ours the
rate–distortion curve. Writes --out/summary.json and prints a Markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, env):
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def launch(processes):
    if processes == 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "2"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--preset", default="small-32")
    parser.add_argument("--global_batch", type=int, default=64)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--num_reference", type=int, default=10000)
    parser.add_argument("--num_bpd_images", type=int, default=1000)
    parser.add_argument("--bpd_timesteps", type=int, default=50)
    parser.add_argument("--num_inference_steps", type=int, default=1000)
    parser.add_argument("--out", default="runs/quality")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    env.pop("WORLD_SIZE", None)

    data = out / "fashion_mnist_full"
    if not (data / "data").is_dir():
        if Path("/usr/share/datasets/fashion-mnist").is_dir():
            run([sys.executable, "-m", "ddpm_hf.cli", "data", "fashion-mnist", "--out", str(data)], env)
        else:
            print("Debian's dataset-fashion-mnist is not installed: using the embedded 10k/2k subset", flush=True)
            from ddpm_hf.data import EMBEDDED_DIR

            data = EMBEDDED_DIR
    per_process = args.global_batch // args.processes

    ours = out / "ddpm_hf"
    run(launch(args.processes) + [
        "training/train.py", "--preset", args.preset, "--dataset_name", str(data), "--max_train_steps", "1000000",
        "--max_train_minutes", str(args.minutes), "--train_batch_size", str(per_process), "--random_flip",
        "--ema_warmup", "--lr_warmup_steps", "500", "--checkpointing_steps", "2000", "--save_images_steps", "0",
        "--num_sample_images", "64", "--ddpm_num_inference_steps", "100", "--output_dir", str(ours)], env)
    theirs = out / "diffusers_example"
    run(launch(args.processes) + [
        "bench/diffusers_loop.py", "--preset", args.preset, "--data_dir", str(data), "--minutes", str(args.minutes),
        "--train_batch_size", str(per_process), "--report", str(out / "diffusers_example.json"),
        "--output_dir", str(theirs)], env)

    summary = {"minutes": args.minutes, "processes": args.processes, "preset": args.preset, "data": str(data)}
    for name, folder in (("ddpm_hf", ours), ("diffusers_example", theirs)):
        metrics = "bpd,fid,kid" + (",progressive" if name == "ddpm_hf" else "")
        run(launch(args.processes) + [
            "-m", "ddpm_hf.cli", "evaluate", str(folder), "--data", str(data), "--metrics", metrics,
            "--num_samples", str(args.num_samples), "--num_reference", str(args.num_reference),
            "--num_bpd_images", str(args.num_bpd_images), "--bpd_timesteps", str(args.bpd_timesteps),
            "--num_inference_steps", str(args.num_inference_steps), "--out", str(folder / "eval")], env)
        summary[name] = json.loads((folder / "eval" / "results.json").read_text())
    summary["ddpm_hf"]["steps"] = json.loads((ours / "training_config.json").read_text())["max_train_steps"]
    summary["diffusers_example"]["steps"] = json.loads((out / "diffusers_example.json").read_text())["steps"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n| training | steps in the budget | bits/dim (test) | FID-FMNIST | KID-FMNIST |\n| --- | --- | --- | --- | --- |")
    for name in ("ddpm_hf", "diffusers_example"):
        r = summary[name]
        q = r["sample_quality"]
        print(f"| {name} | {r['steps']} | {r['bpd']['bits_per_dim']:.3f} ± {r['bpd']['stderr']:.3f} | "
              f"{q['fid']:.2f} | {q['kid']:.3f} |")


if __name__ == "__main__":
    main()
