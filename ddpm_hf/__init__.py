"""ddpm_hf: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020) for the Hugging Face ecosystem."""

__version__ = "0.1.0"

from .scheduler import DDPMScheduler, DDPMSchedulerOutput

__all__ = ["DDPMScheduler", "DDPMSchedulerOutput", "__version__"]
