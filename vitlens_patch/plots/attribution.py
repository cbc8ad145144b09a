"""Plotly figures comparing attribution methods: scores with confidence intervals, and maps.

Both builders take plain tables and tensors, e.g. from :func:`vitlens_patch.evaluation.evaluate`::

    result = evaluate(["caap", "rollout", "random"], model, data)
    plot_method_comparison(result.table())
    plot_attribution_grid(data.pixels(range(6)), result.select_maps(range(6)), labels=data.labels[:6],
                          class_names=data.class_names)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.colors import DEFAULT_PLOTLY_COLORS
from plotly.subplots import make_subplots
from torch import Tensor

from vitlens_patch.checks import check_positive_int, check_probability
from vitlens_patch.plots.tracing import DIVERGING, image_to_rgb

TABLE_COLUMNS = ("method", "metric", "mean", "ci_low", "ci_high")


def _direction(higher_is_better) -> str:
    if higher_is_better is None or pd.isna(higher_is_better):
        return ""
    return " (higher is better)" if higher_is_better else " (lower is better)"


def plot_method_comparison(
    table: pd.DataFrame,
    *,
    columns: int = 3,
    reference: str | None = "random",
    title: str = "Attribution methods compared (mean and confidence interval over images)",
) -> go.Figure:
    """Bars of each method's mean score with confidence-interval error bars, a panel per metric.

    Args:
        table: one row per (method, metric) with columns ``method``, ``metric``, ``mean``,
            ``ci_low``, ``ci_high`` and optionally ``n`` and ``higher_is_better`` (which adds
            "higher / lower is better" to the panel titles): ``EvaluationResult.table()``.
        columns: panels per row.
        reference: a method whose mean is drawn as a dotted line across its panel (the random
            map, the floor to beat); ignored when absent from the table, None for no line.

    Returns:
        A figure with one bar trace per metric; a method keeps its colour across panels.
    """
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"table must be a pandas DataFrame (EvaluationResult.table()), got {type(table).__name__}")
    missing = [column for column in TABLE_COLUMNS if column not in table.columns]
    if missing or table.empty:
        raise ValueError(
            f"table must have rows and columns {list(TABLE_COLUMNS)}, got {list(table.columns)} "
            f"with {len(table)} rows"
        )
    if table.duplicated(["method", "metric"]).any():
        raise ValueError("table must hold one row per (method, metric), got duplicates")
    check_positive_int(columns, "columns")
    metrics = list(dict.fromkeys(table["metric"]))
    methods = list(dict.fromkeys(table["method"]))
    colours = {method: DEFAULT_PLOTLY_COLORS[i % len(DEFAULT_PLOTLY_COLORS)] for i, method in enumerate(methods)}
    n_cols = min(columns, len(metrics))
    n_rows = -(-len(metrics) // n_cols)
    rows_of = {metric: table[table["metric"] == metric].set_index("method") for metric in metrics}
    panel_titles = [
        metric + _direction(rows_of[metric]["higher_is_better"].iloc[0] if "higher_is_better" in table else None)
        for metric in metrics
    ]
    figure = make_subplots(
        rows=n_rows, cols=n_cols, subplot_titles=panel_titles, horizontal_spacing=0.08, vertical_spacing=0.22,
    )
    for panel, metric in enumerate(metrics):
        rows = rows_of[metric]
        shown = [method for method in methods if method in rows.index]
        mean = rows.loc[shown, "mean"].to_numpy(dtype=float)
        low = rows.loc[shown, "ci_low"].to_numpy(dtype=float)
        high = rows.loc[shown, "ci_high"].to_numpy(dtype=float)
        count = rows.loc[shown, "n"].to_numpy() if "n" in rows else np.full(len(shown), np.nan)
        row, col = divmod(panel, n_cols)
        figure.add_trace(go.Bar(
            x=shown, y=mean, name=metric, showlegend=False,
            marker_color=[colours[method] for method in shown],
            error_y={"type": "data", "symmetric": False, "array": high - mean, "arrayminus": mean - low},
            customdata=np.stack([low, high, count], axis=-1),
            hovertemplate=(
                f"%{{x}}<br>{metric} %{{y:.4g}}<br>CI [%{{customdata[0]:.4g}}, %{{customdata[1]:.4g}}]"
                "<br>images %{customdata[2]}<extra></extra>"
            ),
        ), row=row + 1, col=col + 1)
        if reference is not None and reference in rows.index:
            figure.add_hline(
                y=float(rows.loc[reference, "mean"]), line={"color": "gray", "width": 1, "dash": "dot"},
                row=row + 1, col=col + 1,
            )
    figure.update_layout(
        title=title, template="plotly_white", width=max(330 * n_cols, 500), height=340 * n_rows + 80,
    )
    return figure


def plot_attribution_grid(
    images: Float[Tensor, "batch channel height width"],
    maps_by_method: Mapping[str, Float[Tensor, "batch map_h map_w"]],
    *,
    labels: Int[Tensor, " batch"] | Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    opacity: float = 0.6,
    title: str = "Attribution maps",
) -> go.Figure:
    """A grid of maps: a row per image, the image then each method's map drawn over it.

    Methods differ in units and range, so each map is divided by its own largest ``|value|``:
    colours run from -1 (blue) to 1 (red) on one shared scale, 0 white.

    Args:
        images: [batch, channel, height, width] pixels in [0, 1] (e.g. ``EvaluationSet.pixels``).
        maps_by_method: method -> maps [batch, map_h, map_w] of those images (patch grid or pixel
            maps; each side must divide the image's), e.g. ``EvaluationResult.select_maps``.
        labels: class of each image, shown left of its row (names from ``class_names``).
        class_names: class index -> name.
        opacity: opacity of the maps over the images, in (0, 1].

    Returns:
        A figure with, per image, an image trace, then an image and a heatmap trace per method.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or len(images) == 0:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [batch, channel, height, width] of pixels, got {got}")
    if not isinstance(maps_by_method, Mapping) or not maps_by_method:
        raise ValueError("maps_by_method must be a non-empty mapping method -> maps [batch, map_h, map_w]")
    n_images, height, width = len(images), *images.shape[-2:]
    for method, maps in maps_by_method.items():
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        if (not isinstance(maps, Tensor) or maps.ndim != 3 or len(maps) != n_images
                or height % maps.shape[1] or width % maps.shape[2]):
            raise ValueError(
                f"maps_by_method[{method!r}] must be [{n_images}, map_h, map_w] with map sides dividing "
                f"the image size ({height}, {width}), got {shape}"
            )
    check_probability(opacity, "opacity", include_zero=False)
    row_names = None
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).tolist()
        if len(labels) != n_images:
            raise ValueError(f"labels must give one class per image ({n_images}), got {len(labels)}")
        if class_names is not None and not all(0 <= label < len(class_names) for label in labels):
            raise ValueError(f"labels must index class_names (0 to {len(class_names) - 1}), got {labels}")
        row_names = [class_names[label] if class_names is not None else f"class {label}" for label in labels]
    methods = list(maps_by_method)
    n_cols = 1 + len(methods)
    figure = make_subplots(
        rows=n_images, cols=n_cols, column_titles=["image", *methods],
        horizontal_spacing=0.01, vertical_spacing=0.01,
    )
    for row in range(n_images):
        rgb = image_to_rgb(images[row])
        figure.add_trace(go.Image(z=rgb, hoverinfo="skip"), row=row + 1, col=1)
        if row_names is not None:
            figure.update_yaxes(title_text=row_names[row], row=row + 1, col=1)
        for col, method in enumerate(methods, start=2):
            values = maps_by_method[method][row].detach().float().cpu()
            scale = values.abs().max().item()
            values = values / scale if scale > 0 else values
            cell_h, cell_w = height / values.shape[0], width / values.shape[1]
            figure.add_trace(go.Image(z=rgb, hoverinfo="skip"), row=row + 1, col=col)
            # cell (r, c) covers pixels [r * cell_h, (r + 1) * cell_h): centre at (r + 0.5) * cell_h - 0.5
            figure.add_trace(go.Heatmap(
                z=values.numpy(), x0=cell_w / 2 - 0.5, dx=cell_w, y0=cell_h / 2 - 0.5, dy=cell_h,
                coloraxis="coloraxis", opacity=opacity,
                hovertemplate=f"{method}<br>relative value %{{z:.3f}}<extra></extra>",
            ), row=row + 1, col=col)
    for axis in range(1, n_images * n_cols + 1):
        # equal aspect per panel: each y axis is scaled to its own x axis
        figure.layout[f"yaxis{'' if axis == 1 else axis}"].scaleanchor = "x" if axis == 1 else f"x{axis}"
    figure.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    figure.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed")
    figure.update_annotations(font_size=12)  # column titles: method names over narrow panels
    figure.update_layout(
        title=title, template="plotly_white",
        coloraxis={"colorscale": DIVERGING, "cmid": 0, "cmin": -1, "cmax": 1,
                   "colorbar": {"title": {"text": "map / max |map|", "side": "right"}}},
        width=130 * n_cols + 180, height=130 * n_images + 120,
    )
    return figure
