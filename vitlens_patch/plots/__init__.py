"""Plotly figure builders; each returns a ``go.Figure`` and never shows it.

Names are imported lazily, so :mod:`vitlens_patch.plots.notebook` (the offline notebook renderer
that ``import vitlens_patch`` activates inside Jupyter) loads without torch.
"""

from __future__ import annotations

from vitlens_patch.lazy import lazy_exports

_PUBLIC = {  # module -> the public names it defines
    "vitlens_patch.plots.attribution": ("plot_attribution_grid", "plot_method_comparison"),
    "vitlens_patch.plots.tracing": (
        "plot_head_heatmap", "plot_layer_curve", "plot_layer_means", "plot_patch_grid", "plot_position_heatmap",
    ),
    "vitlens_patch.plots.notebook": ("use_offline_renderer",),
}

__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
__all__ = __dir__()
