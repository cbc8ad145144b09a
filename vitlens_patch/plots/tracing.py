"""Plotly figures for causal-tracing results (:class:`~vitlens_patch.patching.results.TraceResult`).

Every builder returns a ``go.Figure`` (shown by Jupyter when it is a cell's value, saved with
``fig.write_html(path)``). Values are means over the result's images (nan-aware: images without
a clean-corrupted gap drop out after normalisation); colour scales are diverging and centred at 0,
since a restoration can raise or lower the score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from einops import rearrange
from jaxtyping import Float
from plotly.colors import DEFAULT_PLOTLY_COLORS, unlabel_rgb
from plotly.subplots import make_subplots
from torch import Tensor

from vitlens_patch.checks import check_positive_int
from vitlens_patch.patching.results import TraceMean, TraceResult

DIVERGING = "RdBu_r"  # red: restoring raises the score, blue: lowers it


def _check_dims(result: TraceResult, dims: tuple[str, ...], argument: str) -> None:
    if not isinstance(result, TraceResult) or result.dims != dims:
        got = result.dims if isinstance(result, TraceResult) else type(result).__name__
        raise ValueError(f"{argument} must be a TraceResult with dims {dims}, got {got}")


def _summarise(result: TraceResult, normalized: bool, confidence: float) -> tuple[TraceMean, str]:
    """Mean over images (normalised first if asked) and the matching axis title."""
    if normalized and not result.is_normalized:
        result = result.normalized()
    score = result.settings.get("score")
    if result.is_normalized:
        label = "normalised indirect effect<br>(fraction of the clean - corrupted gap)"
    else:
        label = f"indirect effect on {score}" if score is not None else "indirect effect"
    return result.mean(confidence=confidence), label


def _symmetric_limit(values: Tensor) -> float:
    """Largest |value| (ignoring NaN), so a colour scale spans [-limit, limit] around 0."""
    limit = values.nan_to_num(0.0).abs().max().item() if values.numel() else 0.0
    return limit if limit > 0 else 1.0


def token_labels(
    positions: Sequence[int], n_prefix_tokens: int, grid_size: tuple[int, int] | None
) -> list[str]:
    """Readable token names: ``cls`` (token 0), ``prefix i``, ``patch p (row r, col c)``."""
    labels = []
    for token in positions:
        patch = token - n_prefix_tokens
        if patch < 0:
            labels.append("cls" if token == 0 else f"prefix {token}")
        elif grid_size is None:
            labels.append(f"patch {patch}")
        else:
            row, col = divmod(patch, grid_size[1])
            labels.append(f"patch {patch} (row {row}, col {col})")
    return labels


def plot_layer_curve(
    results: TraceResult | Sequence[TraceResult],
    labels: Sequence[str] | None = None,
    *,
    normalized: bool = False,
    ci: bool = True,
    confidence: float = 0.95,
    title: str = "Indirect effect by layer",
) -> go.Figure:
    """Mean indirect effect per layer, one curve per result, with a confidence band.

    Args:
        results: one or several TraceResults with dims ``("image", "layer")``; several are
            overlaid for comparison (e.g. restoring windows of 1 and of 3 layers).
        labels: legend name per result; default ``"window w"`` from the settings, or ``"result i"``.
        normalized: plot ``result.normalized()`` (fraction of each image's clean - corrupted gap).
        ci: draw the Student-t confidence band of :meth:`TraceResult.mean` (none for one image).
        confidence: the band's confidence level.

    Returns:
        A figure with a line trace per result, preceded by its band trace when ``ci``.
    """
    results = [results] if isinstance(results, TraceResult) else list(results)
    if not results:
        raise ValueError("results must hold at least one TraceResult, got an empty sequence")
    for result in results:
        _check_dims(result, ("image", "layer"), "results")
    if labels is None:
        labels = [
            f"window {r.settings['window']}" if "window" in r.settings else f"result {i}"
            for i, r in enumerate(results)
        ]
    if len(labels) != len(results):
        raise ValueError(
            f"labels must name each of the {len(results)} results, got {len(labels)} labels"
        )
    figure = go.Figure()
    for index, (result, label) in enumerate(zip(results, labels)):
        summary, y_title = _summarise(result, normalized, confidence)
        _add_curve(
            figure, index, label, list(summary.coords["layer"]), summary.mean.tolist(),
            (summary.lower.tolist(), summary.upper.tolist()) if ci else None, summary.confidence,
            summary.count.tolist(),
        )
    figure.add_hline(y=0, line={"color": "gray", "width": 1, "dash": "dot"})
    figure.update_layout(title=title, xaxis_title="layer", yaxis_title=y_title, template="plotly_white")
    return figure


def plot_layer_means(
    curves: pd.DataFrame,
    *,
    by: str | None = None,
    confidence: float = 0.95,
    title: str = "Mean indirect effect by layer",
    y_title: str = "indirect effect",
) -> go.Figure:
    """Per-layer means with their confidence bands from a table, one curve per ``curve`` value.

    For curves stored as numbers rather than per-image results, e.g. those of
    :func:`~vitlens_patch.recipes.load_layer_curves` (a study of a model too large to rerun here)
    next to a study run in the notebook (``study.layer_means().assign(curve="attn window 3")``).

    Args:
        curves: a row per (curve, layer), columns ``curve``, ``layer``, ``mean``, ``lower``,
            ``upper``.
        by: a column splitting the rows into side-by-side panels that share the y axis, e.g.
            ``"model"``; a curve keeps its colour across panels.
        confidence: the level of ``lower`` / ``upper``, for the legend.
    """
    needed = ["curve", "layer", "mean", "lower", "upper"] + ([by] if by is not None else [])
    if not isinstance(curves, pd.DataFrame) or not set(needed) <= set(curves.columns) or curves.empty:
        got = list(curves.columns) if isinstance(curves, pd.DataFrame) else type(curves).__name__
        raise ValueError(f"curves must be a non-empty DataFrame with columns {needed}, got {got}")
    panels = list(dict.fromkeys(curves[by])) if by is not None else [None]
    names = list(dict.fromkeys(curves["curve"]))
    figure = make_subplots(
        rows=1, cols=len(panels), shared_yaxes=True, horizontal_spacing=0.04,
        subplot_titles=[str(panel) for panel in panels] if by is not None else None,
    )
    for column, panel in enumerate(panels, start=1):
        rows = curves if by is None else curves[curves[by] == panel]
        for name, curve in rows.groupby("curve", sort=False):
            curve = curve.sort_values("layer")
            _add_curve(
                figure, names.index(name), name, curve["layer"].tolist(), curve["mean"].tolist(),
                (curve["lower"].tolist(), curve["upper"].tolist()), confidence,
                show_legend=column == 1, col=column,
            )
        figure.add_hline(y=0, line={"color": "gray", "width": 1, "dash": "dot"}, row=1, col=column)
        figure.update_xaxes(title_text="layer", row=1, col=column)
    figure.update_yaxes(title_text=y_title, row=1, col=1)
    figure.update_layout(title=title, template="plotly_white")
    return figure


def _add_curve(
    figure: go.Figure,
    index: int,
    label: str,
    layers: list,
    mean: list[float],
    band: tuple[list[float], list[float]] | None,
    confidence: float,
    counts: list[int] | None = None,
    *,
    show_legend: bool = True,
    col: int | None = None,
) -> None:
    """One curve (colour ``index``) with its confidence ``band`` (lower, upper) behind it."""
    place = {} if col is None else {"row": 1, "col": col}
    colour = DEFAULT_PLOTLY_COLORS[index % len(DEFAULT_PLOTLY_COLORS)]
    if band is not None:
        red, green, blue = unlabel_rgb(colour)
        lower, upper = band
        # one closed polygon: along the upper bound, back along the lower bound
        figure.add_trace(go.Scatter(
            x=layers + layers[::-1], y=upper + lower[::-1],
            fill="toself", fillcolor=f"rgba({red}, {green}, {blue}, 0.2)",
            line={"width": 0}, hoverinfo="skip", showlegend=False, legendgroup=label,
            name=f"{label} {confidence:.0%} CI",
        ), **place)
    images = "" if counts is None else "<br>images %{customdata}"
    figure.add_trace(go.Scatter(
        x=layers, y=mean, mode="lines+markers", name=label, legendgroup=label, showlegend=show_legend,
        line={"color": colour}, customdata=counts,
        hovertemplate=f"layer %{{x}}<br>effect %{{y:.4g}}{images}<extra>{label}</extra>",
    ), **place)


def _mean_heatmap(
    result: TraceResult,
    *,
    x_dim: str,
    y_dim: str,
    normalized: bool,
    confidence: float,
    title: str,
    y_labels: list | None = None,
) -> go.Figure:
    """Heatmap of the mean effect over images, ``x_dim`` across and ``y_dim`` down."""
    summary, effect_title = _summarise(result, normalized, confidence)

    def arrange(values: Tensor) -> np.ndarray:
        # [*summary.dims] -> [y_dim, x_dim]
        return rearrange(values, f"{' '.join(summary.dims)} -> {y_dim} {x_dim}").numpy()

    customdata = np.stack([arrange(summary.lower), arrange(summary.upper), arrange(summary.count)], -1)
    limit = _symmetric_limit(summary.mean)
    figure = go.Figure(go.Heatmap(
        z=arrange(summary.mean), x=summary.coords[x_dim], y=y_labels or summary.coords[y_dim],
        colorscale=DIVERGING, zmid=0, zmin=-limit, zmax=limit, customdata=customdata,
        colorbar={"title": {"text": effect_title, "side": "right"}},
        hovertemplate=(
            f"{x_dim} %{{x}}<br>{y_dim} %{{y}}<br>effect %{{z:.4g}}<br>{summary.confidence:.0%} CI "
            "[%{customdata[0]:.4g}, %{customdata[1]:.4g}]<br>images %{customdata[2]}<extra></extra>"
        ),
    ))
    figure.update_layout(title=title, xaxis_title=x_dim, yaxis_title=y_dim, template="plotly_white")
    figure.update_yaxes(autorange="reversed", type="category")
    return figure


def plot_position_heatmap(
    result: TraceResult,
    *,
    normalized: bool = False,
    confidence: float = 0.95,
    title: str = "Indirect effect by layer and token position",
) -> go.Figure:
    """ROME's causal-trace heatmap: mean effect per (token position, layer).

    Args:
        result: dims ``("image", "layer", "position")``; position coords are token indices.
        normalized: plot ``result.normalized()``.

    Returns:
        A single-heatmap figure, layers across and tokens down (``cls``, then patches).
    """
    _check_dims(result, ("image", "layer", "position"), "result")
    labels = token_labels(result.coord("position"), result.n_prefix_tokens, result.grid_size)
    return _mean_heatmap(
        result, x_dim="layer", y_dim="position", normalized=normalized, confidence=confidence,
        title=title, y_labels=labels,
    )


def plot_head_heatmap(
    result: TraceResult,
    *,
    normalized: bool = False,
    confidence: float = 0.95,
    title: str = "Indirect effect by layer and head",
) -> go.Figure:
    """Mean effect of restoring each attention head: heads across, layers down.

    Args:
        result: dims ``("image", "layer", "head")``.
        normalized: plot ``result.normalized()``.
    """
    _check_dims(result, ("image", "layer", "head"), "result")
    return _mean_heatmap(
        result, x_dim="head", y_dim="layer", normalized=normalized, confidence=confidence, title=title,
    )


def image_to_rgb(image: Tensor) -> np.ndarray:
    """[channel, height, width] pixels in [0, 1] -> uint8 [height, width, 3] for ``go.Image``."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"image must be [channel, height, width] with 1 or 3 channels, got {tuple(image.shape)}"
        )
    image = image.detach().float().cpu()
    if image.min() < 0 or image.max() > 1:
        raise ValueError(
            "image must hold [0, 1] pixels (model input can be mapped back with "
            f"model.data_config.denormalize), got values in [{image.min():.3g}, {image.max():.3g}]"
        )
    rgb = image.expand(3, -1, -1)
    return (rearrange(rgb, "channel height width -> height width channel") * 255).round().byte().numpy()


