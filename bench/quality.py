"""Sample quality and likelihood on real data for a fixed CPU budget: ddpm_hf's training/train.py, with one or more
training recipes and seeds, against a loop equivalent to diffusers' example (bench/diffusers_loop.py), same preset,
data, processes and minutes for every run. Not run in CI.

    python bench/quality.py                                  # 60 minutes each, 2 DDP processes, small-32
    python bench/quality.py --minutes 15 --num_samples 500   # shorter
    python bench/quality.py --recipes paper,short --seeds 0,1 --baseline none --minutes 8   # recipes side by side

Two invocations with ``--processes 1 --threads 1`` and the same --out run side by side, one core each, as a fair
pair (every run gets the same machine); the last one to finish summarises everything trained so far in --out.

A recipe is a set of train.py flags on top of the preset (RECIPES below): ``paper`` is the preset's own (the paper's
Adam 2e-4, EMA 0.9999 with warm-up for a short run); the others are candidates for short runs. Every run gets the
same wall time (--max_train_minutes), so a recipe that costs more per step takes fewer steps.

Data: the full Fashion-MNIST (60k train / 10k test) converted to 16 parquet shards when Debian's
dataset-fashion-mnist package is installed (apt-get install dataset-fashion-mnist), else the embedded subset.
Metrics (ddpm-hf evaluate): bits/dim on --num_bpd_images test images (sampled bound, --bpd_timesteps per image),
FID-FMNIST and KID on --num_samples samples against --num_reference training images, sample grids. Writes
--out/summary.json and prints a Markdown table (every run, then the mean per recipe).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, env):
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def full_fashion_mnist(out: Path, env) -> Path:
    """The 60k/10k Fashion-MNIST as parquet shards in ``out`` (Debian's dataset-fashion-mnist), else the embedded
    10k/2k subset."""
    data = out / "fashion_mnist_full"
    if (data / "data").is_dir():
        return data
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        run([sys.executable, "-m", "ddpm_hf.cli", "data", "fashion-mnist", "--out", str(data)], env)
        return data
    print("Debian's dataset-fashion-mnist is not installed: using the embedded 10k/2k subset", flush=True)
    from ddpm_hf.data import EMBEDDED_DIR

    return Path(EMBEDDED_DIR)


def add_evaluation_arguments(parser, **defaults) -> None:
    """The ddpm-hf evaluate settings a benchmark passes on, with the benchmark's defaults."""
    parser.add_argument("--num_samples", type=int, default=defaults["num_samples"], help="samples for the sample "
                        "quality metrics")
    parser.add_argument("--num_reference", type=int, default=defaults["num_reference"])
    parser.add_argument("--num_bpd_images", type=int, default=defaults["num_bpd_images"])
    parser.add_argument("--bpd_timesteps", type=int, default=defaults["bpd_timesteps"])
    parser.add_argument("--num_inference_steps", type=int, default=defaults["num_inference_steps"])


def evaluate_arguments(args, folder: Path, data: Path, metrics: str):
    """``-m ddpm_hf.cli evaluate`` of the pipeline in ``folder``, results in folder/eval, with the flags above."""
    return ["-m", "ddpm_hf.cli", "evaluate", str(folder), "--data", str(data), "--metrics", metrics,
            "--num_samples", str(args.num_samples), "--num_reference", str(args.num_reference),
            "--num_bpd_images", str(args.num_bpd_images), "--bpd_timesteps", str(args.bpd_timesteps),
            "--num_inference_steps", str(args.num_inference_steps), "--out", str(folder / "eval")]


def evaluated(folder: Path) -> bool:
    """folder/eval holds a finished evaluation: results.json is written after each of its stages, and "seconds" once
    all are done (a stopped one is evaluated again)."""
    results = folder / "eval" / "results.json"
    return results.is_file() and "seconds" in json.loads(results.read_text())


def launch(processes, threads=2):
    if processes == 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", str(threads)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]


# train.py flags on top of the preset's (the paper's recipe): the named recipes of ddpm_hf.presets.RECIPES, and the
# Min-SNR-γ variants measured against them (docs/benchmarks.md, "Recipes for short runs")
RECIPES = {
    "paper": [],
    "short": ["--recipe", "short"],
    "short-minsnr": ["--recipe", "short", "--snr_gamma", "5"],
    "paper-minsnr": ["--snr_gamma", "5"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60, help="training wall time of every run")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of a 1-process run: 1 to run two such "
                        "invocations side by side, one core each (a fair pair: both get the same machine)")
    parser.add_argument("--preset", default="small-32")
    parser.add_argument("--global_batch", type=int, default=64)
    parser.add_argument("--lr_warmup_steps", type=int, default=500,
                        help="for every ddpm_hf run; keep it well below the steps the minutes allow")
    parser.add_argument("--recipes", default="paper", help=f"comma-separated, from {sorted(RECIPES)}; '' "
                        "for none (with --baseline diffusers: the baseline alone, e.g. beside another invocation)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, each recipe runs each")
    parser.add_argument("--baseline", choices=["diffusers", "none"], default="diffusers",
                        help="also train the diffusers example loop (seed 0) for the same minutes")
    add_evaluation_arguments(parser, num_samples=1000, num_reference=10000, num_bpd_images=1000, bpd_timesteps=50,
                             num_inference_steps=1000)
    parser.add_argument("--out", default="runs/quality")
    args = parser.parse_args()
    recipes, seeds = [r for r in args.recipes.split(",") if r], [int(seed) for seed in args.seeds.split(",")]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        parser.error(f"--recipes: unknown {unknown}; choose from {sorted(RECIPES)}")
    out = (ROOT / args.out).resolve()
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    env.pop("WORLD_SIZE", None)
    data = full_fashion_mnist(out, env)
    per_process = args.global_batch // args.processes

    runs = {}  # name → (folder, recipe)
    for recipe in recipes:
        for seed in seeds:
            folder = out / f"ddpm_hf-{recipe}-seed{seed}"
            runs[folder.name] = (folder, recipe)
            if (folder / "model_index.json").is_file():
                continue  # trained by an earlier invocation
            run(launch(args.processes, args.threads) + [
                "training/train.py", "--preset", args.preset, "--dataset_name", str(data), "--seed", str(seed),
                "--max_train_steps", "1000000", "--max_train_minutes", str(args.minutes), "--train_batch_size",
                str(per_process), "--random_flip", "--ema_warmup", "--lr_warmup_steps", str(args.lr_warmup_steps),
                "--checkpointing_steps", "2000", "--save_images_steps", "0", "--num_sample_images", "64",
                "--ddpm_num_inference_steps", "100", "--output_dir", str(folder),
                "--overwrite_output_dir"] + RECIPES[recipe], env)  # (an unfinished earlier one's: a time budget anew)
    if args.baseline == "diffusers":
        theirs = out / "diffusers_example"
        runs[theirs.name] = (theirs, "diffusers example")
        if not (out / "diffusers_example.json").is_file():
            run(launch(args.processes, args.threads) + [
                "bench/diffusers_loop.py", "--preset", args.preset, "--data_dir", str(data), "--minutes",
                str(args.minutes), "--train_batch_size", str(per_process), "--report",
                str(out / "diffusers_example.json"), "--output_dir", str(theirs)], env)

    for name, (folder, recipe) in runs.items():
        if not evaluated(folder):
            run(launch(args.processes, args.threads) + evaluate_arguments(args, folder, data, "bpd,fid,kid"), env)
    # and the runs in --out that other invocations (a side-by-side pair, an earlier call) have finished
    for folder in sorted(out.glob("ddpm_hf-*-seed*")):
        if folder.name not in runs and evaluated(folder):
            runs[folder.name] = (folder, folder.name[len("ddpm_hf-"):folder.name.rindex("-seed")])
    if "diffusers_example" not in runs and evaluated(out / "diffusers_example"):
        runs["diffusers_example"] = (out / "diffusers_example", "diffusers example")
    summary = {"minutes": args.minutes, "processes": args.processes, "preset": args.preset, "data": str(data),
               "recipes": {r: RECIPES[r] for r in dict.fromkeys(recipe for _, recipe in runs.values())
                           if r in RECIPES}, "runs": {}}
    for name, (folder, recipe) in runs.items():
        result = json.loads((folder / "eval" / "results.json").read_text())
        steps = (json.loads((out / "diffusers_example.json").read_text())["steps"] if recipe == "diffusers example"
                 else json.loads((folder / "training_config.json").read_text())["max_train_steps"])
        summary["runs"][name] = dict(result, recipe=recipe, steps=steps)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{args.minutes:g} minutes of training each, {args.processes} processes, {args.preset}\n")
    print("| run | recipe | steps in the budget | bits/dim (test) | FID-FMNIST | KID-FMNIST |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for name, r in summary["runs"].items():
        q = r["sample_quality"]
        print(f"| {name} | {r['recipe']} | {r['steps']} | {r['bpd']['bits_per_dim']:.3f} ± {r['bpd']['stderr']:.3f} "
              f"| {q['fid']:.2f} | {q['kid']:.4f} |")
    print("\n| recipe | runs | bits/dim, mean | FID-FMNIST, mean (min–max) |\n| --- | --- | --- | --- |")
    for recipe in dict.fromkeys(r["recipe"] for r in summary["runs"].values()):
        mine = [r for r in summary["runs"].values() if r["recipe"] == recipe]
        fids = [r["sample_quality"]["fid"] for r in mine]
        print(f"| {recipe} | {len(mine)} | {statistics.mean(r['bpd']['bits_per_dim'] for r in mine):.3f} | "
              f"{statistics.mean(fids):.1f} ({min(fids):.1f}–{max(fids):.1f}) |")


if __name__ == "__main__":
    main()
