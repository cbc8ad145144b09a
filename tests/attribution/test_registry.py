"""One table drives every registered method through the same checks (as Captum's tests do)."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import tiny_timm_vit
from vitlens_patch.attribution import (
    ATTRIBUTORS,
    Attributor,
    attribute_all,
    get_attributor,
    register_attributor,
)
from vitlens_patch.model import HookedViT

# Options that keep each method fast on the tiny model; methods not listed use their defaults.
FAST_OPTIONS = {"integrated_gradients": {"n_steps": 8}}
METHODS = sorted(ATTRIBUTORS)


def build(name: str, model: HookedViT, **options) -> Attributor:
    return get_attributor(name, model, progress=False, **{**FAST_OPTIONS.get(name, {}), **options})


def assert_model_untouched(model: HookedViT) -> None:
    """No hook of any kind survives, and no parameter gradient was accumulated."""
    assert all(not hook_point.has_hooks("both", including_permanent=True)
               for hook_point in model.hook_dict.values())
    assert all(not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
               for module in model.modules())
    assert all(param.grad is None for param in model.parameters())


@pytest.fixture
def clean_registry():
    saved = dict(ATTRIBUTORS)
    yield ATTRIBUTORS
    ATTRIBUTORS.clear()
    ATTRIBUTORS.update(saved)


# ------------------------------------------------------------------ the method table
@pytest.mark.parametrize("name", METHODS)
def test_maps_cover_the_patch_grid(name, tiny_model, tiny_images):
    maps = build(name, tiny_model).attribute(tiny_images)
    assert maps.shape == (len(tiny_images), *tiny_model.cfg.grid_size)
    assert maps.is_floating_point() and torch.isfinite(maps).all()
    assert not maps.requires_grad
    assert_model_untouched(tiny_model)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("name", METHODS)
def test_upsampled_maps_cover_the_image(name, mode, tiny_model, tiny_images):
    maps = build(name, tiny_model, upsample=mode).attribute(tiny_images)
    assert maps.shape == (len(tiny_images), *tiny_model.cfg.img_size)
    assert torch.isfinite(maps).all()


@pytest.mark.parametrize("name", METHODS)
def test_target_forms_agree(name, tiny_model, tiny_images):
    method = build(name, tiny_model)
    predicted = tiny_model(tiny_images).argmax(dim=-1)
    batch = len(tiny_images)
    torch.testing.assert_close(method.attribute(tiny_images), method.attribute(tiny_images, predicted))
    as_int = method.attribute(tiny_images, 3)
    torch.testing.assert_close(as_int, method.attribute(tiny_images, torch.full((batch,), 3)))
    torch.testing.assert_close(as_int, method.attribute(tiny_images, torch.tensor(3)))
    other = method.attribute(tiny_images, 4)
    assert method.uses_target == (not torch.allclose(as_int, other))


@pytest.mark.parametrize("name", METHODS)
def test_chunking_does_not_change_maps(name, tiny_model, tiny_images):
    whole = build(name, tiny_model, batch_size=64).attribute(tiny_images)
    chunked = build(name, tiny_model, batch_size=2).attribute(tiny_images)
    torch.testing.assert_close(whole, chunked, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_runs_inside_no_grad_and_with_frozen_weights(name, tiny_model, tiny_images):
    expected = build(name, tiny_model).attribute(tiny_images)
    tiny_model.requires_grad_(False)
    with torch.no_grad():
        maps = build(name, tiny_model).attribute(tiny_images)
    torch.testing.assert_close(maps, expected)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("overrides", [{"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}],
                         ids=["registers", "avg_pool_no_class_token"])
def test_other_prefix_tokens_and_poolings(name, overrides, tiny_images):
    model = HookedViT.from_timm(tiny_timm_vit(**overrides))
    maps = build(name, model).attribute(tiny_images)
    assert maps.shape == (len(tiny_images), *model.cfg.grid_size)
    assert torch.isfinite(maps).all()


@pytest.mark.parametrize("name", METHODS)
def test_no_hooks_left_after_a_bad_target(name, tiny_model, tiny_images):
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 9\], got \[10\]"):
        build(name, tiny_model).attribute(tiny_images, 10)
    assert_model_untouched(tiny_model)


@pytest.mark.parametrize("name", METHODS)
def test_no_hooks_left_after_an_error_mid_forward(name, tiny_model, tiny_images, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("mlp exploded")

    # The last block's MLP runs after every attention pattern and token hook has fired.
    monkeypatch.setattr(tiny_model.blocks[-1].mlp, "forward", fail)
    method = build(name, tiny_model)
    if name == "random":  # never calls the model
        method.attribute(tiny_images)
    else:
        with pytest.raises(RuntimeError, match="mlp exploded"):
            method.attribute(tiny_images)
    assert_model_untouched(tiny_model)


# ------------------------------------------------------------------ registry functions
def test_unknown_method_lists_available_names(tiny_model):
    with pytest.raises(ValueError, match=r"method must be one of \[.*'occlusion'.*'rollout'.*\], got 'lime'"):
        get_attributor("lime", tiny_model)


def test_register_attributor_makes_a_method_available(clean_registry, tiny_model, tiny_images):
    class Constant(Attributor):
        def _attribute(self, images, target):
            return self._to_grid(torch.ones(len(images), self.model.cfg.n_patches))

    assert register_attributor("constant", Constant) is Constant
    maps = attribute_all(tiny_model, tiny_images, ["constant"], upsample="bilinear")["constant"]
    torch.testing.assert_close(maps, torch.ones(len(tiny_images), *tiny_model.cfg.img_size))
    register_attributor("constant", Constant)  # same class again: no-op
    with pytest.raises(ValueError, match="'constant' is already registered to Constant"):
        register_attributor("constant", ATTRIBUTORS["random"])
    register_attributor("constant", ATTRIBUTORS["random"], overwrite=True)
    assert ATTRIBUTORS["constant"] is ATTRIBUTORS["random"]


@pytest.mark.parametrize("name, cls, message", [
    ("", Attributor, "name must be a non-empty str"),
    ("thing", object, "cls must be an Attributor subclass"),
    ("thing", "vitlens_patch.attribution.caap:CAAP", "cls must be an Attributor subclass"),
])
@pytest.mark.usefixtures("without_type_checks")
def test_register_attributor_rejects_bad_input(name, cls, message, clean_registry):
    with pytest.raises(ValueError, match=message):
        register_attributor(name, cls)


def test_attribute_all_compares_methods_on_the_same_images(tiny_model, tiny_images):
    methods = ["rollout", "occlusion", "integrated_gradients"]
    method_options = {"integrated_gradients": {"n_steps": 4}, "occlusion": {"fill": "zeros"}}
    maps = attribute_all(tiny_model, tiny_images, methods, target=2, progress=False,
                         method_options=method_options)
    assert list(maps) == methods
    expected = build("occlusion", tiny_model, fill="zeros").attribute(tiny_images, 2)
    torch.testing.assert_close(maps["occlusion"], expected)


def test_attribute_all_defaults_to_every_registered_method(tiny_model, tiny_images):
    maps = attribute_all(tiny_model, tiny_images[:1], progress=False, method_options=FAST_OPTIONS)
    assert sorted(maps) == METHODS


@pytest.mark.parametrize("methods, method_options, message", [
    (["rollout", "lime"], None, r"methods must be among \[.*\], got unknown \['lime'\]"),
    (["rollout"], {"occlusion": {"fill": "zeros"}},
     r"method_options names methods not in methods .*\['occlusion'\]"),
])
def test_attribute_all_rejects_bad_names(methods, method_options, message, tiny_model, tiny_images):
    with pytest.raises(ValueError, match=message):
        attribute_all(tiny_model, tiny_images, methods, method_options=method_options)


def test_attribute_all_method_options_override_shared_options(tiny_model, tiny_images):
    maps = attribute_all(tiny_model, tiny_images, ["random", "rollout"], upsample="bilinear",
                         method_options={"random": {"upsample": False}})
    assert maps["random"].shape == (3, 4, 4) and maps["rollout"].shape == (3, 32, 32)


def test_registry_is_complete_in_a_fresh_interpreter():
    """get_attributor("caap") and attribute_all need no import beyond vitlens_patch.attribution."""
    code = """
import timm, torch
from vitlens_patch.attribution import ATTRIBUTORS, attribute_all, get_attributor
from vitlens_patch.model import HookedViT
torch.manual_seed(0)
vit = timm.models.vision_transformer.VisionTransformer(
    img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
model = HookedViT.from_timm(vit)
caap = get_attributor("caap", model, progress=False)
maps = attribute_all(model, torch.randn(2, 3, 32, 32), progress=False,
                     method_options={"integrated_gradients": {"n_steps": 2}})
assert "caap" in maps and maps["caap"].shape == (2, 4, 4), sorted(maps)
from vitlens_patch.attribution.caap import CAAP  # only now: the calls above needed no such import
assert isinstance(caap, CAAP)
print(sorted(ATTRIBUTORS))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "'caap'" in done.stdout
