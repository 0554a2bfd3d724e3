"""ddpm_hf: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020) for the Hugging Face ecosystem."""

__version__ = "0.2.0"

# The oldest versions this package runs with; below them it fails at first use (torch 2.5: diffusers 0.41 and later
# call torch.accelerator at import, and transformers 5 counts an older torch as absent; diffusers 0.34 with
# transformers 5: an ImportError inside diffusers; datasets 3.0: no IterableDataset.num_shards; accelerate 1.1: no
# Accelerator(dynamo_plugin=)). setup.py requires them, and importing ddpm_hf names any older one installed past
# pip's resolver (--no-deps, a later downgrade) before it fails somewhere deep. The suite runs with constraints.txt.
MINIMUM_VERSIONS = {
    "torch": "2.6", "diffusers": "0.35", "transformers": "5.0", "accelerate": "1.2", "datasets": "3.1",
    # huggingface_hub 1.0: set_client_factory (the upload timeout); pyarrow 24 aborts at exit (see data/sources.py);
    # Pillow 10.3: 16-bit grey PNGs open as I;16 (scaled to 8 bits, see data/decoding.py)
    "huggingface_hub": "1.0", "pyarrow": "25", "Pillow": "10.3",
}


def _check_installed_versions() -> None:
    """ImportError naming every installed package older than MINIMUM_VERSIONS says, and the command that updates
    them (a package not installed is named by its own import)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version

    too_old = {}
    for name, least in MINIMUM_VERSIONS.items():
        try:
            found = version(name)
            older = Version(found) < Version(least)
        except (PackageNotFoundError, InvalidVersion):  # (a version pip could not order either: not judged)
            continue
        if older:
            too_old[name] = (found, least)
    if too_old:
        raise ImportError("ddpm_hf needs " + ", ".join(f"{name}>={least} (found {found})" for name, (found, least)
                                                       in too_old.items())
                          + ": pip install -U " + " ".join(f'"{name}>={least}"' for name, (_, least) in too_old.items()))


_check_installed_versions()

from typing import TYPE_CHECKING  # noqa: E402

from . import processes  # noqa: F401,E402  (first of ours: it records this process's parent before torch is imported)
from .presets import PRESETS, unet_config  # noqa: E402
from .scheduler import DDPMScheduler, DDPMSchedulerOutput  # noqa: E402
from .unet import DDPMUNet, DDPMUNetOutput  # noqa: E402

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
