"""caap_layer_sweep: one CAAP map per block range, scored by a faithfulness metric."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from vitlens_patch.attribution.caap import caap, default_layers
from vitlens_patch.metrics import deletion_auc
from vitlens_patch.recipes.caap_sweep import caap_layer_sweep, caap_sweep_cost, default_sweep_ranges

N_LAYERS = 4


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_default_ranges_are_about_a_dozen_on_the_quarter_points():
    ranges = default_sweep_ranges(12)
    assert ranges == [(0, 3), (0, 6), (0, 9), (0, 12), (3, 6), (3, 9), (3, 12), (6, 9), (6, 12), (9, 12)]
    assert default_layers(12) in ranges
    for n_layers in (4, 6, 8, 12, 24, 40):
        ranges = default_sweep_ranges(n_layers)
        assert 10 <= len(ranges) <= 12 and default_layers(n_layers) in ranges
        assert all(0 <= start < stop <= n_layers for start, stop in ranges)
    assert default_sweep_ranges(1) == [(0, 1)] and len(default_sweep_ranges(2)) == 3
    with pytest.raises(ValueError, match="n_layers must be an integer >= 1, got 0"):
        default_sweep_ranges(0)


@pytest.mark.usefixtures("without_type_checks")
def test_cost_estimate_of_vit_s16_in_forward_passes():
    vit_s16 = SimpleNamespace(cfg=SimpleNamespace(n_layers=12, n_patches=196))
    # per image 1 target forward + per range: 2 full forwards, 196 partial ones from its start,
    # 17 for deletion; and per range one forward of one image (the metric's class-count check)
    assert caap_sweep_cost(vit_s16) == pytest.approx(1671)
    assert caap_sweep_cost(vit_s16, 5) == pytest.approx(5 * 1661 + 10)
    assert caap_sweep_cost(vit_s16, ranges="all") == pytest.approx(12177.67, abs=0.01)
    assert caap_sweep_cost(vit_s16, ranges=[(11, 12)]) == pytest.approx(1 + 2 + 196 / 12 + 17 + 1)
    assert caap_sweep_cost(vit_s16, metric=lambda *a: None, ranges=[(0, 12)]) == pytest.approx(1 + 2 + 196)


def test_cost_estimate_counts_the_forward_passes_of_the_sweep(model, images):
    """Rows through every block, over the number of blocks, equal the estimate."""
    rows = []
    handles = [block.register_forward_hook(lambda m, i, o: rows.append(o.shape[0])) for block in model.blocks]
    try:
        caap_layer_sweep(model, images, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert sum(rows) / N_LAYERS == pytest.approx(caap_sweep_cost(model, len(images)))


def test_layer_sweep_scores_the_default_ranges_and_picks_the_best(model, images):
    result = caap_layer_sweep(model, images, metric="deletion", progress=False)
    assert list(zip(result.table["start"], result.table["stop"])) == default_sweep_ranges(N_LAYERS)
    assert result.best == tuple(result.table.loc[result.table["mean"].idxmin(), ["start", "stop"]])
    start, stop = result.best
    target = model(images).argmax(-1)
    maps = caap(model, images, layers=(start, stop), progress=False)
    direct = deletion_auc(model, images, maps, target, progress=False)
    assert direct.mean().item() == pytest.approx(result.table["mean"].min(), abs=1e-6)
    row = result.table.loc[result.table["mean"].idxmin()]
    assert row["std"] == pytest.approx(direct.double().std().item(), abs=1e-6) and row["n_images"] == 3
    assert repr(result).startswith("LayerSweepResult(10 block ranges, metric='deletion' (lower is better), best=")


def test_all_ranges_on_request(model, images):
    result = caap_layer_sweep(model, images[:1], ranges="all", progress=False)
    assert len(result.table) == N_LAYERS * (N_LAYERS + 1) // 2


def test_one_image_gives_no_warning_and_no_nan(model, images):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = caap_layer_sweep(model, images[:1], ranges=[(0, 2), (1, 3)], progress=False)
    assert not result.table[["mean", "std"]].isna().any().any()
    assert (result.table["std"] == 0).all() and (result.table["n_images"] == 1).all()


def test_progress_bar_counts_forward_passes_with_an_eta(model, images, capsys):
    caap_layer_sweep(model, images[:1], ranges=[(0, 2), (2, 4)], progress=True)
    bar = capsys.readouterr().err.strip().split("\r")[-1]
    total = round(caap_sweep_cost(model, 1, ranges=[(0, 2), (2, 4)]))
    assert bar.startswith("CAAP layer sweep: 100%") and f"{total}/{total}" in bar and "fwd/s" in bar
    assert "<00:00" in bar  # the ETA field


def test_layer_sweep_rejects_bad_metric(model, images):
    with pytest.raises(ValueError, match="metric must be one of"):
        caap_layer_sweep(model, images, metric="pointing", progress=False)
    with pytest.raises(ValueError, match="higher_is_better must be given"):
        caap_layer_sweep(model, images, metric=lambda *a, **k: None, progress=False)
    with pytest.raises(ValueError, match="ranges must hold at least one"):
        caap_layer_sweep(model, images, ranges=[], progress=False)
