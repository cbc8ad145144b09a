"""Recipes: published experiments as one call each, thin layers over the patching engine.

- :func:`grayscale_study`: which layers carry colour information (colour = clean, grayscale =
  corrupted), per layer, per class and per image, with colour vs grayscale accuracy.
- :func:`caap_layer_sweep`: CAAP's block range chosen by a faithfulness metric (CAAP itself is the
  attribution method :func:`vitlens_patch.attribution.caap`) over :func:`default_sweep_ranges`;
  :func:`caap_sweep_cost` gives its cost in forward passes before it runs; :func:`caap_layer_study`
  runs it over a data set, resumably (the study runner), with 95% CIs over images.
"""

from vitlens_patch.recipes.caap_sweep import (
    LayerSweepResult,
    caap_layer_study,
    caap_layer_sweep,
    caap_sweep_cost,
    default_sweep_ranges,
    measure_caap_layers,
)
from vitlens_patch.recipes.grayscale_study import (
    GrayscaleStudyResult,
    grayscale_study,
    load_layer_curves,
    measure_grayscale,
    save_layer_curves,
)

__all__ = [
    "GrayscaleStudyResult", "LayerSweepResult", "caap_layer_study", "caap_layer_sweep", "caap_sweep_cost",
    "default_sweep_ranges", "grayscale_study", "load_layer_curves", "measure_caap_layers", "measure_grayscale",
    "save_layer_curves",
]
