"""CAAP against a plain per-patch reference, and its interface."""

import pytest
import torch

from tests.conftest import tiny_timm_vit
from tests.references import caap_per_patch_reference
from vitlens_patch.attribution import get_attributor
from vitlens_patch.attribution.caap import CAAP, caap, default_layers
from vitlens_patch.model import HookedViT


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return HookedViT.from_timm(tiny_timm_vit(depth=4))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layers", [(1, 3), (0, 4), (2, 3)])
@pytest.mark.parametrize("batch_size", [None, 5, 16])
def test_caap_equals_per_patch_reference(model, images, layers, batch_size):
    maps = caap(model, images, layers=layers, batch_size=batch_size, progress=False)
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


def test_prob_score_and_explicit_target(model, images):
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
        (dict(batch_size=0), "rows_per_pass must be a positive int"),
        (dict(target=11), r"target must hold class indices in \[0, 9\], got \[11\]"),
    ],
)
def test_bad_arguments_raise_value_error(model, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        caap(model, images, progress=False, **kwargs)
