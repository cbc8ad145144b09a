import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from vitlens_patch.plots import plot_attribution_grid, plot_method_comparison

METHODS = ["caap", "rollout", "random"]
METRICS = {"deletion": False, "insertion": True, "aupr": True, "pointing_game": True}


def make_table(*, seed: int = 0, directions: bool = True) -> pd.DataFrame:
    generator = np.random.default_rng(seed)
    rows = []
    for method in METHODS:
        for metric, higher in METRICS.items():
            mean = generator.uniform(0.2, 0.8)
            half = generator.uniform(0.01, 0.1)
            rows.append({"method": method, "metric": metric, "mean": mean, "ci_low": mean - half,
                         "ci_high": mean + half, "n": 50, "higher_is_better": higher})
    table = pd.DataFrame(rows)
    return table if directions else table.drop(columns="higher_is_better")


def test_method_comparison_draws_a_bar_panel_per_metric(tmp_path):
    table = make_table()
    figure = plot_method_comparison(table, columns=3)
    assert isinstance(figure, go.Figure)
    assert len(figure.data) == len(METRICS)
    titles = [annotation.text for annotation in figure.layout.annotations]
    assert titles == ["deletion (lower is better)", "insertion (higher is better)", "aupr (higher is better)",
                      "pointing_game (higher is better)"]
    # 4 panels in rows of 3: two rows of axes
    assert figure.layout.xaxis4.domain == figure.layout.xaxis.domain
    assert figure.layout.yaxis4.domain != figure.layout.yaxis.domain
    for bar, metric in zip(figure.data, METRICS):
        rows = table[table["metric"] == metric]
        assert list(bar.x) == METHODS
        np.testing.assert_allclose(bar.y, rows["mean"])
        np.testing.assert_allclose(bar.error_y.array, rows["ci_high"] - rows["mean"])
        np.testing.assert_allclose(bar.error_y.arrayminus, rows["mean"] - rows["ci_low"])
    # the random map's mean as a reference line in every panel
    random_means = table[table["method"] == "random"]["mean"].tolist()
    assert [shape.y0 for shape in figure.layout.shapes] == pytest.approx(random_means)
    path = tmp_path / "comparison.html"
    figure.write_html(path)
    assert path.stat().st_size > 0


def test_method_comparison_without_directions_or_reference():
    figure = plot_method_comparison(make_table(directions=False), reference=None)
    assert [annotation.text for annotation in figure.layout.annotations] == list(METRICS)
    assert len(figure.layout.shapes) == 0


@pytest.mark.usefixtures("without_type_checks")
def test_method_comparison_rejects_bad_tables():
    table = make_table()
    columns = r"table must have rows and columns \['method', 'metric', 'mean', 'ci_low', 'ci_high'\]"
    with pytest.raises(ValueError, match=columns):
        plot_method_comparison(table.drop(columns="ci_low"))
    with pytest.raises(ValueError, match="with 0 rows"):
        plot_method_comparison(table.iloc[:0])
    with pytest.raises(ValueError, match=r"table must hold one row per \(method, metric\), got duplicates"):
        plot_method_comparison(pd.concat([table, table.iloc[:1]]))
    with pytest.raises(ValueError, match="table must be a pandas DataFrame"):
        plot_method_comparison(table.to_dict())
    with pytest.raises(ValueError, match="columns must be a positive int, got 0"):
        plot_method_comparison(table, columns=0)


def grid_inputs(n_images: int = 3):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n_images, 3, 32, 32, generator=generator)
    maps = {
        "patches": torch.randn(n_images, 4, 4, generator=generator),
        "pixels": torch.rand(n_images, 32, 32, generator=generator),
    }
    return images, maps


def test_attribution_grid_has_a_row_per_image_and_a_column_per_method(tmp_path):
    images, maps = grid_inputs()
    figure = plot_attribution_grid(images, maps, labels=[2, 0, 1], class_names=["ant", "bee", "cow"])
    assert isinstance(figure, go.Figure)
    # per image: the image, then image + heatmap per method
    assert len(figure.data) == 3 * (1 + 2 * len(maps))
    heatmaps = [trace for trace in figure.data if isinstance(trace, go.Heatmap)]
    assert len(heatmaps) == 3 * len(maps)
    # each map divided by its own largest |value|
    expected = maps["patches"][1] / maps["patches"][1].abs().max()
    np.testing.assert_allclose(np.asarray(heatmaps[2].z), expected.numpy(), rtol=1e-6)
    assert all(np.abs(np.asarray(h.z)).max() == pytest.approx(1.0) for h in heatmaps)
    assert heatmaps[0].dx == 8 and heatmaps[1].dx == 1
    assert [annotation.text for annotation in figure.layout.annotations] == ["image", "patches", "pixels"]
    # the class left of each row, on the first column's y axes (axes 1, 4, 7)
    assert [figure.layout[f"yaxis{axis}"].title.text for axis in ("", 4, 7)] == ["cow", "ant", "bee"]
    path = tmp_path / "grid.html"
    figure.write_html(path)
    assert path.stat().st_size > 0


@pytest.mark.usefixtures("without_type_checks")
def test_attribution_grid_rejects_bad_inputs():
    images, maps = grid_inputs()
    wrong_count = r"maps_by_method\['patches'\] must be \[3, map_h, map_w\] with map sides dividing"
    with pytest.raises(ValueError, match=wrong_count):
        plot_attribution_grid(images, {**maps, "patches": maps["patches"][:2]})
    with pytest.raises(ValueError, match=r"maps_by_method\['odd'\] must be .* got \(3, 5, 5\)"):
        plot_attribution_grid(images, {"odd": torch.zeros(3, 5, 5)})
    with pytest.raises(ValueError, match="maps_by_method must be a non-empty mapping"):
        plot_attribution_grid(images, {})
    with pytest.raises(ValueError, match=r"labels must give one class per image \(3\), got 2"):
        plot_attribution_grid(images, maps, labels=[0, 1])
    with pytest.raises(ValueError, match=r"labels must index class_names \(0 to 1\)"):
        plot_attribution_grid(images, maps, labels=[0, 1, 2], class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"opacity must be a number in \(0, 1\], got 0"):
        plot_attribution_grid(images, maps, opacity=0)
    with pytest.raises(ValueError, match=r"image must hold \[0, 1\] pixels"):
        plot_attribution_grid(images * 2 - 1, maps)
    with pytest.raises(ValueError, match=r"images must be a tensor \[batch, channel, height, width\]"):
        plot_attribution_grid(images[0], maps)
