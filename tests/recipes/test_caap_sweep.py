"""caap_layer_sweep: one CAAP map per block range, scored by a faithfulness metric."""

import pytest
import torch

from tests.conftest import tiny_timm_vit
from vitlens_patch.attribution.caap import caap
from vitlens_patch.metrics import deletion_auc
from vitlens_patch.model import HookedViT
from vitlens_patch.recipes.caap_sweep import caap_layer_sweep


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return HookedViT.from_timm(tiny_timm_vit(depth=4))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_layer_sweep_scores_every_range_and_picks_the_best(model, images):
    result = caap_layer_sweep(model, images, metric="deletion", progress=False)
    assert len(result.table) == 4 * 5 // 2
    assert result.best == tuple(result.table.loc[result.table["mean"].idxmin(), ["start", "stop"]])
    start, stop = result.best
    target = model(images).argmax(-1)
    maps = caap(model, images, layers=(start, stop), progress=False)
    direct = deletion_auc(model, images, maps, target, progress=False).mean().item()
    assert direct == pytest.approx(result.table["mean"].min(), abs=1e-6)


def test_layer_sweep_rejects_bad_metric(model, images):
    with pytest.raises(ValueError, match="metric must be one of"):
        caap_layer_sweep(model, images, metric="pointing", progress=False)
    with pytest.raises(ValueError, match="higher_is_better must be given"):
        caap_layer_sweep(model, images, metric=lambda *a, **k: None, progress=False)
