"""Perturbation maps: patch occlusion, the input-space analogue of CAAP."""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vitlens_patch.attribution.base import Attributor, make_baseline
from vitlens_patch.images import Fill, check_fill
from vitlens_patch.model import HookedViT


class Occlusion(Attributor):
    """Patch occlusion (Zeiler & Fergus 2014) on the model's own patch grid.

    Each patch in turn is filled (``fill``) as ``corrupt_patches`` does; the map is
    ``score(image) - score(image with that patch occluded)`` for the target class, so positive
    means the patch supports the class. Costs ``n_patches + 1`` forward passes per image, run
    without gradients in batches of ``batch_size`` occluded images.

    Args:
        model, score, upsample, batch_size, progress: see ``Attributor``.
        fill: what an occluded patch becomes, as in ``corrupt_patches`` (see
            :func:`~vitlens_patch.images.fill_images`): "blur" (the image Gaussian-blurred with
            ``sigma``), "zeros" (black pixels), "mean" (the normalisation's mean colour; until this
            release each image's own mean colour) or a tensor of normalised model input
            broadcastable to the images.
        sigma: blur standard deviation in pixels for ``fill="blur"``.
    """

    def __init__(self, model: HookedViT, *, fill: Fill = "blur", sigma: float = 2.0, **options):
        super().__init__(model, **options)
        self.fill = check_fill(fill, "fill")
        self.sigma = sigma

    def _patch_masks(self, device: torch.device) -> Bool[Tensor, "n_patches 1 height width"]:
        """One boolean pixel mask per patch, in token order."""
        (grid_h, grid_w), (patch_h, patch_w) = self.model.cfg.grid_size, self.model.cfg.patch_size
        masks = torch.eye(grid_h * grid_w, dtype=torch.bool, device=device)
        masks = rearrange(masks, "patch (grid_h grid_w) -> patch grid_h grid_w", grid_h=grid_h)
        return repeat(
            masks, "patch grid_h grid_w -> patch 1 (grid_h patch_h) (grid_w patch_w)",
            patch_h=patch_h, patch_w=patch_w,
        )

    @torch.no_grad()
    def _attribute(
        self, images: Float[Tensor, "batch channel height width"], target: Int[Tensor, " batch"] | None
    ) -> Float[Tensor, "batch grid_h grid_w"]:
        n_images, n_patches = len(images), self.model.cfg.n_patches
        logits = torch.cat([self.model(images[batch]) for batch in self._batches(n_images)])
        target = logits.argmax(dim=-1) if target is None else target
        clean_score = self.score_fn(logits, target)
        # Filling every patch once, then copying one patch at a time, equals corrupt_patches per patch.
        filled = make_baseline(images, self.model, self.fill, self.sigma)
        masks = self._patch_masks(images.device)
        # Occluded copies are indexed (image, patch) flattened, built a batch at a time.
        occluded_score = torch.empty(n_images * n_patches, device=images.device, dtype=clean_score.dtype)
        for batch in self._batches(n_images * n_patches, desc="Occlusion"):
            index = torch.arange(batch.start, batch.stop, device=images.device)
            image, patch = index // n_patches, index % n_patches
            occluded = torch.where(masks[patch], filled[image], images[image])
            occluded_score[batch] = self.score_fn(self.model(occluded), target[image])
        occluded_score = rearrange(occluded_score, "(image patch) -> image patch", patch=n_patches)
        return self._to_grid(clean_score[:, None] - occluded_score)
