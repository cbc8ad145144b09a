"""Parity of HookedViT with timm's ``NaFlexVit`` at a fixed input size (linear or convolutional patch
embedding, learned or factorised position embeddings resampled to the grid, attention / average /
token pooling), and the patching tools on a converted one."""

import pytest
import timm
import torch
from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

from tests.conversion.checks import assert_timm_parity, family_tests, perturb_parameters, refusal_test
from vitlens_patch.conversion.naflexvit import convert_naflexvit_state_dict
from vitlens_patch.conversion.timm import config_from_timm
from vitlens_patch.model import HookedViT

# pos_embed_grid_size (3, 3) against a 4 x 4 patch grid: the position embeddings are resampled
TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, pos_embed_grid_size=(3, 3))

FAMILIES = {
    "naflex_siglip_map_pool": dict(),
    "naflex_registers_avg_pool_fc_norm_layer_scale": dict(global_pool="avg", fc_norm=True, reg_tokens=4, init_values=0.1),
    "naflex_factorized_aspect_preserving": dict(pos_embed="factorized", pos_embed_ar_preserving=True, global_pool="avg"),
    "radio_class_token_bilinear_align_corners": dict(
        class_token=True, reg_tokens=3, global_pool="token", final_norm=False, pos_embed_interp_mode="bilinear",
        pos_embed_ar_preserving=True, pos_embed_antialias=False, pos_embed_align_corners=True,
    ),
    "naflex_conv_embedding_channels_first": dict(embed_proj_type="conv", global_pool="avg"),
    "naflex_patch_channels_first_embed_norm": dict(patchify_channels_last=False, embed_norm_layer="layernorm"),
    "headless_naflex": dict(global_pool="avg", reg_tokens=1, num_classes=0),
}


def tiny_naflexvit(**overrides) -> NaFlexVit:
    """A 2-layer NaFlexVit for 32x32 images with every parameter perturbed, in eval mode."""
    num_classes = overrides.pop("num_classes", 10)
    torch.manual_seed(0)
    model = NaFlexVit(NaFlexVitCfg(**(TINY | overrides)), num_classes=num_classes)
    model.pretrained_cfg = dict(input_size=(3, 32, 32))  # the size it is converted at
    return perturb_parameters(model)


test_naflexvit_family_parity, test_every_hook_of_a_naflexvit_is_live, test_tools_on_naflexvit_match_per_cell_references = (
    family_tests(
        tiny_naflexvit, FAMILIES, traced=["naflex_siglip_map_pool", "radio_class_token_bilinear_align_corners", "headless_naflex"]
    )
)


@pytest.mark.parametrize("name", ["naflexvit_base_patch16_siglip", "naflexvit_base_patch16_parfac_gap",
                                  "naflexvit_base_patch16_radio_v3"])
def test_naflexvit_registry_models_by_name_at_their_data_config_size(name):
    model = perturb_parameters(timm.create_model(name, pretrained=False, depth=2, embed_dim=64, num_heads=2))
    cfg = config_from_timm(model)
    assert (3, *cfg.img_size) == model.pretrained_cfg["input_size"]
    assert_timm_parity(model, torch.randn(2, 3, *cfg.img_size))


def test_naflexvit_state_dict_conversion_is_strict():
    model = tiny_naflexvit()
    cfg = config_from_timm(model)
    state = model.state_dict()
    with pytest.raises(ValueError, match="extra.weight"):
        convert_naflexvit_state_dict(state | {"extra.weight": torch.zeros(1)}, cfg, torch.zeros(cfg.n_patches, 32))
    with pytest.raises(ValueError, match="pos_embed must be given"):
        convert_naflexvit_state_dict(state, cfg, None)


UNSUPPORTED = [
    (dict(rope_type="axial"), "rotary position embeddings"),
    (dict(global_pool=""), "global_pool='' with a classifier"),
    (dict(dynamic_img_pad=True), "dynamic_img_pad"),
]


test_unsupported_naflexvit_feature_raises_naming_it = refusal_test(tiny_naflexvit, UNSUPPORTED)
