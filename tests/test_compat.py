"""Outputs written by an earlier version (ddpm_hf 0.1.0, before the training loop and the data pipeline were
reorganised) still work: tests/data/before_v0_2 holds a checkpoint at step 3 and the final EMA pipeline of the same
6-step run (tiny-16, dropout 0.1, the data of ``write_images(count=64)``) in its pipeline/ folder (the layout before
the pipeline moved into --output_dir itself), with 2 samples drawn from it and the ids of the examples it trained on.
Resuming the old checkpoint must end on the old run's weights, and the old pipeline must sample the old images."""

import shutil

import numpy as np
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from runs import FAST, ROOT, final_weights, run, write_images

OLD = ROOT / "tests" / "data" / "before_v0_2"
OLD_ARGS = FAST + ["--max_train_steps", "6", "--checkpointing_steps", "3", "--checkpoints_total_limit", "2",
                   "--dropout", "0.1", "--record_example_ids"]


def test_a_checkpoint_from_before_resumes_to_the_same_weights(tmp_path):
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

