"""vitlens_patch: causal tracing, activation patching and CAAP attribution for Vision Transformers.

Public names are imported lazily, so ``import vitlens_patch`` stays fast.
"""

from __future__ import annotations

import sys

from vitlens_patch.lazy import lazy_exports

__version__ = "0.1.0"

_PUBLIC = {  # module -> the public names it defines
    "vitlens_patch.model": ("HookedViT", "ViTConfig", "DataConfig"),
    "vitlens_patch.patching": (
        "run_restore", "Site", "TraceResult", "trace_layers", "trace_grid", "trace_heads",
    ),
    "vitlens_patch.studies": ("run_study",),
    "vitlens_patch.attribution": ("caap",),
    "vitlens_patch.recipes": ("caap_layer_sweep", "grayscale_study"),
    "vitlens_patch.pretrained": ("cifar10_vit",),
    "vitlens_patch.evaluation": ("evaluate", "EvaluationSet", "EvaluationResult"),
    "vitlens_patch.widgets": ("explore",),
}
_SUBMODULES = {
    "corruptions": "vitlens_patch.patching.corruptions",
    "attribution": "vitlens_patch.attribution",
    "metrics": "vitlens_patch.metrics",
    "plots": "vitlens_patch.plots",
    "pretrained": "vitlens_patch.pretrained",
    "recipes": "vitlens_patch.recipes",
    "evaluation": "vitlens_patch.evaluation",
    "widgets": "vitlens_patch.widgets",
}

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC, _SUBMODULES)
__all__ = __dir__()


if "ipykernel" in sys.modules:
    # in Jupyter, figures also render in exported notebooks (vitlens_patch.plots.notebook)
    from vitlens_patch.plots.notebook import activate_in_notebooks

    activate_in_notebooks()
