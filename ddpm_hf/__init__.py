"""ddpm_hf: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020) for the Hugging Face ecosystem."""

__version__ = "0.1.0"

from .pipelines import DDPMPipeline
from .presets import PRESETS, unet_config
from .scheduler import DDPMScheduler, DDPMSchedulerOutput
from .unet import DDPMUNet, DDPMUNetOutput

__all__ = ["DDPMPipeline", "DDPMScheduler", "DDPMSchedulerOutput", "DDPMUNet", "DDPMUNetOutput", "PRESETS", "unet_config", "__version__"]
