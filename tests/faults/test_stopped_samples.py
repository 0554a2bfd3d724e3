"""Sampling that is stopped goes on where it was: `ddpm-hf sample` and `ddpm-hf evaluate` write every image as soon as
its batch is made (under samples.json, the key of the pipeline and settings that made them), and a rerun of the same
command makes only the missing ones. A real SIGKILL stops the command; the oracle is an uninterrupted run."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_pipeline
from runs import child_env

from ddpm_hf.cli import main as cli

SAMPLE = ["--num_images", "24", "--batch_size", "4", "--num_inference_steps", "100"]  # about 0.3 s per batch here


@pytest.fixture(scope="module")
def pipe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "pipe"
    tiny_pipeline(num_train_timesteps=1000).save_pretrained(folder)
    return folder


def _samples(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if re.fullmatch(r"\d{5}\.png", p.name))


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in _samples(folder)}


def _read(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path)))


def _stamps(folder: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _samples(folder)}


def test_a_killed_sample_command_goes_on_where_it_was(pipe_folder, tmp_path):
    assert cli(["sample", str(pipe_folder), *SAMPLE, "--out", str(tmp_path / "whole")]) == 0
    whole = _files(tmp_path / "whole")
    assert len(whole) == 24

    out = tmp_path / "stopped"
    log = open(tmp_path / "stopped.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ddpm_hf.cli", "sample", str(pipe_folder), *SAMPLE, "--out",
                             str(out)], stdout=log, stderr=subprocess.STDOUT, env=child_env())
    deadline = time.monotonic() + 300
    while (not out.is_dir() or len(_samples(out)) < 4) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    made = _stamps(out)
    assert 4 <= len(made) < 24, (len(made), (tmp_path / "stopped.log").read_text()[-2000:])

    # a hole, and batches of 3 now: every image must still come from its own generator, not from its batch's
    os.remove(out / "00001.png")
    del made["00001.png"]
    assert cli(["sample", str(pipe_folder), *SAMPLE, "--batch_size", "3", "--out", str(out)]) == 0
    assert sorted(_files(out)) == sorted(whole)
    # the uninterrupted run's images: to a level, where the CPU's convolutions round otherwise in a batch of 3 than
    # of 4 (1 level of 6144, 2026-11-28). An image drawn from other noise differs in most of its levels, by many.
    levels = torch.stack([(_read(out / name).int() - _read(tmp_path / "whole" / name).int()).abs() for name in whole])
    assert levels.max() <= 1 and (levels > 0).float().mean() < 0.01, f"{levels.max()}, {(levels > 0).sum()} levels"
    assert {name: _stamps(out)[name] for name in made} == made  # those made before the kill were not made again
    assert not list(out.glob(".*.tmp"))


def test_samples_of_another_setting_are_replaced_and_foreign_files_refused(pipe_folder, tmp_path):
    short = ["--batch_size", "4", "--num_inference_steps", "5"]
    assert cli(["sample", str(pipe_folder), "--num_images", "12", *short, "--out", str(tmp_path / "a")]) == 0
    assert cli(["sample", str(pipe_folder), "--num_images", "8", *short, "--seed", "7", "--out",
                str(tmp_path / "b")]) == 0
    # into a: another seed and fewer images; none of a's images may stay
    assert cli(["sample", str(pipe_folder), "--num_images", "8", *short, "--seed", "7", "--out",
                str(tmp_path / "a")]) == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert json.loads((tmp_path / "a" / "samples.json").read_text())["seed"] == 7

    # fewer images, same setting: the first ones stay as they are, the others go; other files are left alone
    (tmp_path / "a" / "2023_trip.png").write_bytes(b"not ours")
    before = _stamps(tmp_path / "a")
    assert cli(["sample", str(pipe_folder), "--num_images", "5", *short, "--seed", "7", "--out",
                str(tmp_path / "a")]) == 0
    assert _stamps(tmp_path / "a") == {name: before[name] for name in sorted(before)[:5]}
    assert (tmp_path / "a" / "2023_trip.png").read_bytes() == b"not ours"

    # samples an earlier version made (its key's format, "ddpm_hf samples 1": image i seeded seed + i) are ours,
    # made under another key: replaced, not refused
    key = json.loads((tmp_path / "a" / "samples.json").read_text())
    (tmp_path / "a" / "samples.json").write_text(json.dumps(dict(key, format="ddpm_hf samples 1")))
    assert cli(["sample", str(pipe_folder), "--num_images", "8", *short, "--seed", "7", "--out",
                str(tmp_path / "a")]) == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _stamps(tmp_path / "a")["00000.png"] != before["00000.png"]  # made again

    mine = tmp_path / "mine"  # numbered PNGs that no ddpm-hf command wrote
    mine.mkdir()
    (mine / "00003.png").write_bytes((tmp_path / "b" / "00003.png").read_bytes())
    with pytest.raises(SystemExit) as refused:
        cli(["sample", str(pipe_folder), "--num_images", "8", *short, "--out", str(mine)])
    assert "holds numbered PNG files (00003.png, ...) without the samples.json" in str(refused.value.code)
    (mine / "samples.json").write_text('{"photos": 2}')  # nor a samples.json of someone else's
    with pytest.raises(SystemExit) as refused:
        cli(["sample", str(pipe_folder), "--num_images", "8", *short, "--out", str(mine)])
    assert "samples.json is not the samples key ddpm-hf writes" in str(refused.value.code)
    assert sorted(p.name for p in mine.iterdir()) == ["00003.png", "samples.json"]


def test_evaluate_keeps_its_samples_and_a_rerun_reuses_them(pipe_folder, tmp_path):
    flags = ["--metrics", "fid,kid", "--num_samples", "16", "--num_reference", "32", "--batch_size", "4",
             "--num_inference_steps", "5"]
    out = tmp_path / "eval"
    assert cli(["evaluate", str(pipe_folder), *flags, "--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())["sample_quality"]
    # they are the images `ddpm-hf sample` makes with the evaluation's seed
    assert cli(["sample", str(pipe_folder), "--num_images", "16", "--batch_size", "4", "--num_inference_steps", "5",
                "--seed", str(10**6), "--out", str(tmp_path / "sampled")]) == 0
    assert _files(out / "samples") == _files(tmp_path / "sampled")

    for path in _samples(out / "samples")[::2]:  # as if stopped half-way
        os.remove(path)
    kept = _stamps(out / "samples")
    assert cli(["evaluate", str(pipe_folder), *flags, "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())["sample_quality"]
    assert again == first
    assert {name: _stamps(out / "samples")[name] for name in kept} == kept
    assert len(_files(out / "samples")) == 16


def test_a_killed_evaluate_keeps_the_bound_it_had_computed(pipe_folder, tmp_path):
    """results.json is written at the start (an earlier evaluation's is not taken for this one's) and after each
    stage: an evaluation killed while it samples for FID (after its exact bound, minutes of work at full size) keeps
    the bound; "seconds" says whether every stage was done."""
    (out := tmp_path / "eval").mkdir()
    (out / "results.json").write_text(json.dumps({"bpd": {"bits_per_dim": -1.0}, "seconds": 1.0}))  # an earlier one
    log = open(tmp_path / "eval.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ddpm_hf.cli", "evaluate", str(pipe_folder), "--metrics", "bpd,fid",
                             "--num_bpd_images", "2", "--num_samples", "64", "--num_reference", "16", "--batch_size",
                             "4", "--num_inference_steps", "100", "--out", str(out)],
                            stdout=log, stderr=subprocess.STDOUT, env=child_env())

    def bound_written():  # this run's bound (the earlier file has no "exact"); results.json is replaced whole
        return "exact" in json.loads((out / "results.json").read_text()).get("bpd", {})

    deadline = time.monotonic() + 300
    while not bound_written() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "eval.log").read_text()[-2000:]  # killed, not finished
    results = json.loads((out / "results.json").read_text())
    assert results["bpd"]["exact"] and results["bpd"]["num_images"] == 2 and results["bpd"]["bits_per_dim"] > 0
    assert "sample_quality" not in results and "seconds" not in results

    # without a bound: killed while sampling, the earlier evaluation's results are gone all the same
    (other := tmp_path / "other").mkdir()
    (other / "results.json").write_text(json.dumps({"sample_quality": {"fid": 1.0}, "seconds": 1.0}))
    proc = subprocess.Popen([sys.executable, "-m", "ddpm_hf.cli", "evaluate", str(pipe_folder), "--metrics", "fid",
                             "--num_samples", "64", "--num_reference", "16", "--batch_size", "4",
                             "--num_inference_steps", "100", "--out", str(other)],
                            stdout=log, stderr=subprocess.STDOUT, env=child_env())
    while (not (other / "samples").is_dir() or not _samples(other / "samples")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "eval.log").read_text()[-2000:]
    results = json.loads((other / "results.json").read_text())
    assert results["data"] == "embedded:fashion_mnist" and "sample_quality" not in results and "seconds" not in results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's kernel choice per batch size (bench/gpu.sh runs it)")
def test_samples_depend_on_the_batch_size_on_the_gpu_by_a_level_at_most(pipe_folder, monkeypatch):
    """What a resumed command's batches rely on there, within one process and with cuDNN timing its kernels as the
    commands have it (a new process may time them otherwise); on the CPU the kill test above allows as little.
    cuDNN's kernels differ by batch size, so a few levels are one off: 0.8 % of them on an H100 (2026-11-27, with
    torch's default TF32 convolutions). An image drawn from other noise, or put in another image's place, differs
    in most of its levels, by many."""
    from ddpm_hf.evaluation import generate_uint8, load_pipeline

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    pipe = load_pipeline(str(pipe_folder), "cuda")
    whole, pieces = (generate_uint8(pipe, 12, batch, 20, seed=0) for batch in (12, 5))
    levels = (whole.int() - pieces.int()).abs()
    differ = (levels > 0).float().mean()
    assert levels.max() <= 1 and differ < 0.05, f"{differ:.2e} of the levels differ, by up to {levels.max()}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sampling and features on the GPU (bench/gpu.sh runs it)")
def test_evaluate_on_the_gpu_agrees_with_the_host(pipe_folder, tmp_path):
    """`ddpm-hf evaluate` samples and extracts its features on the GPU: the scores agree with the host's (the images
    may differ by a level here and there: other kernels, other floats)."""
    flags = ["--metrics", "fid,kid,is", "--num_samples", "20", "--is_splits", "2", "--num_reference", "40",
             "--batch_size", "10", "--num_inference_steps", "5"]
    quality = {}
    for device in ("cpu", "cuda"):
        assert cli(["evaluate", str(pipe_folder), *flags, "--device", device, "--out", str(tmp_path / device)]) == 0
        quality[device] = json.loads((tmp_path / device / "results.json").read_text())["sample_quality"]
    for score in ("fid", "inception_score"):
        assert quality["cuda"][score] == pytest.approx(quality["cpu"][score], rel=0.02), (score, quality)


def test_a_rerun_that_fails_before_sampling_leaves_the_earlier_samples(pipe_folder, tmp_path, monkeypatch):
    """A rerun under another setting replaces the folder's samples, but only once it can sample: one that fails
    first (here accelerate's dynamo settings name a backend this machine cannot compile with) leaves the earlier
    command's images and key as they were."""
    out, short = tmp_path / "a", ["--num_images", "4", "--batch_size", "4", "--num_inference_steps", "5"]
    assert cli(["sample", str(pipe_folder), *short, "--out", str(out)]) == 0
    kept = sorted(out.iterdir()) + [tmp_path / "a_grid.png"]  # the 4 images, samples.json, and the grid beside them
    before = {path.name: path.read_bytes() for path in kept}
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "TVM")
    with pytest.raises((SystemExit, RuntimeError)):
        cli(["sample", str(pipe_folder), *short, "--out", str(out)])
    assert {path.name: path.read_bytes() for path in sorted(out.iterdir()) + [tmp_path / "a_grid.png"]} == before
    assert len(before) == 6
    # evaluate alike: its sampler is compiled (and its bound computed) before its samples folder is touched
    flags = ["--metrics", "fid", "--num_samples", "4", "--num_reference", "8", "--batch_size", "4",
             "--num_inference_steps", "5", "--out", str(tmp_path / "eval")]
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
    assert cli(["evaluate", str(pipe_folder), *flags]) == 0
    before = {path.name: path.read_bytes() for path in (tmp_path / "eval" / "samples").iterdir()}
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "TVM")
    with pytest.raises((SystemExit, RuntimeError)):
        cli(["evaluate", str(pipe_folder), *flags])
    assert {path.name: path.read_bytes() for path in (tmp_path / "eval" / "samples").iterdir()} == before
    assert len(before) == 5
