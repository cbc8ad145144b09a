import math

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from vitlens_patch.patching.results import TraceResult
from vitlens_patch.plots import (
    plot_head_heatmap,
    plot_layer_curve,
    plot_layer_means,
    plot_patch_grid,
    plot_position_heatmap,
)
from vitlens_patch.plots.tracing import token_labels

N_LAYERS, GRID = 3, (2, 3)


def make_result(dims, sizes, *, n_images=4, seed=0, coords=None, settings=None) -> TraceResult:
    generator = torch.Generator().manual_seed(seed)
    return TraceResult(
        effects=torch.randn(n_images, *sizes, generator=generator),
        dims=dims,
        clean_score=torch.rand(n_images, generator=generator) + 1.0,
        corrupted_score=torch.rand(n_images, generator=generator) * 0.5,
        settings={"score": "prob", **(settings or {})},
        coords=coords or {},
        grid_size=GRID,
        n_prefix_tokens=1,
    )


def layer_result(**kwargs) -> TraceResult:
    return make_result(("image", "layer"), (N_LAYERS,), **kwargs)


def position_result(**kwargs) -> TraceResult:
    n_positions = 1 + GRID[0] * GRID[1]
    kwargs.setdefault("coords", {"position": list(range(n_positions))})
    sizes = (N_LAYERS, len(kwargs["coords"]["position"]))
    return make_result(("image", "layer", "position"), sizes, **kwargs)


def test_layer_curve_draws_a_line_and_band_per_result(tmp_path):
    results = [layer_result(settings={"window": 1}), layer_result(seed=1, settings={"window": 3})]
    figure = plot_layer_curve(results)
    assert isinstance(figure, go.Figure)
    assert len(figure.data) == 4  # band + line per result
    lines = [trace for trace in figure.data if trace.mode == "lines+markers"]
    assert [line.name for line in lines] == ["window 1", "window 3"]
    summary = results[1].mean()
    assert list(lines[1].y) == pytest.approx(summary.mean.tolist())
    band = figure.data[2]
    assert list(band.y) == pytest.approx(summary.upper.tolist() + summary.lower.flip(0).tolist())
    assert figure.layout.xaxis.title.text == "layer"
    assert figure.layout.yaxis.title.text == "indirect effect on prob"
    path = tmp_path / "layers.html"
    figure.write_html(path)
    assert path.stat().st_size > 0


def test_layer_curve_without_ci_and_normalized():
    result = layer_result()
    figure = plot_layer_curve(result, ["ours"], normalized=True, ci=False)
    assert len(figure.data) == 1 and figure.data[0].name == "ours"
    assert list(figure.data[0].y) == pytest.approx(result.normalized().mean().mean.tolist())
    assert figure.layout.yaxis.title.text.startswith("normalised indirect effect")


def layer_means_table(model: str, result: TraceResult, curve: str):
    summary = result.mean()
    return pd.DataFrame({
        "model": model, "curve": curve, "layer": list(summary.coords["layer"]),
        "mean": summary.mean.tolist(), "lower": summary.lower.tolist(), "upper": summary.upper.tolist(),
    })


def test_layer_means_draws_stored_curves_in_panels_with_one_colour_per_curve():
    window1, window3 = layer_result(seed=1), layer_result(seed=2)
    curves = pd.concat([
        layer_means_table("small", window3, "window 3"), layer_means_table("small", window1, "window 1"),
        layer_means_table("large", window3.normalized(), "window 3"),
    ])
    figure = plot_layer_means(curves, by="model")
    assert [annotation.text for annotation in figure.layout.annotations] == ["small", "large"]
    lines = [trace for trace in figure.data if trace.mode == "lines+markers"]
    assert [(line.name, line.xaxis, line.showlegend) for line in lines] == [
        ("window 3", "x", True), ("window 1", "x", True), ("window 3", "x2", False),
    ]
    assert list(lines[1].y) == pytest.approx(window1.mean().mean.tolist())
    assert lines[0].line.color == lines[2].line.color != lines[1].line.color
    band = figure.data[0]
    summary = window3.mean()
    assert list(band.y) == pytest.approx(summary.upper.tolist() + summary.lower.flip(0).tolist())
    assert list(figure.data[4].y) == pytest.approx(
        window3.normalized().mean().upper.tolist() + window3.normalized().mean().lower.flip(0).tolist()
    )


@pytest.mark.usefixtures("without_type_checks")
def test_layer_means_rejects_a_table_without_its_columns():
    with pytest.raises(ValueError, match=r"curves must be a non-empty DataFrame with columns \['curve', 'layer', 'mean', 'lower', 'upper', 'model'\], got \['curve', 'layer'\]"):
        plot_layer_means(pd.DataFrame({"curve": ["a"], "layer": [0]}), by="model")
    with pytest.raises(ValueError, match="curves must be a non-empty DataFrame .* got list"):
        plot_layer_means([1, 2])


