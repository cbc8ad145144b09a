"""Plotly figure builders; each returns a ``go.Figure`` and never shows it.

Names are imported lazily, so :mod:`vitlens_patch.plots.notebook` (the offline notebook renderer
that ``import vitlens_patch`` activates inside Jupyter) loads without torch.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "plot_attribution_grid": "vitlens_patch.plots.attribution",
    "plot_method_comparison": "vitlens_patch.plots.attribution",
    "plot_head_heatmap": "vitlens_patch.plots.tracing",
    "plot_layer_curve": "vitlens_patch.plots.tracing",
    "plot_patch_grid": "vitlens_patch.plots.tracing",
    "plot_position_heatmap": "vitlens_patch.plots.tracing",
    "use_offline_renderer": "vitlens_patch.plots.notebook",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'vitlens_patch.plots' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
