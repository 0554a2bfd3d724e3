#!/usr/bin/env python
"""Soak test of training's fault handling (not in CI): for --minutes, one training run is killed again and again at
random points (during a step, a checkpoint write, a Hub upload), sometimes restarted with a file-size limit that makes
its next checkpoint fail (a full disk), while the test Hub answers 5xx, drops connections, stalls, and takes commits
after their client gave up, at random. After every interruption each visible checkpoint must load; at the end the
run's weights must equal an uninterrupted run's and the Hub must hold the final pipeline; the run's record of the
examples it trained on (--record_example_ids), kept over its launches, must equal the uninterrupted run's.

    python bench/soak.py --minutes 20 --steps 200

Rounds follow each other until the time is up; each round's final weights are compared with the uninterrupted run's.
"""

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fakehub import serve_for_benchmark  # noqa: E402  (the test Hub: stdlib only)

HUB = serve_for_benchmark({"hf_soak": "soak"}, "soak_hf_home_")  # before huggingface_hub is imported

from runs import FAST, KILL_POINTS, check_checkpoints, final_weights, kill_at, launch, run, write_images  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="time spent killing and resuming")
    p.add_argument("--steps", type=int, default=200, help="training steps of each round's run")
    p.add_argument("--checkpointing_steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ddpm_hf_soak_"))
    images = write_images(work / "images", count=max(256, 4 * args.steps + 64))
    common = FAST + ["--dataset_name", str(images), "--max_train_steps", str(args.steps), "--checkpointing_steps",
                     str(args.checkpointing_steps), "--checkpoints_total_limit", "2", "--seed", str(args.seed),
                     "--record_example_ids"]
    print(f"soak in {work}: {args.steps} steps, checkpoint every {args.checkpointing_steps}, {args.minutes} min")

    started = time.time()
    run(common + ["--output_dir", str(work / "straight")], work / "straight.log")
    print(f"uninterrupted run: {time.time() - started:.0f} s")

    hub_args = ["--push_to_hub", "--push_checkpoints", "--hub_token", "hf_soak", "--hub_timeout", "3",
                "--hub_push_attempts", "2"]
    straight, straight_ids = final_weights(work / "straight"), example_ids(work / "straight")
    stats, rounds, failures = Counter(), [], 0
    deadline = time.time() + 60 * args.minutes
    while time.time() < deadline:  # one round: a run interrupted until it finishes, then checked
        repo = f"soak/round-{len(rounds)}"
        out, log = work / f"round-{len(rounds)}", work / f"round-{len(rounds)}.log"
        launches = interrupt_until_done(common + hub_args + ["--hub_model_id", repo, "--output_dir", str(out)],
                                        out, log, rng, stats, deadline)
        run(common + hub_args + ["--hub_model_id", repo, "--resume_from_checkpoint", "latest", "--output_dir",
                                 str(out)], log)
        soaked = final_weights(out)
        worst = max(float((straight[k] - soaked[k]).abs().max()) for k in straight)
        from ddpm_hf import DDPMPipeline

        pushed = DDPMPipeline.from_pretrained(repo, token="hf_soak", cache_dir=work / "cache")
        pushed_diff = max(float((v - soaked[k]).abs().max()) for k, v in pushed.unet.state_dict().items())
        same_ids = example_ids(out) == straight_ids
        rounds.append({"launches": launches, "max_abs_diff_vs_uninterrupted": worst,
                       "max_abs_diff_hub_vs_local": pushed_diff, "hub_commits": len(HUB.repos[repo].history) - 1,
                       "example_ids_as_uninterrupted": same_ids})
        failures += not (worst <= 1e-6 and pushed_diff == 0 and same_ids)
        print(f"round {len(rounds)}: {rounds[-1]}")
    summary = {"rounds": rounds, "events": dict(sorted(stats.items())), "failed_rounds": failures,
               "minutes": round((time.time() - started) / 60, 1)}
    print(json.dumps(summary, indent=2))
    (work / "soak_summary.json").write_text(json.dumps(summary, indent=2))
    print("soak: PASS" if rounds and not failures else "soak: FAIL")
    return 0 if rounds and not failures else 1


def example_ids(run_dir: Path) -> list:
    return (run_dir / "logs" / "example_ids_rank0.txt").read_text().split()


def interrupt_until_done(train_args, out: Path, log: Path, rng: random.Random, stats: Counter, deadline: float) -> int:
    """Launch, interrupt, resume, ... until the run has written its pipeline or the time is up; returns the number
    of launches. Each interruption is a SIGKILL at a random point or a file-size limit that fails a checkpoint, under a
    random Hub fault; after each one every visible checkpoint must load."""
    launches = 0
    while time.time() < deadline and not (out / "model_index.json").exists():
        fault = rng.choice(["none", "5xx", "drop", "hang", "late"])  # injected first: the Hub applies the first match
        if fault == "5xx":
            HUB.inject("POST", "/commit/", "status", times=rng.randint(1, 8), status=rng.choice([500, 502, 503]),
                       retry_after=0)
        elif fault == "drop":
            HUB.inject("POST", "/commit/", "drop", times=rng.randint(1, 3))
        elif fault == "hang":
            HUB.inject("POST", "/commit/", "stall", times=1, seconds=5)
        elif fault == "late":  # the commit taken after its client gave up (--hub_timeout 3), maybe after newer ones
            HUB.inject("POST", "/commit/", "late", times=1, seconds=rng.uniform(3.5, 10))
        upload = HUB.inject("POST", "/commit/", "stall", times=-1, seconds=rng.uniform(0.5, 2.0))
        stats[f"hub fault {fault}"] += 1
        (out / "run_info.json").unlink(missing_ok=True)
        resume = ["--resume_from_checkpoint", "latest"] if launches else []
        disk_full = launches and rng.random() < 0.15
        limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))) if disk_full else None
        proc = launch(train_args + resume, log, preexec_fn=limit)
        launches += 1
        if disk_full:
            code = proc.wait(timeout=600)
            stats["disk full: stopped with a clear error" if code and f"could not write {out / 'checkpoint-'}" in
                  log.read_text()[-20000:] else f"disk full: exit {code}"] += 1
        else:
            stats[f"kill during {kill_at(proc, rng.choice(KILL_POINTS), out, rng, upload_fault=upload)}"] += 1
        HUB.faults.clear()
        stats["checkpoint folders verified"] += len(check_checkpoints(out))
    return launches


if __name__ == "__main__":
    sys.exit(main())