def test_layer_curve_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"results must be a TraceResult with dims \('image', 'layer'"):
        plot_layer_curve(position_result())
    with pytest.raises(ValueError, match="labels must name each of the 2 results, got 1 labels"):
        plot_layer_curve([layer_result(), layer_result()], ["one"])
    with pytest.raises(ValueError, match="results must hold at least one TraceResult"):
        plot_layer_curve([])


def test_position_heatmap_is_layer_by_token(tmp_path):
    result = position_result()
    figure = plot_position_heatmap(result)
    (heatmap,) = figure.data
    assert isinstance(heatmap, go.Heatmap)
    assert heatmap.z.shape == (7, N_LAYERS)  # tokens down, layers across
    assert torch.allclose(torch.as_tensor(heatmap.z).T, result.mean().mean, atol=1e-6)
    assert list(heatmap.y) == token_labels(range(7), 1, GRID)
    assert heatmap.zmid == 0 and heatmap.zmin == -heatmap.zmax
    assert figure.layout.xaxis.title.text == "layer" and figure.layout.yaxis.title.text == "position"
    figure.write_html(tmp_path / "positions.html")


def test_token_labels_name_prefix_and_patches():
    labels = token_labels([0, 1, 6], 1, (2, 3))
    assert labels == ["cls", "patch 0 (row 0, col 0)", "patch 5 (row 1, col 2)"]
    assert token_labels([1, 2], 2, None) == ["prefix 1", "patch 0"]


def test_head_heatmap_is_layer_by_head(tmp_path):
    result = make_result(("image", "layer", "head"), (N_LAYERS, 4))
    figure = plot_head_heatmap(result, normalized=True)
    (heatmap,) = figure.data
    assert heatmap.z.shape == (N_LAYERS, 4)
    expected = result.normalized().mean().mean
    assert torch.allclose(torch.as_tensor(heatmap.z), expected, atol=1e-6)
    assert figure.layout.xaxis.title.text == "head" and figure.layout.yaxis.title.text == "layer"
    assert heatmap.colorbar.title.text.startswith("normalised indirect effect")
    figure.write_html(tmp_path / "heads.html")
    with pytest.raises(ValueError, match="result must be a TraceResult with dims"):
        plot_head_heatmap(position_result())


def test_patch_grid_draws_each_layer_over_the_image(tmp_path):
    # tokens 0 (cls), 1, 3 and 6 traced: patches 0, 2 and 5
    result = position_result(coords={"position": [0, 1, 3, 6]})
    image = torch.rand(3, 16, 24)
    figure = plot_patch_grid(result, image, layers=[0, 2], columns=1)
    assert [type(trace) for trace in figure.data] == [go.Image, go.Heatmap] * 2
    heatmap = figure.data[3]
    mean = result.mean().mean[2]
    assert heatmap.z.shape == GRID
    assert heatmap.z[0][0] == pytest.approx(mean[1].item())
    assert heatmap.z[0][2] == pytest.approx(mean[2].item())
    assert heatmap.z[1][2] == pytest.approx(mean[3].item())
    assert math.isnan(heatmap.z[0][1])  # untraced patch stays blank
    # each cell is one 8x8 patch of the 16x24 image
    assert (heatmap.dx, heatmap.dy, heatmap.x0, heatmap.y0) == (8, 8, 3.5, 3.5)
    assert [annotation.text for annotation in figure.layout.annotations] == ["layer 0", "layer 2"]
    assert figure.layout.coloraxis.cmid == 0
    figure.write_html(tmp_path / "grid.html")


def test_patch_grid_without_image():
    figure = plot_patch_grid(position_result(), columns=2)
    assert len(figure.data) == N_LAYERS and all(isinstance(t, go.Heatmap) for t in figure.data)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": [7]}, r"layers must be a non-empty selection of \[0, 1, 2\], got \[7\]"),
        ({"image": torch.rand(16, 24)}, r"image must be \[channel, height, width\]"),
        ({"image": torch.randn(3, 16, 24) * 3}, r"image must hold \[0, 1\] pixels"),
        ({"columns": 0}, "columns must be a positive int, got 0"),
    ],
)
@pytest.mark.usefixtures("without_type_checks")
def test_patch_grid_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plot_patch_grid(position_result(), **kwargs)


def test_patch_grid_needs_a_grid():
    result = position_result()
    result.grid_size = None
    with pytest.raises(ValueError, match="result must have a grid_size"):
        plot_patch_grid(result)
