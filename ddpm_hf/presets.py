"""Named model configurations. A preset is a plain ``UNet2DModel``-style config dict (usable with
``DDPMUNet.from_config`` and ``UNet2DModel.from_config`` alike) plus the scheduler and training settings the paper used
with it."""

import copy
from typing import Any, Dict

# The paper's CIFAR-10 network (Appendix B; the original code's `unet2d16b2`): 35,746,307 parameters.
_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3,
    block_out_channels=[128, 256, 256, 256], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2D", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
    freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, act_fn="silu",
    resnet_time_scale_shift="default", dropout=0.1,
)

# The paper's 256×256 network (LSUN, CelebA-HQ): ch_mult (1, 1, 2, 2, 4, 4), attention at 16×16, 114 M parameters.
_256 = dict(
    _CIFAR10, sample_size=256, dropout=0.0,
    block_out_channels=[128, 128, 256, 256, 512, 512],
    down_block_types=["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
)

# Small networks for 1-channel 28/32 px data (Fashion-MNIST, MNIST) that train in minutes on a CPU: the paper's
# design (attention at the middle resolution, the original embedding and padding) at a fraction of the width.
_SMALL = dict(
    _CIFAR10, sample_size=32, in_channels=1, out_channels=1, dropout=0.1,
    block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=8,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
)
# 28×28 halves to 14 and 7: two resolution levels of the same blocks.
_SMALL28 = dict(
    _SMALL, sample_size=28, block_out_channels=[32, 64],
    down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
)
_TINY = dict(
    _SMALL, sample_size=16, block_out_channels=[16, 32], norm_num_groups=8, dropout=0.0,
    down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
)

# What the paper trained each with (§4, Appendix B); the training script reads these as defaults.
_PAPER_TRAINING = dict(learning_rate=2e-4, lr_warmup_steps=5000, train_batch_size=128, max_grad_norm=1.0,
                       ema_max_decay=0.9999, random_flip=True, variance_type="fixed_large", max_train_steps=800_000)

PRESETS: Dict[str, Dict[str, Any]] = {
    "ddpm-cifar10": {"unet": _CIFAR10, "training": _PAPER_TRAINING},
    "ddpm-256": {"unet": _256, "training": dict(_PAPER_TRAINING, learning_rate=2e-5, train_batch_size=64,
                                                 random_flip=True)},
    "small-32": {"unet": _SMALL, "training": dict(_PAPER_TRAINING, lr_warmup_steps=100, train_batch_size=64,
                                                  random_flip=False, max_train_steps=2000)},
    "small-28": {"unet": _SMALL28, "training": dict(_PAPER_TRAINING, lr_warmup_steps=100, train_batch_size=64,
                                                    random_flip=False, max_train_steps=2000)},
    "tiny-16": {"unet": _TINY, "training": dict(_PAPER_TRAINING, lr_warmup_steps=10, train_batch_size=16,
                                                random_flip=False, max_train_steps=50)},
}


# Training recipes: settings laid over the preset's (the paper's) before any flag. "paper" changes nothing. "short" is
# for runs of minutes to hours on the small networks, chosen against "paper" at equal wall time (bench/quality.py,
# docs/benchmarks.md "Recipes for short runs"): a network of 0.7 M parameters takes a 5× larger step than the paper's
# 35.7 M one, which improved both FID-FMNIST and bits/dim there. Min-SNR-γ weighting (--snr_gamma 5) was measured too
# and left out: it improved FID a little further but cost 0.7 bits/dim, since it weights down the nearly noise-free
# timesteps that dominate the bound.
RECIPES: Dict[str, Dict[str, Any]] = {
    "paper": {},
    "short": {"learning_rate": 1e-3},
}
# The presets a recipe was measured on; the paper's networks keep the paper's recipe.
RECIPE_PRESETS = {"paper": tuple(PRESETS), "short": ("small-28", "small-32", "tiny-16")}


def unet_config(name: str, **overrides: Any) -> Dict[str, Any]:
    """The U-Net config of preset ``name`` (a fresh copy), with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}.")
    return dict(copy.deepcopy(PRESETS[name]["unet"]), **overrides)


def training_defaults(name: str, recipe: str = "paper") -> Dict[str, Any]:
    """The training settings the preset comes with (the paper's recipe for the paper's networks), with ``recipe``'s
    laid over them."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}.")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(sorted(RECIPES))}.")
    if name not in RECIPE_PRESETS[recipe]:
        raise ValueError(f"--recipe {recipe} was measured on the presets {', '.join(RECIPE_PRESETS[recipe])}, not on "
                         f"{name}: train {name} with --recipe paper (its own settings), or set --learning_rate and "
                         "the other flags yourself")
    return dict(PRESETS[name]["training"], **RECIPES[recipe])
