"""Image operations below every model layer: Gaussian blur, patch-grid masks, seeded noise.

They take plain tensors (no model, no normalisation), so corruptions, attribution baselines and
faithfulness metrics share them without importing each other's layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from jaxtyping import Bool, Float
from torch import Tensor

PatchSpec = Sequence[int] | Tensor


def seeded_normal(
    shape: Sequence[int], seed: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise of ``shape`` from ``seed``, drawn on the CPU so a seed gives the same
    numbers on every device, then moved to ``device`` and ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator).to(device=device, dtype=dtype)


def gaussian_blur(
    x: Float[Tensor, "batch channel height width"], *, sigma: float, kernel_size: int | None = None
) -> Float[Tensor, "batch channel height width"]:
    """Separable Gaussian blur of any [batch, channel, height, width] tensor, channel by channel.

    Args:
        sigma: standard deviation of the Gaussian in pixels, > 0.
        kernel_size: odd kernel width; default ``2 * ceil(3 * sigma) + 1`` (covers +-3 sigma).

    Borders are padded by replicating the edge pixels, so a constant image stays constant.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3 * sigma) + 1
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    radius = kernel_size // 2
    offsets = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - radius
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    # one depthwise 1-D pass along the width, then one along the height
    horizontal = repeat(kernel, "k -> channel 1 1 k", channel=channels)
    vertical = repeat(kernel, "k -> channel 1 k 1", channel=channels)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=channels)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), vertical, groups=channels)


def patch_mask(
    patches: PatchSpec, grid_size: tuple[int, int]
) -> Bool[Tensor, "mask_batch grid_h grid_w"]:
    """Boolean mask over the patch grid from a patch specification.

    Args:
        patches: patch indices (row-major: patch ``p`` sits at grid ``divmod(p, grid_w)``, token
            ``n_prefix_tokens + p``), or a bool mask [grid_h, grid_w] (same for every image) or
            [batch, grid_h, grid_w] (one per image).
        grid_size: (grid_h, grid_w).

    Returns:
        Bool [1, grid_h, grid_w] or [batch, grid_h, grid_w].
    """
    grid_h, grid_w = grid_size
    n_patches = grid_h * grid_w
    patches = torch.as_tensor(patches).cpu()
    if patches.dtype == torch.bool:
        if patches.ndim not in (2, 3) or tuple(patches.shape[-2:]) != (grid_h, grid_w):
            raise ValueError(
                f"a bool patches mask must have shape [{grid_h}, {grid_w}] or [batch, {grid_h}, "
                f"{grid_w}], got {tuple(patches.shape)}"
            )
        return patches.reshape(-1, grid_h, grid_w)
    if patches.numel() and (patches.is_floating_point() or patches.is_complex()):
        raise ValueError(
            f"patches must be integer patch indices or a bool mask, got dtype {patches.dtype}"
        )
    indices = patches.long().reshape(-1)
    out_of_range = indices[(indices < 0) | (indices >= n_patches)]
    if len(out_of_range):
        raise ValueError(
            f"patches must be patch indices in [0, {n_patches - 1}], got {out_of_range.tolist()}"
        )
    mask = torch.zeros(n_patches, dtype=torch.bool)
    mask[indices] = True
    return rearrange(mask, "(one grid_h grid_w) -> one grid_h grid_w", one=1, grid_w=grid_w)
