"""Embedding noise in the style of ROME's causal tracing: Gaussian noise on patch embeddings.

It is not a function of the images but a forward hook for the corrupted run, at ``hook_embed``:
:func:`embedding_noise` returns an :class:`EmbeddingNoise` holding the hook. The draw takes an
explicit ``seed`` and comes from its own CPU generator, so it is reproducible across devices.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from jaxtyping import Float
from torch import Tensor

from vitlens_patch.checks import check_positive_int
from vitlens_patch.images import PatchSpec, patch_mask, seeded_normal
from vitlens_patch.model import HookedViT

ImageBatch = Float[Tensor, "batch channel height width"]


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
    check_positive_int(n_images, "n_images", allow_none=True)
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
    noise = std * seeded_normal(
        (noise_batch, grid_h * grid_w, model.cfg.d_model), seed, model.device, model.dtype
    )
    selected = rearrange(mask, "batch grid_h grid_w -> batch (grid_h grid_w) 1").to(model.device)
    return EmbeddingNoise(noise=noise * selected, std=std, level=level)
