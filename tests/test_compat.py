"""Outputs written by an earlier version (ddpm_hf 0.1.0, before the training loop and the data pipeline were
reorganised) still work: tests/data/before_v0_2 holds a checkpoint at step 3 and the final EMA pipeline of the same
6-step run (tiny-16, dropout 0.1, the data of ``write_images(count=64)``) in its pipeline/ folder (the layout before
the pipeline moved into --output_dir itself), with 2 samples drawn from it and the ids of the examples it trained on.
Resuming the old checkpoint must end on the old run's weights, and the old pipeline must sample the old images."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from runs import FAST, ROOT, child_env, final_weights, run, write_images

OLD = ROOT / "tests" / "data" / "before_v0_2"
# The dropout masks that the torch which wrote tests/data/before_v0_2 draws after manual_seed(0) (the CPU kernel of
# bernoulli_ with one probability, dropout's), as a hash. torch 2.6's kernel draws others: a resume there ends about
# 1e-4 from the stored weights (139 of 144 tensors beyond 1e-5), whatever ddpm_hf does.
WRITERS_DROPOUT_DRAWS = "9a32229cae86ff07"


def _dropout_draws() -> str:
    import hashlib

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return hashlib.sha1(torch.empty(1000).bernoulli_(0.9).numpy().tobytes()).hexdigest()[:16]
OLD_ARGS = FAST + ["--max_train_steps", "6", "--checkpointing_steps", "3", "--checkpoints_total_limit", "2",
                   "--dropout", "0.1", "--record_example_ids"]


def test_a_checkpoint_from_before_resumes_to_the_same_weights(tmp_path):
    if _dropout_draws() != WRITERS_DROPOUT_DRAWS:
        pytest.skip(f"torch {torch.__version__} draws other dropout masks than the torch that wrote the checkpoint: "
                    "its resume cannot end on the stored weights")
    data = write_images(tmp_path / "data", count=64)
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(OLD / "checkpoint-3", out / "checkpoint-3")
    shutil.copytree(OLD / "pipeline", out / "pipeline")  # the old layout: the final pipeline in a pipeline/ folder
    run(OLD_ARGS + ["--dataset_name", str(data), "--output_dir", str(out), "--resume_from_checkpoint", "latest"],
        tmp_path / "log.txt")
    assert "resumed from" in (tmp_path / "log.txt").read_text() and "at step 3" in (tmp_path / "log.txt").read_text()
    old = load_file(OLD / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    new = final_weights(out)
    assert old.keys() == new.keys()
    # A wrong restored noise, data position or RNG moves Adam's updates by ~1e-4 per weight; float noise is ~1e-7.
    for key in old:
        torch.testing.assert_close(new[key], old[key], rtol=0, atol=1e-5, msg=key)
    old_ids = (OLD / "example_ids_rank0.txt").read_text().split()
    assert (out / "logs" / "example_ids_rank0.txt").read_text().split() == old_ids[3 * 4:]
    # the new final pipeline is --output_dir itself, as after diffusers' example; the superseded pipeline/ is gone
    assert not (out / "pipeline").exists() and not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert type(DiffusionPipeline.from_pretrained(out)).__name__ == "DDPMPipeline"


def test_a_pipeline_from_before_samples_the_same_images():
    from ddpm_hf import DDPMPipeline

    for folder in (OLD / "pipeline", OLD):  # the pipeline folder, or the run's --output_dir that holds it
        pipe = DDPMPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                      output_type="np").images
        np.testing.assert_allclose(images, np.load(OLD / "samples_seed0.npy"), rtol=0, atol=1e-5)



def test_an_older_dependency_installed_past_pip_is_named_at_import(tmp_path):
    """accelerate 1.1 has no Accelerator(dynamo_plugin=) and datasets 3.0 no IterableDataset.num_shards: a run failed
    deep inside training; under torch 2.5 diffusers fails at import (torch.accelerator). An install below MINIMUM_VERSIONS (made with --no-deps, or downgraded since) is named at
    import, with the command that updates it. The older versions are real distribution records (dist-info folders)
    placed first on the path, where importlib.metadata finds them as it finds any installed package."""
    # (and a version no one can order, pyarrow's here: not judged, as pip does not judge it)
    for name, old in (("torch", "2.5.1"), ("accelerate", "1.1.1"), ("datasets", "3.0.0"), ("pyarrow", "unknown-build")):
        info = tmp_path / f"{name}-{old}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {old}\n")
    failed = subprocess.run([sys.executable, "-c", "import ddpm_hf"], capture_output=True, text=True,
                            env={**child_env(), "PYTHONPATH": str(tmp_path)})
    assert failed.returncode != 0
    said = failed.stderr.strip().splitlines()[-1]
    assert said == ('ImportError: ddpm_hf needs torch>=2.6 (found 2.5.1), accelerate>=1.2 (found 1.1.1), datasets>=3.1 '
                    '(found 3.0.0): pip install -U "torch>=2.6" "accelerate>=1.2" "datasets>=3.1"'), failed.stderr[-2000:]
    # the pipeline file run as a folder's remote code (without importing ddpm_hf) loads through ddpm_hf: the same
    # message, not "needs the ddpm_hf package" (which is for ddpm_hf not installed at all)
    remote = ("import importlib.util; spec = importlib.util.spec_from_file_location('remote', "
              f"{str(ROOT / 'pipelines' / 'pipeline_ddpm_hf.py')!r}); module = importlib.util.module_from_spec(spec); "
              "spec.loader.exec_module(module); module.DDPMPipeline.from_pretrained('anything')")
    failed = subprocess.run([sys.executable, "-c", remote], capture_output=True, text=True,
                            env={**child_env(), "PYTHONPATH": str(tmp_path)})
    assert failed.stderr.strip().splitlines()[-1] == said, failed.stderr[-2000:]
