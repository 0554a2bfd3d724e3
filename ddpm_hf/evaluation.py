"""The paper's evaluations on a dataset: bits/dim of test images, rate–distortion, sample grids, FID/KID."""

import numpy as np
import torch

from .data import find_image_column, load_image_dataset, preprocess
from .likelihood import bits_per_dim


def load_eval_images(dataset_name, num_images: int, resolution: int, channels: int, split: str = "test",
                     dataset_config_name=None, train_data_dir=None, image_column=None) -> torch.Tensor:
    """The first ``num_images`` images of ``split`` as uint8 (N, C, H, W), centre-cropped to ``resolution``."""
    dataset = load_image_dataset(dataset_name, dataset_config_name, train_data_dir, split=split, streaming=True)
    column = find_image_column(dataset.features, image_column)
    rng = np.random.default_rng(0)
    images = []
    for row in dataset:
        array = preprocess(row[column], resolution, channels, center_crop=True, flip=False, rng=rng)
        images.append(np.round((array + 1) * 127.5).astype(np.uint8))
        if len(images) == num_images:
            break
    if not images:
        raise ValueError(f"the {split} split has no images.")
    return torch.from_numpy(np.stack(images))


def quick_bits_per_dim(pipe, args, resolution: int, num_images: int = 64, num_timesteps: int = 20) -> float:
    """A sampled bits/dim estimate on the first test images (for monitoring during training)."""
    images = load_eval_images(args.dataset_name, num_images, resolution, pipe.unet.config.in_channels,
                              dataset_config_name=args.dataset_config_name, train_data_dir=args.train_data_dir,
                              image_column=args.image_column)
    return bits_per_dim(pipe.unet, pipe.scheduler, images, num_timesteps=num_timesteps, progress=False).mean
