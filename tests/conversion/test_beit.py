"""Parity of HookedViT with timm's ``Beit`` class (BEiT, BEiT v2: relative position bias), and the
patching tools on a converted BEiT."""

import pytest
import timm
import torch
from timm.models.beit import Beit

from tests.conversion.checks import (
    LAYER_NORM_FAMILY_REFUSALS, assert_timm_parity, family_tests, perturb_parameters, refusal_test, seeded_images,
)
from vitlens_patch.conversion.beit import convert_beit_state_dict
from vitlens_patch.conversion.timm import config_from_timm
from vitlens_patch.model import HookedViT

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)

FAMILIES = {
    "beit_rel_pos_bias_layer_scale": dict(use_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1),
    "beit_shared_rel_pos_bias_abs_pos": dict(use_shared_rel_pos_bias=True),
    "beit_own_and_shared_bias_swiglu_sub_ln_token_pool": dict(
        use_rel_pos_bias=True, use_shared_rel_pos_bias=True, swiglu_mlp=True, scale_mlp=True, global_pool="token"
    ),
    "beit_no_qkv_bias_no_rel_pos": dict(qkv_bias=False),
    "headless_beit": dict(use_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1, num_classes=0),
    "headless_beit_tokens": dict(use_rel_pos_bias=True, num_classes=0, global_pool=""),
}


def tiny_beit(**overrides) -> Beit:
    """A 2-layer Beit on 32x32 images with every parameter perturbed, in eval mode."""
    torch.manual_seed(0)
    return perturb_parameters(Beit(**(TINY | overrides)))


test_beit_family_parity, test_every_hook_of_a_beit_is_live, test_tools_on_beit_match_per_cell_references = (
    family_tests(tiny_beit, FAMILIES, traced=["beit_rel_pos_bias_layer_scale", "headless_beit"])
)


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "beitv2_base_patch16_224"])
def test_beit_registry_models_by_name(name):
    model = perturb_parameters(timm.create_model(name, pretrained=False, img_size=64, depth=2))
    assert config_from_timm(model).n_relative_positions == 7 * 7 + 3
    assert_timm_parity(model, torch.randn(2, 3, 64, 64))


def test_attention_scores_hook_sees_the_relative_position_bias_added():
    model = HookedViT.from_timm(tiny_beit(use_rel_pos_bias=True, use_abs_pos_emb=False))
    _, cache = model.run_with_cache(seeded_images(2), names_filter=lambda name: name.startswith("blocks.0.attn.hook_"))
    attn = model.blocks[0].attn
    q, k = (cache[f"blocks.0.attn.hook_{name}"].transpose(1, 2) for name in "qk")
    bias = attn.rel_pos()
    assert bias.shape == (2, model.cfg.n_pos, model.cfg.n_pos) and bias.abs().max() > 0
    expected = (q * model.cfg.d_head**-0.5) @ k.transpose(-2, -1) + bias
    assert torch.allclose(cache["blocks.0.attn.hook_attn_scores"], expected, atol=1e-6)


def test_beit_state_dict_conversion_is_strict():
    model = tiny_beit(use_rel_pos_bias=True)
    cfg = config_from_timm(model)
    index = model.blocks[0].attn.relative_position_index
    state = model.state_dict()
    with pytest.raises(ValueError, match="extra.weight"):
        convert_beit_state_dict(state | {"extra.weight": torch.zeros(1)}, cfg, index)
    missing = {k: v for k, v in state.items() if k != "blocks.1.attn.relative_position_bias_table"}
    with pytest.raises(ValueError, match="blocks.1.attn.relative_position_bias_table"):
        convert_beit_state_dict(missing, cfg, index)
    with pytest.raises(ValueError, match="rel_pos_index must be given"):
        convert_beit_state_dict(state, cfg)


test_unsupported_beit_feature_raises_naming_it = refusal_test(tiny_beit, LAYER_NORM_FAMILY_REFUSALS)
