"""Plotly figure builders; each returns a ``go.Figure`` and never shows it."""

from vitlens_patch.plots.attribution import plot_attribution_grid, plot_method_comparison
from vitlens_patch.plots.tracing import (
    plot_head_heatmap,
    plot_layer_curve,
    plot_patch_grid,
    plot_position_heatmap,
)

__all__ = [
    "plot_attribution_grid",
    "plot_head_heatmap",
    "plot_layer_curve",
    "plot_method_comparison",
    "plot_patch_grid",
    "plot_position_heatmap",
]
