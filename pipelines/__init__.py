"""DiffusionPipeline subclasses of ddpm_hf (installed as ``ddpm_hf.pipelines``)."""

from .pipeline_ddpm_hf import DDPMPipeline, InterpolationOutput, ProgressiveOutput, image_grid, model_card

__all__ = ["DDPMPipeline", "InterpolationOutput", "ProgressiveOutput", "image_grid", "model_card"]
