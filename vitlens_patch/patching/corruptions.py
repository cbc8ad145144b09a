"""Corruptions for causal tracing: what the corrupted run sees.

Two kinds:

- *pixel corruptions* map normalised model input to normalised model input
  ``[batch, channel, height, width] -> [batch, channel, height, width]``. Each one undoes the
  model's normalisation (``DataConfig.denormalize``), corrupts the [0, 1] pixels and normalises
  again, so "grayscale" or "black" mean what they say whatever the model's mean/std:
  :func:`corrupt_grayscale`, :func:`corrupt_pixel_noise`, :func:`corrupt_blur`;
  :func:`corrupt_patches` takes the fill vocabulary of :func:`~vitlens_patch.images.fill_images`
  (defined in pixels, computed on the model input). :func:`corrupt` applies one by name
  (:data:`CORRUPTIONS`) or a user's own ``images -> images`` callable.
- *embedding noise* in the style of ROME's causal tracing is not a function of the images but a
  forward hook for the corrupted run: :mod:`vitlens_patch.patching.embedding_noise`.

Every random corruption takes an explicit ``seed`` and draws from its own ``torch.Generator`` on the
CPU, so results are reproducible across calls and devices.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from einops import einsum, repeat
from jaxtyping import Float
from torch import Tensor

from vitlens_patch.checks import check_images
from vitlens_patch.images import Fill, PatchSpec, fill_images, gaussian_blur, patch_mask, seeded_normal
from vitlens_patch.model import HookedViT
from vitlens_patch.model.preprocess import DataConfig

# ITU-R BT.601 luma weights for (R, G, B)
BT601_LUMA = (0.299, 0.587, 0.114)

ImageBatch = Float[Tensor, "batch channel height width"]
# One release's notice where "mean" changed meaning (corrupt_patches, Occlusion, IntegratedGradients).
MEAN_FILL_CHANGED = (
    "fill 'mean' now means the normalisation's mean colour (model input 0), as for every fill; "
    "until this release patch fills used each image's own mean colour: for that, pass the "
    "tensor images.mean(dim=(2, 3), keepdim=True)"
)


def _in_pixel_space(
    images: ImageBatch, data_config: DataConfig, corrupt_pixels: Callable[[Tensor], Tensor]
) -> ImageBatch:
    """Denormalise, apply ``corrupt_pixels`` to the [0, 1] pixels, normalise again."""
    check_images(images, channels=data_config.input_size[0])
    return data_config.normalize(corrupt_pixels(data_config.denormalize(images)))


def corrupt_grayscale(images: ImageBatch, data_config: DataConfig) -> ImageBatch:
    """Replace every pixel by its ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` on all channels.

    Args:
        images: normalised model input [batch, 3, height, width].

    Returns:
        Normalised [batch, 3, height, width] whose three channels are equal in pixel space.
    """
    if data_config.input_size[0] != 3:
        raise ValueError(
            f"grayscale needs 3-channel (RGB) input, got input_size {data_config.input_size}"
        )

    def to_luma(pixels: Tensor) -> Tensor:
        weights = torch.tensor(BT601_LUMA, device=pixels.device, dtype=pixels.dtype)
        luma = einsum(pixels, weights, "batch channel height width, channel -> batch height width")
        return repeat(luma, "batch height width -> batch channel height width", channel=3)

    return _in_pixel_space(images, data_config, to_luma)


def corrupt_pixel_noise(
    images: ImageBatch, data_config: DataConfig, *, std: float = 0.1, seed: int = 0
) -> ImageBatch:
    """Add Gaussian noise of standard deviation ``std`` to the [0, 1] pixels, then clip to [0, 1].

    Args:
        images: normalised model input [batch, channel, height, width].
        std: noise standard deviation in pixel units (1 = the full [0, 1] range), >= 0.
        seed: seeds the noise; the same seed and shape give the same noise.
    """
    if not std >= 0:
        raise ValueError(f"std must be >= 0, got {std}")

    def add_noise(pixels: Tensor) -> Tensor:
        noise = seeded_normal(pixels.shape, seed, pixels.device, pixels.dtype)
        return (pixels + std * noise).clamp(0, 1)

    return _in_pixel_space(images, data_config, add_noise)


def corrupt_blur(
    images: ImageBatch,
    data_config: DataConfig,
    *,
    sigma: float = 2.0,
    kernel_size: int | None = None,
) -> ImageBatch:
    """Gaussian blur in pixel space (:func:`gaussian_blur` explains ``sigma``, ``kernel_size``)."""
    return _in_pixel_space(
        images,
        data_config,
        lambda pixels: gaussian_blur(pixels, sigma=sigma, kernel_size=kernel_size),
    )


def corrupt_patches(
    images: ImageBatch,
    data_config: DataConfig,
    patches: PatchSpec,
    *,
    patch_size: int | tuple[int, int],
    fill: Fill = "zeros",
    sigma: float = 2.0,
) -> ImageBatch:
    """Replace a set of patches by a fill; every other pixel is left as it is.

    Args:
        images: normalised model input [batch, channel, height, width].
        patches: which patches, as in :func:`patch_mask` (indices, or a bool mask over the grid,
            shared or per image).
        patch_size: patch height and width in pixels (``model.cfg.patch_size``).
        fill: what the masked patches become, see :func:`~vitlens_patch.images.fill_images`:
            "zeros" (black pixels), "mean" (the normalisation's mean colour; until this release
            it was each image's own mean colour, and passing it warns for one release), "blur"
            (the image Gaussian-blurred with standard deviation ``sigma`` pixels) or a tensor of
            normalised model input broadcastable to ``images``.
        sigma: blur width for ``fill="blur"``.
    """
    if isinstance(fill, str) and fill == "mean":
        warnings.warn(MEAN_FILL_CHANGED, DeprecationWarning, stacklevel=2)
    check_images(images, channels=data_config.input_size[0])
    patch_h, patch_w = (patch_size,) * 2 if isinstance(patch_size, int) else tuple(patch_size)
    height, width = images.shape[-2:]
    if patch_h < 1 or patch_w < 1 or height % patch_h or width % patch_w:
        raise ValueError(f"patch_size must divide the image size {(height, width)}, got {patch_size}")
    mask = patch_mask(patches, (height // patch_h, width // patch_w))
    if len(mask) not in (1, len(images)):
        raise ValueError(
            f"a per-image patches mask must hold {len(images)} masks (one per image), got {len(mask)}"
        )
    filler = fill_images(images, fill, normalization=(data_config.mean, data_config.std), sigma=sigma)
    # patch grid -> pixel mask [mask_batch, 1, height, width]
    pixel_mask = repeat(
        mask, "batch grid_h grid_w -> batch 1 (grid_h patch_h) (grid_w patch_w)",
        patch_h=patch_h, patch_w=patch_w,
    ).to(images.device)
    return torch.where(pixel_mask, filler, images)


CORRUPTIONS: dict[str, Callable[..., Tensor]] = {
    "grayscale": corrupt_grayscale,
    "pixel_noise": corrupt_pixel_noise,
    "blur": corrupt_blur,
    "patches": corrupt_patches,
}


def corrupt(
    model: HookedViT,
    images: ImageBatch,
    corruption: str | Callable[[Tensor], Tensor],
    **kwargs,
) -> ImageBatch:
    """Corrupt normalised model input with a named pixel corruption or a user's callable.

    Args:
        model: supplies ``data_config`` (and ``cfg.patch_size`` as the default for ``"patches"``).
        images: normalised model input [batch, channel, height, width].
        corruption: a name in :data:`CORRUPTIONS` (``"grayscale"``, ``"pixel_noise"``, ``"blur"``,
            ``"patches"``), called as ``CORRUPTIONS[name](images, model.data_config, **kwargs)``;
            or a callable ``images -> images`` on normalised model input, called as
            ``corruption(images, **kwargs)``.
        kwargs: the corruption's own arguments (``std``, ``seed``, ``sigma``, ``patches``, ...).

    Returns:
        Corrupted normalised input, same shape as ``images``.
    """
    if callable(corruption):
        corrupted = corruption(images, **kwargs)
    elif corruption in CORRUPTIONS:
        if corruption == "patches":
            kwargs.setdefault("patch_size", model.cfg.patch_size)
        corrupted = CORRUPTIONS[corruption](images, model.data_config, **kwargs)
    else:
        raise ValueError(
            f"corruption must be one of {tuple(CORRUPTIONS)} or a callable images -> images, "
            f"got {corruption!r}"
        )
    if not isinstance(corrupted, Tensor) or corrupted.shape != images.shape:
        got = tuple(corrupted.shape) if isinstance(corrupted, Tensor) else type(corrupted).__name__
        raise ValueError(
            f"corruption must return a tensor shaped like images {tuple(images.shape)}, got {got}"
        )
    return corrupted
