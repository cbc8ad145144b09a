"""Corruptions for causal tracing: what the corrupted run sees.

Two kinds:

- *pixel corruptions* map normalised model input to normalised model input
  ``[batch, channel, height, width] -> [batch, channel, height, width]``. Each one undoes the
  model's normalisation (``DataConfig.denormalize``), corrupts the [0, 1] pixels and normalises
  again, so "grayscale" or "black" mean what they say whatever the model's mean/std:
  :func:`corrupt_grayscale`, :func:`corrupt_pixel_noise`, :func:`corrupt_blur`,
  :func:`corrupt_patches`. :func:`corrupt` applies one by name (:data:`CORRUPTIONS`) or a user's
  own ``images -> images`` callable.
- *embedding noise* in the style of ROME's causal tracing: Gaussian noise added to the patch
  embeddings at ``hook_embed``. It is not a function of the images but a forward hook for the
  corrupted run: :func:`embedding_noise` returns an :class:`EmbeddingNoise` holding the hook.

Every random corruption takes an explicit ``seed`` and draws from its own ``torch.Generator`` on the
CPU, so results are reproducible across calls and devices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from jaxtyping import Bool, Float
from torch import Tensor

from vitlens_patch.model import HookedViT
from vitlens_patch.model.preprocess import DataConfig

# ITU-R BT.601 luma weights for (R, G, B)
BT601_LUMA = (0.299, 0.587, 0.114)
FILLS = ("zeros", "mean", "blur")

ImageBatch = Float[Tensor, "batch channel height width"]
PatchSpec = Sequence[int] | Tensor


def _check_images(images: Tensor, data_config: DataConfig) -> None:
    channels = data_config.input_size[0]
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(
            f"images must be normalised model input [batch, {channels}, height, width], "
            f"got shape {tuple(images.shape)}"
        )


def _in_pixel_space(
    images: ImageBatch, data_config: DataConfig, corrupt_pixels: Callable[[Tensor], Tensor]
) -> ImageBatch:
    """Denormalise, apply ``corrupt_pixels`` to the [0, 1] pixels, normalise again."""
    _check_images(images, data_config)
    return data_config.normalize(corrupt_pixels(data_config.denormalize(images)))


def _seeded_normal(
    shape: Sequence[int], seed: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    # drawn on the CPU so a seed gives the same numbers on every device
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
        noise = _seeded_normal(pixels.shape, seed, pixels.device, pixels.dtype)
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


def corrupt_patches(
    images: ImageBatch,
    data_config: DataConfig,
    patches: PatchSpec,
    *,
    patch_size: int | tuple[int, int],
    fill: str = "zeros",
    sigma: float = 2.0,
) -> ImageBatch:
    """Mask a set of patches in pixel space.

    Args:
        images: normalised model input [batch, channel, height, width].
        patches: which patches, as in :func:`patch_mask` (indices, or a bool mask over the grid,
            shared or per image).
        patch_size: patch height and width in pixels (``model.cfg.patch_size``).
        fill: what the masked patches become: ``"zeros"`` black pixels, ``"mean"`` the image's own
            mean colour (per channel over the whole image), ``"blur"`` the Gaussian-blurred image
            (standard deviation ``sigma`` pixels).
        sigma: blur width for ``fill="blur"``.
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    _check_images(images, data_config)
    patch_h, patch_w = (patch_size,) * 2 if isinstance(patch_size, int) else tuple(patch_size)
    height, width = images.shape[-2:]
    if patch_h < 1 or patch_w < 1 or height % patch_h or width % patch_w:
        raise ValueError(f"patch_size must divide the image size {(height, width)}, got {patch_size}")
    mask = patch_mask(patches, (height // patch_h, width // patch_w))
    if len(mask) not in (1, len(images)):
        raise ValueError(
            f"a per-image patches mask must hold {len(images)} masks (one per image), got {len(mask)}"
        )
    # patch grid -> pixel mask [mask_batch, 1, height, width]
    pixel_mask = repeat(
        mask, "batch grid_h grid_w -> batch 1 (grid_h patch_h) (grid_w patch_w)",
        patch_h=patch_h, patch_w=patch_w,
    ).to(images.device)

    def fill_patches(pixels: Tensor) -> Tensor:
        if fill == "zeros":
            filler = torch.zeros_like(pixels)
        elif fill == "mean":
            filler = pixels.mean(dim=(-2, -1), keepdim=True).expand_as(pixels)
        else:
            filler = gaussian_blur(pixels, sigma=sigma)
        return torch.where(pixel_mask, filler, pixels)

    return _in_pixel_space(images, data_config, fill_patches)


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


@dataclass(frozen=True)
class EmbeddingNoise:
    """Gaussian noise added to patch embeddings at ``hook_embed`` during the corrupted run.

    Attributes:
        noise: [noise_batch, n_patches, d_model] noise, already scaled by ``std`` and zero outside
            the chosen patches. ``noise_batch`` is 1 (one draw shared by every image) or the
            number of images (one draw per image).
        std: the resolved noise standard deviation.
        level: the level as given (a number or ``"sK"``).
    """

    noise: Float[Tensor, "noise_batch n_patches d_model"]
    std: float
    level: float | str

    def add_noise(
        self, embed: Float[Tensor, "batch n_patches d_model"], hook=None
    ) -> Float[Tensor, "batch n_patches d_model"]:
        """``embed + noise``, the forward hook on ``hook_embed``.

        A batch of ``k`` stacked copies of the images, ``torch.cat([images] * k)`` (the layout of a
        batched engine running several restorations at once), gets the same noise in every copy.
        """
        noise_batch, batch = len(self.noise), len(embed)
        if batch % noise_batch:
            raise ValueError(
                f"hook_embed batch must be a multiple of the noise batch {noise_batch}, got {batch}"
            )
        noise = repeat(
            self.noise, "batch pos d_model -> (copies batch) pos d_model", copies=batch // noise_batch
        )
        return embed + noise.to(device=embed.device, dtype=embed.dtype)

    @property
    def hook(self) -> tuple[str, Callable]:
        """TransformerLens forward hook ``("hook_embed", fn)``, for ``fwd_hooks=[noise.hook]``."""
        return ("hook_embed", self.add_noise)


_RELATIVE_LEVEL = re.compile(r"s(\d+(?:\.\d*)?|\.\d+)")


@torch.no_grad()
def measure_embedding_std(model: HookedViT, reference: ImageBatch) -> float:
    """Standard deviation of all ``hook_embed`` activations over ``reference`` (ROME's noise unit).

    Args:
        reference: normalised images [batch, channel, height, width].
    """
    _, cache = model.run_with_cache(reference, names_filter="hook_embed")
    return cache["hook_embed"].float().std().item()


def embedding_noise(
    model: HookedViT,
    *,
    patches: PatchSpec | None = None,
    level: float | str = "s3",
    reference: ImageBatch | None = None,
    n_images: int | None = None,
    seed: int = 0,
) -> EmbeddingNoise:
    """ROME-style embedding noise: Gaussian noise on chosen patch embeddings at ``hook_embed``.

    Args:
        model: the HookedViT to corrupt; gives the grid, ``d_model``, device and dtype.
        patches: which patches get noise, as in :func:`patch_mask` (patch indices, not token
            positions: ``hook_embed`` holds patch tokens only); default every patch.
        level: noise standard deviation: a number >= 0, or ``"sK"`` for ``K`` times the standard
            deviation of the ``hook_embed`` activations over ``reference`` (ROME uses ``"s3"``).
        reference: normalised images [batch, channel, height, width] to measure that standard
            deviation on; required for ``"sK"`` levels.
        n_images: number of images to be corrupted, to give each its own noise draw; default the
            batch of a per-image ``patches`` mask, else 1: one draw shared by every image. Batches
            of stacked copies of the images are supported (see :meth:`EmbeddingNoise.add_noise`).
        seed: seeds the noise draw; the same seed and arguments give the same noise.

    Returns:
        An :class:`EmbeddingNoise`; pass ``[noise.hook]`` as forward hooks of the corrupted run.
    """
    relative = _RELATIVE_LEVEL.fullmatch(level) if isinstance(level, str) else None
    if relative is None and (isinstance(level, str) or not level >= 0):
        raise ValueError(
            f'level must be a number >= 0 or "sK" with K a number (e.g. "s3"), got {level!r}'
        )
    if n_images is not None and n_images < 1:
        raise ValueError(f"n_images must be >= 1 or None, got {n_images}")
    grid_h, grid_w = model.cfg.grid_size
    if patches is None:
        mask = torch.ones(1, grid_h, grid_w, dtype=torch.bool)
    else:
        mask = patch_mask(patches, (grid_h, grid_w))
    noise_batch = n_images or len(mask)
    if len(mask) not in (1, noise_batch):
        raise ValueError(f"n_images must match the {len(mask)} per-image patches masks, got {n_images}")
    if relative is None:
        std = float(level)
    elif reference is None:
        raise ValueError(
            f"reference images must be given to measure the embedding std for level {level!r}"
        )
    else:
        std = float(relative.group(1)) * measure_embedding_std(model, reference)
    noise = std * _seeded_normal(
        (noise_batch, grid_h * grid_w, model.cfg.d_model), seed, model.device, model.dtype
    )
    selected = rearrange(mask, "batch grid_h grid_w -> batch (grid_h grid_w) 1").to(model.device)
    return EmbeddingNoise(noise=noise * selected, std=std, level=level)
