"""The paper's Table 2 ablation (Ho et al. 2020, §4.2), at the scale of a CPU: the six (parameterisation, objective)
rows trained on the same data, preset, seed and number of steps, each evaluated by the same protocol, and written as a
Markdown table beside the paper's CIFAR-10 numbers, with Table 1's likelihood pair (L with fixed Σ against L_simple).

    python bench/ablation.py                              # ≈ 90 minutes on 2 CPU cores
    python bench/ablation.py --steps 200 --num_samples 100 --out runs/ablation-smoke    # a few minutes

Rows (train.py flags): μ̃ or ε prediction (--prediction_type mean / epsilon) × the true bound L with a learned
diagonal Σ (--loss vlb --variance_type learned), L with the fixed isotropic Σ = β_t (--loss vlb, the preset's
fixed_large), or the unweighted MSE of the prediction (--loss simple: ‖μ̃ − μ̃_θ‖², or L_simple for ε). Two rows train
at a time, one process and one thread each (the 2 cores), with the same global batch.

A row is marked unstable, as the paper's "–", when training stops on non-finite losses, skips non-finite updates, or
its loss diverges (the median of its last fifth of logged losses is over 3× the lowest median of any fifth); it is still evaluated when a
pipeline was saved. Evaluation (ddpm-hf evaluate, the EMA weights): FID-FMNIST, KID-FMNIST and IS-FMNIST on
--num_samples samples of --num_inference_steps steps, bits/dim on --num_bpd_images test images (sampled bound,
--bpd_timesteps terms each, with its standard error). A finished row is not trained again: rerunning the command
goes on where a stopped one ended. Writes --out/ablation.json and --out/ablation.md. Not run in CI.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from quality import add_evaluation_arguments, evaluate_arguments, evaluated, full_fashion_mnist  # bench/ on sys.path

ROOT = Path(__file__).resolve().parents[1]

# (name, --prediction_type, --loss, --variance_type or None for the preset's fixed Σ, the paper's IS, FID)
ROWS = [
    ("mean-L-learned", "mean", "vlb", "learned", "7.28 ± 0.10", "23.69"),
    ("mean-L-fixed", "mean", "vlb", None, "8.06 ± 0.09", "13.22"),
    ("mean-mse", "mean", "simple", None, "–", "–"),
    ("eps-L-learned", "epsilon", "vlb", "learned", "–", "–"),
    ("eps-L-fixed", "epsilon", "vlb", None, "7.67 ± 0.13", "13.51"),
    ("eps-simple", "epsilon", "simple", None, "9.46 ± 0.11", "3.17"),
]
LABELS = {"mean": "μ̃ prediction", "epsilon": "ε prediction"}
OBJECTIVES = {("vlb", "learned"): "L, learned diagonal Σ", ("vlb", None): "L, fixed isotropic Σ",
              ("simple", "mean"): "‖μ̃ − μ̃_θ‖²", ("simple", "epsilon"): "‖ε − ε_θ‖² (L_simple)"}
PAPER_TABLE1 = {"eps-L-fixed": "≤ 3.70", "eps-simple": "≤ 3.75"}  # CIFAR-10 test NLL, bits/dim
DIVERGED = 3.0  # the last fifth's median loss over the lowest fifth's


def train_command(args, row, data: Path, folder: Path):
    name, prediction, loss, variance, _, _ = row
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
               "--num_cpu_threads_per_process", "1", "training/train.py", "--preset", args.preset,
               "--dataset_name", str(data), "--max_train_steps", str(args.steps), "--train_batch_size",
               str(args.batch), "--seed", str(args.seed), "--prediction_type", prediction, "--loss", loss,
               "--lr_warmup_steps", "100", "--ema_warmup", "--dataloader_num_workers", "0",
               "--checkpointing_steps", str(max(args.steps // 4, 1)), "--save_images_steps", "0",
               "--num_sample_images", "16", "--ddpm_num_inference_steps", str(args.num_inference_steps),
               "--logging_steps", "1", "--max_nonfinite_steps", "20", "--output_dir", str(folder)]
    if variance:
        command += ["--variance_type", variance]
    if any(folder.glob("checkpoint-*")):
        command += ["--resume_from_checkpoint", "latest"]
    return command


def trained(folder: Path, steps: int) -> bool:
    config = folder / "training_config.json"
    return (folder / "model_index.json").is_file() and config.is_file() and \
        json.loads(config.read_text())["max_train_steps"] == steps


def loss_history(folder: Path):
    """The logged loss and skipped-update count of a run (tensorboard scalars)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses, skipped = [], 0
    for events in sorted((folder / "logs").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = accumulator.Tags()["scalars"]
        if "loss" in tags:
            losses += [(e.step, e.value) for e in accumulator.Scalars("loss")]
        if "skipped_steps" in tags:
            skipped = max([skipped] + [int(e.value) for e in accumulator.Scalars("skipped_steps")])
    return [value for _, value in sorted(dict(losses).items())], skipped


def stability(returncode: int, losses, skipped: int) -> str:
    """"stable", or why the row is unstable (the paper's "–"). Divergence compares medians of fifths of the logged
    losses: a batch of the bound's loss is heavy-tailed (an example at t = 1 carries T times its decoder term), so
    the mean of a few logged batches jumps without any divergence."""
    if returncode != 0:
        return f"training stopped (exit {returncode})"
    if not losses or not all(math.isfinite(v) for v in losses):
        return "non-finite loss"
    if skipped:
        return f"{skipped} non-finite updates skipped"
    fifth = max(len(losses) // 5, 1)
    medians = [statistics.median(losses[i:i + fifth]) for i in range(0, len(losses) - fifth + 1, fifth)]
    if medians[-1] > DIVERGED * min(medians):
        return f"loss diverged (median of the last fifth {medians[-1]:.3g}, lowest {min(medians):.3g})"
    return "stable"


def run_in_pairs(commands, env, logs):
    """Run the commands two at a time (one per core); returns their exit codes."""
    codes = {}
    pending = list(commands.items())
    while pending:
        batch, pending = pending[:2], pending[2:]
        running = {}
        for name, command in batch:
            print("$", " ".join(command), flush=True)
            log = open(logs / f"{name}.log", "ab")
            running[name] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        for name, (process, log) in running.items():
            codes[name] = process.wait()
            log.close()
            print(f"{name}: exit {codes[name]}", flush=True)
    return codes


def bits(bpd) -> str:
    return f"{bpd['bits_per_dim']:.3f} ± {bpd['stderr']:.3f}" if bpd else "–"


def markdown(summary) -> str:
    rows = ["| parameterisation | objective | paper IS | paper FID | IS-FMNIST | FID-FMNIST | KID-FMNIST | "
            "bits/dim (test) | stability |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, prediction, loss, variance, paper_is, paper_fid in ROWS:
        r = summary["rows"][name]
        objective = OBJECTIVES[(loss, variance)] if loss == "vlb" else OBJECTIVES[(loss, prediction)]
        q, b = r.get("sample_quality"), r.get("bpd")
        scores = (f"{q['inception_score']:.2f} ± {q['inception_score_std']:.2f} | {q['fid']:.1f} | {q['kid']:.1f}"
                  if q else "– | – | –")
        bpd = bits(b)
        rows.append(f"| {LABELS[prediction]} | {objective} | {paper_is} | {paper_fid} | {scores} | {bpd} | "
                    f"{r['stability']} |")
    rows += ["", "| Table 1 (NLL, test) | paper, CIFAR-10 | here |", "| --- | --- | --- |"]
    for name in PAPER_TABLE1:
        b = summary["rows"][name].get("bpd")
        label = "L, fixed isotropic Σ" if name == "eps-L-fixed" else "L_simple"
        rows.append(f"| {label} | {PAPER_TABLE1[name]} | {bits(b)} |")
    return "\n".join(rows) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps of every row")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--preset", default="small-28")
    parser.add_argument("--seed", type=int, default=0)
    add_evaluation_arguments(parser, num_samples=200, num_reference=5000, num_bpd_images=100, bpd_timesteps=25,
                             num_inference_steps=100)
    parser.add_argument("--rows", default=",".join(r[0] for r in ROWS), help="a subset of the rows, by name")
    parser.add_argument("--out", default="runs/ablation")
    args = parser.parse_args()
    chosen = args.rows.split(",")
    unknown = sorted(set(chosen) - {r[0] for r in ROWS})
    if unknown:
        parser.error(f"--rows: unknown {unknown}; the rows are {[r[0] for r in ROWS]}")
    if args.num_samples < 100:
        parser.error("--num_samples must be at least 100 (IS-FMNIST: 10 splits of at least 10 samples)")
    out = (ROOT / args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        env.pop(variable, None)
    data = full_fashion_mnist(out, env)
    rows = [r for r in ROWS if r[0] in chosen]

    to_train = {r[0]: train_command(args, r, data, out / r[0]) for r in rows if not trained(out / r[0], args.steps)}
    codes = run_in_pairs(to_train, env, logs)
    evaluations = {r[0]: [sys.executable] + evaluate_arguments(args, out / r[0], data, "bpd,fid,kid,is") +
                   ["--batch_size", "128", "--seed", str(args.seed)] for r in rows
                   if (out / r[0] / "model_index.json").is_file() and not evaluated(out / r[0])}
    run_in_pairs(evaluations, env, logs)

    summary = {"steps": args.steps, "batch": args.batch, "preset": args.preset, "seed": args.seed,
               "data": str(data), "num_samples": args.num_samples, "num_inference_steps": args.num_inference_steps,
               "num_bpd_images": args.num_bpd_images, "bpd_timesteps": args.bpd_timesteps, "rows": {}}
    for name, *_ in rows:
        losses, skipped = loss_history(out / name)
        result = {"stability": stability(codes.get(name, 0), losses, skipped),
                  "final_loss": losses[-1] if losses else None}
        if evaluated(out / name):
            done = json.loads((out / name / "eval" / "results.json").read_text())
            result.update(bpd=done.get("bpd"), sample_quality=done.get("sample_quality"))
        summary["rows"][name] = result
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    if len(rows) == len(ROWS):
        table = markdown(summary)
        (out / "ablation.md").write_text(table)
        print("\n" + table)


if __name__ == "__main__":
    main()
