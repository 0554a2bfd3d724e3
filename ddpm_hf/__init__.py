"""ddpm_hf: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020) for the Hugging Face ecosystem."""

__version__ = "0.2.0"

from typing import TYPE_CHECKING

from . import processes  # noqa: F401  (first: it records this process's parent before torch is imported)
from .presets import PRESETS, unet_config
from .scheduler import DDPMScheduler, DDPMSchedulerOutput
from .unet import DDPMUNet, DDPMUNetOutput

if TYPE_CHECKING:
    from .pipelines import DDPMPipeline


def __getattr__(name):
    """``ddpm_hf.DDPMPipeline``, imported at first use: diffusers' pipeline module imports every model family of
    diffusers (about 5 s here), which a training run needs only when it samples or saves, and a refused command never."""
    if name == "DDPMPipeline":
        from .pipelines import DDPMPipeline

        globals()[name] = DDPMPipeline
        return DDPMPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), "DDPMPipeline"})

__all__ = ["DDPMPipeline", "DDPMScheduler", "DDPMSchedulerOutput", "DDPMUNet", "DDPMUNetOutput", "PRESETS", "unet_config", "__version__"]
