"""Parity of HookedViT with the timm original, one test per supported family."""

import functools

import pytest
import timm
import torch
from timm.layers import QuickGELU
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from tests.conftest import tiny_timm_vit
from tests.conversion.checks import assert_timm_parity
from vitlens_patch.conversion import config_from_timm, convert_timm_state_dict
from vitlens_patch.model import HookedViT

FAMILIES = {
    "plain_vit_token_pool": dict(),
    "layer_scale_deit3": dict(init_values=1e-1, no_embed_class=True),
    "register_tokens": dict(reg_tokens=4),
    "register_tokens_no_class_token_avg": dict(reg_tokens=2, class_token=False, global_pool="avg"),
    "clip_style_pre_norm_quick_gelu": dict(pre_norm=True, act_layer=QuickGELU, norm_layer=functools.partial(nn.LayerNorm, eps=1e-5)),
    "avg_pool_fc_norm": dict(global_pool="avg", fc_norm=True),
    "avg_pool_without_fc_norm": dict(global_pool="avg", fc_norm=False),
    "max_pool": dict(global_pool="max"),
    "no_embed_class_dinov2_style": dict(no_embed_class=True, reg_tokens=4, init_values=1e-5),
    "qk_norm": dict(qk_norm=True),
    "no_qkv_bias": dict(qkv_bias=False),
    "non_square_input": dict(img_size=(32, 48)),
    "non_224_input_64": dict(img_size=64),
    "patch_size_4": dict(patch_size=4),
    "patch_size_32": dict(img_size=64, patch_size=32),
    "non_square_patch": dict(img_size=(32, 64), patch_size=(8, 16)),
    "gelu_tanh": dict(act_layer="gelu_tanh"),
    # backbones without a classifier: the output is the pooled features, or every token
    "headless_token_pool": dict(num_classes=0),
    "headless_tokens_global_pool_none": dict(num_classes=0, global_pool=""),
    "headless_avg_pool_fc_norm": dict(num_classes=0, global_pool="avg", fc_norm=True),
    "headless_dinov2_style": dict(num_classes=0, no_embed_class=True, reg_tokens=4, init_values=1e-5),
    "headless_clip_style": dict(num_classes=0, pre_norm=True, act_layer=QuickGELU),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_timm_family_parity(family):
    model = tiny_timm_vit(**FAMILIES[family])
    height, width = model.patch_embed.img_size
    assert_timm_parity(model, torch.randn(4, 3, height, width))


@pytest.mark.parametrize("num_classes", [10, 0])
def test_deit_distilled_parity_two_prefix_tokens_two_heads(num_classes):
    torch.manual_seed(0)
    model = VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes
    ).eval()
    assert config_from_timm(model).n_prefix_tokens == 2
    assert_timm_parity(model, torch.randn(4, 3, 32, 32))


def test_headless_output_shapes_and_hook_pooled():
    images = torch.randn(2, 3, 32, 32)
    pooled = HookedViT.from_timm(tiny_timm_vit(num_classes=0))
    tokens = HookedViT.from_timm(tiny_timm_vit(num_classes=0, global_pool=""))
    assert pooled.cfg.n_classes == 0 and pooled.head is None
    assert tokens.cfg.pooling == "none"
    features, cache = pooled.run_with_cache(images, names_filter="hook_pooled")
    assert features.shape == (2, 32) and torch.equal(cache["hook_pooled"], features)
    assert tokens(images).shape == (2, tokens.cfg.n_pos, 32)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "vit_base_patch32_clip_224.openai"])
def test_timm_registry_models_by_name(name):
    model = timm.create_model(name, pretrained=False, img_size=64, depth=2).eval()
    assert_timm_parity(model, torch.randn(2, 3, 64, 64))


def test_from_timm_copies_data_config():
    model = timm.create_model("vit_base_patch32_clip_224.openai", pretrained=False, img_size=64, depth=1)
    hooked = HookedViT.from_timm(model)
    assert hooked.data_config.mean == pytest.approx(model.pretrained_cfg["mean"])
    assert hooked.data_config.std == pytest.approx(model.pretrained_cfg["std"])
    assert hooked.data_config.input_size == (3, 64, 64)


UNSUPPORTED = [
    (lambda: timm.create_model("resnet18", pretrained=False), "model class ResNet"),
    (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False), "model class SwinTransformer"),
    (lambda: tiny_timm_vit(global_pool="prr"), "global_pool=.prr. is not supported"),
    (lambda: tiny_timm_vit(dynamic_img_size=True, dynamic_img_pad=True), "patch embedding PatchEmbed with these options"),
    (lambda: tiny_timm_vit(global_pool=""), "global_pool='' with a classifier"),
    (lambda: tiny_timm_vit(mlp_layer=timm.layers.GluMlp), "GluMlp with gate_last=True"),
    (lambda: tiny_timm_vit(mlp_layer=timm.layers.GatedMlp), "MLP type GatedMlp"),
    (lambda: tiny_timm_vit(norm_layer=timm.layers.RmsNormFp32), "normalisation RmsNormFp32"),
    (lambda: tiny_timm_vit(pos_embed="none"), "pos_embed='none'"),
]


@pytest.mark.parametrize("build, message", UNSUPPORTED, ids=[m for _, m in UNSUPPORTED])
def test_unsupported_timm_feature_raises_naming_it(build, message):
    with pytest.raises(NotImplementedError, match=message):
        HookedViT.from_timm(build())


def test_state_dict_conversion_is_strict_about_leftover_keys():
    model = tiny_timm_vit()
    state = model.state_dict() | {"extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="extra.weight"):
        convert_timm_state_dict(state, config_from_timm(model))


def test_state_dict_conversion_names_missing_keys():
    model = tiny_timm_vit()
    state = {k: v for k, v in model.state_dict().items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2.weight"):
        convert_timm_state_dict(state, config_from_timm(model))


def test_from_timm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="model_or_name"):
        HookedViT.from_timm(3)
    with pytest.raises(ValueError, match="only when model_or_name is a model name"):
        HookedViT.from_timm(tiny_timm_vit(), pretrained=True)


def test_from_timm_skips_random_init_and_shares_no_memory(monkeypatch):
    def fail(self, seed=None):
        raise AssertionError("init_weights ran although the weights are loaded next")

    model = tiny_timm_vit()
    monkeypatch.setattr(HookedViT, "init_weights", fail)
    hooked = HookedViT.from_timm(model)
    assert hooked.device.type == "cpu" and all(p.requires_grad for p in hooked.parameters())
    before = hooked.head.b_U.clone()
    with torch.no_grad():
        model.head.bias.add_(1.0)  # the converted model keeps its own copy
    assert torch.equal(hooked.head.b_U, before)


def test_from_timm_follows_the_models_dtype():
    hooked = HookedViT.from_timm(tiny_timm_vit().to(torch.float64))
    assert {p.dtype for p in hooked.parameters()} == {torch.float64}