def plot_patch_grid(
    result: TraceResult,
    image: Float[Tensor, "channel height width"] | None = None,
    *,
    layers: Sequence | None = None,
    normalized: bool = False,
    columns: int = 4,
    opacity: float = 0.6,
    title: str = "Indirect effect of each patch token, by layer",
) -> go.Figure:
    """Small multiples, one per layer: each patch token's mean effect drawn on the patch grid.

    Prefix tokens are left out; patches that were not traced stay blank. To show one image's own
    map rather than the mean over images, pass ``result[i]`` with that image.

    Args:
        result: dims ``("image", "layer", "position")`` with ``grid_size`` set; position coords
            are token indices (patch ``p`` is token ``n_prefix_tokens + p``).
        image: [channel, height, width] pixels in [0, 1] drawn under the effects (``opacity``).
        layers: layer coords to show, default all.
        normalized: plot ``result.normalized()``.
        columns: panels per row.

    Returns:
        A figure with, per layer, an image trace (when ``image`` is given) and a heatmap trace;
        all heatmaps share one colour scale centred at 0.
    """
    _check_dims(result, ("image", "layer", "position"), "result")
    if result.grid_size is None:
        raise ValueError("result must have a grid_size to draw positions on the patch grid, got None")
    check_positive_int(columns, "columns")
    all_layers = result.coord("layer")
    layers = all_layers if layers is None else list(layers)
    unknown = [layer for layer in layers if layer not in all_layers]
    if unknown or not layers:
        raise ValueError(f"layers must be a non-empty selection of {all_layers}, got {layers}")
    summary, effect_title = _summarise(result, normalized, confidence=0.95)
    grid_h, grid_w = result.grid_size
    patches = torch.tensor(result.coord("position")) - result.n_prefix_tokens
    traced = (patches >= 0) & (patches < grid_h * grid_w)
    rows = [all_layers.index(layer) for layer in layers]
    grids = torch.full((len(rows), grid_h * grid_w), torch.nan, dtype=summary.mean.dtype)
    grids[:, patches[traced]] = summary.mean[rows][:, traced]
    grids = rearrange(grids, "layer (grid_h grid_w) -> layer grid_h grid_w", grid_w=grid_w)

    if image is None:
        cell_h = cell_w = 1.0
    else:
        rgb = image_to_rgb(image)
        cell_h, cell_w = rgb.shape[0] / grid_h, rgb.shape[1] / grid_w
    n_rows = -(-len(layers) // columns)
    n_cols = min(columns, len(layers))
    figure = make_subplots(
        rows=n_rows, cols=n_cols, subplot_titles=[f"layer {layer}" for layer in layers],
        horizontal_spacing=0.02, vertical_spacing=0.08,
    )
    limit = _symmetric_limit(grids)
    for panel, grid in enumerate(grids):
        row, col = divmod(panel, n_cols)
        if image is not None:
            figure.add_trace(go.Image(z=rgb, hoverinfo="skip"), row=row + 1, col=col + 1)
        # patch (r, c) covers pixels [r * cell_h, (r + 1) * cell_h): centre at (r + 0.5) * cell_h - 0.5
        figure.add_trace(go.Heatmap(
            z=grid.numpy(), x0=cell_w / 2 - 0.5, dx=cell_w, y0=cell_h / 2 - 0.5, dy=cell_h,
            coloraxis="coloraxis", opacity=opacity if image is not None else 1.0,
            customdata=np.arange(grid_h * grid_w).reshape(grid_h, grid_w),
            hovertemplate=(
                f"layer {layers[panel]}<br>patch %{{customdata}}<br>effect %{{z:.4g}}<extra></extra>"
            ),
        ), row=row + 1, col=col + 1)
        # equal aspect per panel: each y axis is scaled to its own x axis
        axis = panel + 1
        figure.update_yaxes(scaleanchor="x" if axis == 1 else f"x{axis}", row=row + 1, col=col + 1)
    figure.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    figure.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed")
    figure.update_layout(
        title=title, template="plotly_white",
        coloraxis={"colorscale": DIVERGING, "cmid": 0, "cmin": -limit, "cmax": limit,
                   "colorbar": {"title": {"text": effect_title, "side": "right"}}},
        width=200 * n_cols + 160, height=200 * n_rows + 100,
    )
    return figure
