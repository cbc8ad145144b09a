"""Parity of HookedViT with timm's ``VisionTransformerRelPos`` (relative position bias from a table
or an MLP, shared or per layer, post-norm blocks), and the patching tools on a converted one."""

import pytest
import timm
import torch
from timm.models.vision_transformer_relpos import ResPostRelPosBlock, VisionTransformerRelPos

from tests.conversion.checks import (
    LAYER_NORM_FAMILY_REFUSALS, TOLERANCE, assert_timm_parity, family_tests, perturb_parameters, refusal_test,
    relative_error, seeded_images,
)
from vitlens_patch.conversion.relpos import convert_relpos_state_dict
from vitlens_patch.conversion.timm import config_from_timm
from vitlens_patch.model import HookedViT

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)

FAMILIES = {
    "relpos_mlp_avg_pool_layer_scale": dict(init_values=0.1),
    "relpos_mlp_class_token_fc_norm": dict(class_token=True, fc_norm=True, qkv_bias=False),
    "relpos_mlp_swin_token_pool": dict(rel_pos_type="mlp_swin", class_token=True, global_pool="token"),
    "relpos_bias_table_class_token": dict(rel_pos_type="bias", class_token=True, global_pool="token"),
    "srelpos_shared_mlp": dict(shared_rel_pos=True, rel_pos_dim=16),
    "relpos_post_norm_rpn": dict(block_fn=ResPostRelPosBlock, init_values=0.5),
    "headless_relpos_qk_norm": dict(num_classes=0, qk_norm=True),
}


def tiny_relpos(**overrides) -> VisionTransformerRelPos:
    """A 2-layer VisionTransformerRelPos on 32x32 images with every parameter perturbed, in eval mode."""
    torch.manual_seed(0)
    return perturb_parameters(VisionTransformerRelPos(**(TINY | overrides)))


test_relpos_family_parity, test_every_hook_of_a_relpos_vit_is_live, test_tools_on_relpos_match_per_cell_references = (
    family_tests(
        tiny_relpos, FAMILIES,
        traced=["relpos_mlp_class_token_fc_norm", "relpos_post_norm_rpn", "headless_relpos_qk_norm"],
    )
)


def test_explicit_attention_path_adds_the_same_bias_as_timm():
    model = tiny_relpos(class_token=True, global_pool="token")
    hooked = HookedViT.from_timm(model)
    identity = [(f"blocks.{i}.attn.hook_attn_scores", lambda scores, hook: scores) for i in range(2)]
    with torch.no_grad():
        assert relative_error(hooked.run_with_hooks(seeded_images(), fwd_hooks=identity), model(seeded_images())) <= TOLERANCE


@pytest.mark.parametrize("name", ["vit_relpos_small_patch16_224", "vit_relpos_medium_patch16_cls_224",
                                  "vit_srelpos_small_patch16_224", "vit_relpos_small_patch16_rpn_224"])
def test_relpos_registry_models_by_name(name):
    model = perturb_parameters(timm.create_model(name, pretrained=False, img_size=64, depth=2))
    assert_timm_parity(model, torch.randn(2, 3, 64, 64))


@pytest.mark.usefixtures("without_type_checks")
def test_relpos_state_dict_conversion_is_strict():
    model = tiny_relpos()
    cfg = config_from_timm(model)
    state = model.state_dict()
    with pytest.raises(ValueError, match="extra.weight"):
        convert_relpos_state_dict(state | {"extra.weight": torch.zeros(1)}, cfg, [(None, None)] * 2)
    with pytest.raises(ValueError, match="one \\(W_rel, index\\) pair per layer"):
        convert_relpos_state_dict(state, cfg)


test_unsupported_relpos_feature_raises_naming_it = refusal_test(tiny_relpos, LAYER_NORM_FAMILY_REFUSALS)
