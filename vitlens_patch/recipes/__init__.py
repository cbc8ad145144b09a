"""Recipes: published experiments as one call each, thin layers over the patching engine.

- :func:`grayscale_study`: which layers carry colour information (colour = clean, grayscale =
  corrupted), per layer, per class and per image, with colour vs grayscale accuracy.
- :func:`caap` / :class:`CAAP`: Causal Attribution via Activation Patching, and
  :func:`caap_layer_sweep` to choose its block range.
"""

from vitlens_patch.recipes.caap import CAAP, LayerSweepResult, caap, caap_layer_sweep
from vitlens_patch.recipes.grayscale_study import GrayscaleStudyResult, grayscale_study, measure_grayscale

__all__ = [
    "CAAP", "GrayscaleStudyResult", "LayerSweepResult", "caap", "caap_layer_sweep", "grayscale_study",
    "measure_grayscale",
]
