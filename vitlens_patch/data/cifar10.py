"""CIFAR-10 class names and the canvas images with a known object box.

Images are read with :func:`vitlens_patch.data.folder.load_image_folder`.

Two input kinds are used throughout the project:

- *full frame*: a 32x32 CIFAR-10 image upsampled to the model's input size;
- *canvas*: the 32x32 image pasted at a random position on a larger canvas whose background is
  smooth random noise (no class evidence), so every canvas image has a known object box.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vitlens_patch.data.folder import LabelledImages

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
def resize_images(images: Tensor, size: int) -> Tensor:
    """uint8 or float [batch, channel, h, w] -> float in [0, 1], [batch, channel, size, size]."""
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def smooth_noise_background(
    batch: int, canvas_size: int, generator: torch.Generator, channels: int = 3
) -> Tensor:
    """Random low-frequency colour noise, float [batch, channel, canvas_size, canvas_size] in [0, 1].

    Class-independent: a coarse 4x4 Gaussian field upsampled bicubically, plus faint pixel noise.
    """
    coarse = 0.5 + 0.2 * torch.randn(batch, channels, 4, 4, generator=generator)
    field = F.interpolate(coarse, size=(canvas_size, canvas_size), mode="bicubic", align_corners=False)
    field = field + 0.03 * torch.randn(batch, channels, canvas_size, canvas_size, generator=generator)
    return field.clamp(0, 1)


def paste_on_canvas(
    images: Tensor, canvas_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Paste each image at a random position on a smooth-noise canvas.

    Args:
        images: uint8 or [0, 1] float [batch, channel, h, w] with h, w <= canvas_size.
        canvas_size: side of the square canvas in pixels.
        generator: seeds background and positions.

    Returns:
        canvases: float [batch, channel, canvas_size, canvas_size] in [0, 1].
        boxes: int64 [batch, 4] as (x_min, y_min, x_max, y_max) in canvas pixels, the convention of
            ``vitlens_patch.metrics.boxes_to_masks``.
    """
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    batch, channels, height, width = images.shape
    if height > canvas_size or width > canvas_size:
        raise ValueError(f"canvas_size must be >= image size {height}x{width}, got {canvas_size}")
    canvases = smooth_noise_background(batch, canvas_size, generator, channels)
    tops = torch.randint(0, canvas_size - height + 1, (batch,), generator=generator)
    lefts = torch.randint(0, canvas_size - width + 1, (batch,), generator=generator)
    for i in range(batch):
        top, left = int(tops[i]), int(lefts[i])
        canvases[i, :, top : top + height, left : left + width] = images[i]
    boxes = torch.stack([lefts, tops, lefts + width, tops + height], 1)
    return canvases, boxes


def canvas_test_set(
    images: LabelledImages, canvas_size: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """The deterministic canvas version of a test set: (canvases [batch, 3, S, S], boxes [batch, 4])."""
    return paste_on_canvas(images.images, canvas_size, torch.Generator().manual_seed(seed))
