"""uint8 images ↔ the model's range [−1, 1] (x / 127.5 − 1, §3.3 of the paper), and uint8 tensors as PIL images.

Metrics and figures take uint8 images, the model takes [−1, 1]: these two functions are the only place the library
converts between them. ``pipelines/`` keeps its own copy of :func:`to_uint8`, since a pipeline module must stay one
self-contained file; both use the same operations, so they quantise bit for bit alike.
"""

import torch


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [−1, 1]: level k becomes k / 127.5 − 1."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_model_range takes uint8 images, got dtype {images.dtype}.")
    return images.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[−1, 1] images → uint8, rounded to the nearest level and clipped (samples may leave [−1, 1])."""
    return ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list:
    """uint8 (N, C, H, W) images → PIL images (grey for one channel, RGB for three)."""
    from PIL import Image

    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in images.permute(0, 2, 3, 1).numpy()]


def uint8_grid(images: torch.Tensor):
    """uint8 (N, C, H, W) images tiled into one PIL image."""
    from .pipelines import image_grid

    return image_grid(to_pil(images))
