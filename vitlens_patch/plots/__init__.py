"""Plotly figure builders; each returns a ``go.Figure`` and never shows it.

Names are imported lazily, so :mod:`vitlens_patch.plots.notebook` (the offline notebook renderer
that ``import vitlens_patch`` activates inside Jupyter) loads without torch.
"""

from __future__ import annotations

from vitlens_patch.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
