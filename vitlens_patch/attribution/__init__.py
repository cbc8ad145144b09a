"""Attribution maps over the patch grid: one ``Attributor`` interface for CAAP and its baselines.

    maps = get_attributor("occlusion", model, baseline="blur").attribute(images, target=None)
    all_maps = attribute_all(model, images, ["rollout", "chefer", "occlusion"], upsample="bilinear")

Every method returns [batch, grid_h, grid_w] ([batch, height, width] with ``upsample``). New methods
subclass ``Attributor`` and call ``register_attributor(name, cls)``.
"""

from vitlens_patch.attribution.attention import AttentionRollout, CheferAttention
from vitlens_patch.attribution.base import Attributor, make_baseline, patches_to_grid, upsample_maps
from vitlens_patch.attribution.caap import CAAP, caap
from vitlens_patch.attribution.gradients import GradCAM, IntegratedGradients
from vitlens_patch.attribution.perturbation import Occlusion
from vitlens_patch.attribution.registry import ATTRIBUTORS, attribute_all, get_attributor, register_attributor
from vitlens_patch.attribution.sanity import RandomAttribution

__all__ = [
    "ATTRIBUTORS",
    "CAAP",
    "AttentionRollout",
    "Attributor",
    "CheferAttention",
    "GradCAM",
    "IntegratedGradients",
    "Occlusion",
    "RandomAttribution",
    "attribute_all",
    "caap",
    "get_attributor",
    "make_baseline",
    "patches_to_grid",
    "register_attributor",
    "upsample_maps",
]
