"""Image operations below every model layer: Gaussian blur, patch-grid masks, seeded noise, fills.

They take plain tensors (no model; a normalisation only as (mean, std) numbers), so corruptions,
attribution baselines, CAAP contexts and faithfulness metrics share them without importing each
other's layers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from jaxtyping import Bool, Float
from torch import Tensor

PatchSpec = Sequence[int] | Tensor

# What replaces an image or its patches (occlusion fill, integrated-gradients baseline, CAAP
# context, deletion / insertion baseline): one vocabulary, see :func:`fill_images`.
FILLS = ("zeros", "mean", "blur")
# A word of FILLS (or a deprecated spelling: checked by check_fill, so the type says str), or a
# tensor of normalised model input of any shape broadcastable to the images.
Fill = Union[str, Float[Tensor, "..."]]
# Old spellings kept for one release, with a DeprecationWarning: old -> current.
DEPRECATED_FILLS = {"black": "zeros"}


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


def check_fill(fill: Fill, argument: str = "fill") -> Fill:
    """``fill`` in its current spelling (a deprecated one warns), or ValueError naming ``argument``.

    Args:
        fill: "zeros", "mean", "blur" (see :func:`fill_images`), a tensor, or a deprecated
            spelling of :data:`DEPRECATED_FILLS` ("black" is "zeros").
        argument: the caller's name for it ("fill", "baseline", "context"), for messages.
    """
    if isinstance(fill, Tensor):
        return fill
    if isinstance(fill, str) and fill in DEPRECATED_FILLS:
        warnings.warn(
            f"{argument}={fill!r} is deprecated and will be removed in the next release: use "
            f"{argument}={DEPRECATED_FILLS[fill]!r} (the same images)",
            DeprecationWarning,
            stacklevel=3,
        )
        return DEPRECATED_FILLS[fill]
    if isinstance(fill, str) and fill in FILLS:
        return fill
    raise ValueError(
        f"{argument} must be one of {FILLS} or a tensor of normalised model input, got {fill!r}"
    )


def fill_images(
    images: Float[Tensor, "batch channel height width"],
    fill: Fill,
    *,
    normalization: tuple[Sequence[float], Sequence[float]] | None,
    sigma: float,
    kernel_size: int | None = None,
    argument: str = "fill",
) -> Float[Tensor, "batch channel height width"]:
    """What replaces ``images`` (whole, or the patches a caller masks) under ``fill``.

    One meaning per word, for every consumer (occlusion ``fill``, integrated-gradients
    ``baseline``, CAAP ``context``, deletion / insertion ``baseline``):

    - "zeros": black pixels, 0 in every channel (``-mean / std`` after normalisation);
    - "mean": the normalisation's mean colour (0 after normalisation), the same for every image;
    - "blur": the image Gaussian-blurred with standard deviation ``sigma`` pixels (see
      :func:`gaussian_blur`; each consumer documents its ``sigma``). Blurring the normalised
      input equals normalising the blurred pixels (a per-channel affine map commutes with a
      kernel summing to 1 over edge-replicated borders);
    - a tensor: normalised model input broadcastable to ``images``.

    Args:
        images: normalised model input [batch, channel, height, width].
        fill: one of :data:`FILLS` or a tensor (deprecated spellings warn, see :func:`check_fill`).
        normalization: the per-channel (mean, std) the images were normalised with; needed by
            "zeros" only.
        sigma, kernel_size: the Gaussian of "blur".
        argument: the caller's name for ``fill``, for messages.

    Returns:
        The fill as normalised model input [batch, channel, height, width].
    """
    fill = check_fill(fill, argument)
    if isinstance(fill, Tensor):
        try:
            shape = torch.broadcast_shapes(fill.shape, images.shape)
        except RuntimeError:
            shape = None
        if shape != images.shape:
            raise ValueError(
                f"{argument} tensor must broadcast to images {tuple(images.shape)} (normalised model "
                f"input), got shape {tuple(fill.shape)}"
            )
        return fill.to(images).expand_as(images)
    if fill == "mean":
        return torch.zeros_like(images)
    if fill == "blur":
        return gaussian_blur(images, sigma=sigma, kernel_size=kernel_size)
    if normalization is None:
        raise ValueError(
            f"{argument}='zeros' (black pixels) needs the images' normalisation (mean, std): pass "
            f"data_config= or use a model with a .data_config, or pass a {argument} tensor"
        )
    mean, std = (torch.tensor(values, device=images.device, dtype=images.dtype) for values in normalization)
    black = rearrange(-mean / std, "channel -> 1 channel 1 1")  # pixel 0, normalised
    return black.expand_as(images).clone()
