"""vitlens_patch: causal tracing, activation patching and CAAP attribution for Vision Transformers.

Public names are imported lazily, so ``import vitlens_patch`` stays fast.
"""

from __future__ import annotations

import sys

from vitlens_patch.lazy import lazy_exports

__version__ = "0.1.0"

_PUBLIC = {
    "HookedViT": "vitlens_patch.model",
    "ViTConfig": "vitlens_patch.model",
    "DataConfig": "vitlens_patch.model",
    "run_restore": "vitlens_patch.patching",
    "Site": "vitlens_patch.patching",
    "TraceResult": "vitlens_patch.patching",
    "trace_layers": "vitlens_patch.patching",
    "trace_grid": "vitlens_patch.patching",
    "trace_heads": "vitlens_patch.patching",
    "run_study": "vitlens_patch.studies",
    "caap": "vitlens_patch.attribution",
    "caap_layer_sweep": "vitlens_patch.recipes",
    "grayscale_study": "vitlens_patch.recipes",
    "cifar10_vit": "vitlens_patch.pretrained",
    "evaluate": "vitlens_patch.evaluation",
    "EvaluationSet": "vitlens_patch.evaluation",
    "EvaluationResult": "vitlens_patch.evaluation",
    "explore": "vitlens_patch.widgets",
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

__all__ = sorted([*_PUBLIC, *_SUBMODULES])

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC, _SUBMODULES)


if "ipykernel" in sys.modules:
    # in Jupyter, figures also render in exported notebooks (vitlens_patch.plots.notebook)
    from vitlens_patch.plots.notebook import activate_in_notebooks

    activate_in_notebooks()
