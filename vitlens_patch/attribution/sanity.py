"""A random map: the floor any attribution method should beat."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vitlens_patch.attribution.base import Attributor
from vitlens_patch.model import HookedViT


class RandomAttribution(Attributor):
    """Uniform noise in [0, 1) over the patch grid, ignoring the model and the target.

    The same ``seed`` gives the same maps for the same number of images.

    Args:
        model, upsample: see ``Attributor`` (other ``Attributor`` options are accepted and unused).
        seed: seed of the noise.
    """

    def __init__(self, model: HookedViT, *, seed: int = 0, **options):
        super().__init__(model, **options)
        self.seed = seed

    uses_target = False

    def _attribute(
        self, images: Float[Tensor, "batch channel height width"], target: Int[Tensor, " batch"] | None
    ) -> Float[Tensor, "batch grid_h grid_w"]:
        generator = torch.Generator().manual_seed(self.seed)
        maps = torch.rand(len(images), *self.model.cfg.grid_size, generator=generator)
        return maps.to(images.device, images.dtype)
