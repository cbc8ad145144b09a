"""CAAP against a plain per-patch reference, and its interface."""

import pytest
import torch

from tests.conftest import tiny_timm_vit
from tests.references import caap_per_patch_reference
from vitlens_patch.attribution import get_attributor
from vitlens_patch.attribution.caap import CAAP, caap, default_layers
from vitlens_patch.model import HookedViT
from vitlens_patch.patching import engine
from vitlens_patch.patching.engine import rows_per_pass_within


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return HookedViT.from_timm(tiny_timm_vit(depth=4))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layers", [(1, 3), (0, 4), (2, 3)])
@pytest.mark.parametrize("rows_per_pass", [None, 5, 16])
def test_caap_equals_per_patch_reference(model, images, layers, rows_per_pass):
    maps = caap(model, images, layers=layers, rows_per_pass=rows_per_pass, progress=False)
    expected = caap_per_patch_reference(model, images, layers=layers)
    assert maps.shape == (3, 4, 4)
    assert (maps - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("context", ["zeros", "mean"])
def test_caap_contexts_match_reference(model, images, context):
    maps = caap(model, images, layers=(1, 3), context=context, progress=False)
    assert (maps - caap_per_patch_reference(model, images, layers=(1, 3), context=context)).abs().max() <= 1e-4


def test_maps_do_not_depend_on_image_batching(model, images):
    together = caap(model, images, progress=False)
    one_by_one = torch.cat([caap(model, images[i : i + 1], progress=False) for i in range(3)])
    assert (together - one_by_one).abs().max() <= 1e-5
    target = torch.tensor([1, 4, 7])
    for batch_size in (1, 2):
        chunked = caap(model, images, target=target, batch_size=batch_size, progress=False)
        assert (chunked - caap(model, images, target=target, progress=False)).abs().max() <= 1e-5


def record_passes(monkeypatch, model) -> list[int]:
    """Rows of every restoring pass (``run_with_hooks`` from a cached residual stream)."""
    rows, run_with_hooks = [], model.run_with_hooks

    def recording(inputs, *args, start_at_layer=None, **kwargs):
        if start_at_layer is not None:
            rows.append(len(inputs))
        return run_with_hooks(inputs, *args, start_at_layer=start_at_layer, **kwargs)

    monkeypatch.setattr(model, "run_with_hooks", recording)
    return rows


def test_caap_on_cuda_uses_the_cuda_memory_budget_not_batch_size(model, images, monkeypatch):
    """Issue 10 criterion 2: CAAP(model) leaves the rows per pass to the engine's budget for the
    model's device type; here the engine is told the model is on CUDA (no GPU needed)."""
    cuda_rows = rows_per_pass_within(model, device_type="cuda")
    assert cuda_rows == rows_per_pass_within(model, 4096.0) > rows_per_pass_within(model, device_type="cpu")
    chosen = []

    def as_on_cuda(model, memory_budget_mb=None, rows_per_pass=None, *, device_type=None):
        chosen.append(rows_per_pass_within(model, memory_budget_mb, rows_per_pass, device_type="cuda"))
        return chosen[-1]

    monkeypatch.setattr(engine, "rows_per_pass_within", as_on_cuda)
    passes = record_passes(monkeypatch, model)
    attributor = CAAP(model, layers=(1, 3), progress=False)
    assert attributor.batch_size == 32 and attributor.rows_per_pass is None
    attributor.attribute(images)
    assert chosen == [cuda_rows] and cuda_rows > 32
    assert passes == [len(images) * model.cfg.n_patches]  # 48 rows in one pass: not cut at 32


def test_caap_rows_per_pass_and_batch_size_images(model, images, monkeypatch):
    passes = record_passes(monkeypatch, model)
    CAAP(model, layers=(1, 3), rows_per_pass=20, progress=False).attribute(images)
    assert passes == [20, 20, 8]
    passes.clear()
    CAAP(model, layers=(1, 3), batch_size=2, progress=False).attribute(images)
    assert passes == [2 * 16, 16]  # images 0-1, then image 2: batch_size counts images


def test_default_layers_are_the_middle_half():
    assert default_layers(12) == (3, 9)
    assert default_layers(4) == (1, 3)


def test_upsampled_maps_have_image_shape(model, images):
    maps = caap(model, images, upsample="bicubic", progress=False)
    assert maps.shape == (3, 32, 32)


def test_caap_is_registered_attributor(model, images):
    attributor = get_attributor("caap", model, layers=(1, 3), progress=False)
    assert isinstance(attributor, CAAP)
    assert torch.allclose(attributor.attribute(images), caap(model, images, layers=(1, 3), progress=False), atol=1e-6)


def test_explicit_target_is_the_class_explained(model, images):
    predicted = model(images).argmax(-1)
    target = next(c for c in range(model.cfg.n_classes) if not (predicted == c).any())  # no image's prediction
    maps = caap(model, images, layers=(1, 3), target=target, progress=False)
    expected = caap_per_patch_reference(model, images, layers=(1, 3), target=target)
    assert (maps - expected).abs().max() <= 1e-4
    predicted_maps = caap(model, images, layers=(1, 3), progress=False)
    assert (maps - predicted_maps).abs().max() > 1e-3


def test_prob_score_maps_are_probability_differences(model, images):
    maps = caap(model, images, score="prob", target=2, progress=False)
    assert maps.abs().max() <= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=(3, 2)), "layers must be a block range"),
        (dict(layers=(0, 5)), "layers must be a block range"),
        (dict(context="noise"), "context must be one of"),
        (dict(context=torch.zeros(2, 3, 32, 32)), "context tensor must broadcast"),
        (dict(upsample="nearest"), "upsample must be False"),
        (dict(rows_per_pass=0), r"rows_per_pass must be a positive int or None, got 0"),
        (dict(batch_size=0), r"batch_size must be a positive int or None, got 0"),
        (dict(target=11), r"target must hold class indices in \[0, 9\], got \[11\]"),
    ],
)
@pytest.mark.usefixtures("without_type_checks")
def test_bad_arguments_raise_value_error(model, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        caap(model, images, progress=False, **kwargs)
