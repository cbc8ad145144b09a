"""timm ``VisionTransformer`` variants (attention pooling, RMSNorm, ...) -> HookedViT: parity on
small perturbed instances, live hooks, and the patching tools against per-cell references."""

import functools

import pytest
import timm
import torch
from timm.layers import HybridEmbed, RmsNorm, StdConv2dSame, SwiGLU, SwiGLUPacked
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import (
    DiffParallelScalingBlock,
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
)

from tests.conversion.checks import TOLERANCE, family_tests, perturb_parameters, relative_error, seeded_images
from vitlens_patch.model import HookedViT

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def tiny_hybrid_embed(channels: int = 16, **kwargs) -> HybridEmbed:
    """timm's R50+ViT embedding in miniature: a one-stage ResNetV2 (stride 4, 16 channels, group
    norms), then the patch projection (kernel 2: 8 pixels per token)."""
    backbone = ResNetV2(layers=(1,), channels=(channels,), stem_chs=8, num_classes=0, global_pool="", preact=False,
                        stem_type="same", conv_layer=functools.partial(StdConv2dSame, eps=1e-8),
                        norm_layer=functools.partial(timm.layers.GroupNormAct, num_groups=4))
    return HybridEmbed(backbone=backbone, **kwargs)

# family -> VisionTransformer kwargs over TINY
FAMILIES = {
    "siglip_map_pool": dict(class_token=False, global_pool="map", act_layer="gelu_tanh"),
    "map_pool_class_token_registers": dict(global_pool="map", reg_tokens=2),
    "map_pool_include_prefix_headless": dict(global_pool="map", pool_include_prefix=True, num_classes=0),
    "rms_norm_qk_norm": dict(norm_layer="rmsnorm", qk_norm=True, global_pool="avg"),
    "aimv2_embed_norm_rms_swiglu": dict(
        class_token=False, fc_norm=False, global_pool="avg", qkv_bias=False, proj_bias=False, act_layer="silu",
        mlp_ratio=2.75, norm_layer=functools.partial(RmsNorm, eps=1e-5),
        embed_norm_layer=functools.partial(RmsNorm, eps=1e-5), mlp_layer=SwiGLU,
    ),
    "dinov2_giant_swiglu_packed": dict(mlp_layer=SwiGLUPacked, act_layer="silu", init_values=0.5, reg_tokens=2),
    "beit3_scale_attn_and_mlp_norms": dict(scale_attn_norm=True, scale_mlp_norm=True),
    "hybrid_cnn_stem": dict(embed_layer=tiny_hybrid_embed, patch_size=2),
    "hybrid_stem_without_projection_mci_style": dict(
        embed_layer=functools.partial(tiny_hybrid_embed, channels=32, proj=False), patch_size=1, img_size=16,
    ),
    "img_size_not_a_multiple_of_patch_so400m_384_style": dict(img_size=(36, 44), class_token=False, global_pool="map"),
    "vit_xp_parallel_scaling_qk_norm_rms": dict(
        block_fn=ParallelScalingBlock, qkv_bias=False, qk_norm=True, norm_layer=RmsNorm, pre_norm=True,
        no_embed_class=True,
    ),
    "vit_pwee_parallel_layer_scale_registers_avg": dict(
        block_fn=ParallelScalingBlock, init_values=0.5, class_token=False, reg_tokens=1, global_pool="avg",
        no_embed_class=True, mlp_ratio=5,
    ),
    "parallel_fused_out_proj_qkv_bias": dict(block_fn=functools.partial(ParallelScalingBlock, fuse_out_proj=True),
                                             qkv_bias=True),
    "vit_dwee_diff_attention": dict(attn_layer="diff", init_values=0.5, class_token=False, no_embed_class=True,
                                    reg_tokens=1, global_pool="avg", depth=3),
    "diff_attention_qk_norm_scale_norm": dict(attn_layer="diff", qk_norm=True, scale_attn_norm=True),
    "vit_dpwee_diff_parallel_scaling": dict(block_fn=DiffParallelScalingBlock, init_values=0.5, class_token=False,
                                            no_embed_class=True, reg_tokens=1, global_pool="avg"),
    "diff_parallel_dual_lambda_qkv_bias": dict(block_fn=functools.partial(DiffParallelScalingBlock, dual_lambda=True),
                                               qkv_bias=True),
    "dynamic_img_size_intern_style": dict(dynamic_img_size=True, init_values=0.5, qk_norm=True),
    "vit_18x2_parallel_things_layer_scale": dict(block_fn=ParallelThingsBlock, init_values=0.5),
    "parallel_things_three_branches_rms_no_bias": dict(
        block_fn=functools.partial(ParallelThingsBlock, num_parallel=3), norm_layer="rmsnorm", qkv_bias=False,
        proj_bias=False, global_pool="avg",
    ),
    "res_post_block_rpn": dict(block_fn=ResPostBlock, init_values=0.5, class_token=False, global_pool="avg",
                               qkv_bias=False),
}


def tiny_vit(**overrides) -> VisionTransformer:
    """A 2-layer VisionTransformer with every parameter perturbed (so a misplaced one shows), in eval mode."""
    torch.manual_seed(0)
    return perturb_parameters(VisionTransformer(**(TINY | overrides)), scale=0.1)


def image_size(model: VisionTransformer) -> tuple[int, int]:
    return model.patch_embed.img_size


test_output_and_every_residual_stream_match_timm, test_every_hook_is_live, test_tools_match_per_cell_references = (
    family_tests(tiny_vit, FAMILIES, image_size=image_size)
)


def test_attention_pool_hooks_have_their_documented_shapes():
    model = HookedViT.from_timm(tiny_vit(**FAMILIES["map_pool_class_token_registers"]))
    _, cache = model.run_with_cache(torch.randn(2, 3, 32, 32), names_filter=lambda name: name.startswith("attn_pool"))
    n_keys, d_mlp = model.cfg.n_patches, model.cfg.d_mlp
    assert cache["attn_pool.hook_q"].shape == (2, 1, 2, 16)
    assert cache["attn_pool.hook_k"].shape == cache["attn_pool.hook_v"].shape == (2, n_keys, 2, 16)
    assert cache["attn_pool.hook_pattern"].shape == (2, 2, 1, n_keys)
    assert cache["attn_pool.hook_z"].shape == (2, 1, 2, 16)
    assert cache["attn_pool.hook_attn_out"].shape == cache["attn_pool.hook_mlp_out"].shape == (2, 32)
    assert cache["attn_pool.mlp.hook_post"].shape == (2, d_mlp)
    assert torch.allclose(cache["attn_pool.hook_pattern"].sum(-1), torch.ones(2, 2, 1))


def test_timm_siglip_by_name():
    model = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, depth=2, embed_dim=64,
                              num_heads=2).eval()
    hooked = HookedViT.from_timm(model)
    assert hooked.cfg.pooling == "map"
    x = seeded_images(2, image_size(model))
    with torch.no_grad():
        assert relative_error(hooked(x), model(x)) <= TOLERANCE


@pytest.mark.parametrize("overrides", [dict(), dict(no_embed_class=True, reg_tokens=2, global_pool="avg")])
@pytest.mark.parametrize("size", [(48, 40), (16, 24), (32, 32)])
def test_dynamic_img_size_resamples_position_embeddings_as_timm(overrides, size):
    model = tiny_vit(dynamic_img_size=True, **overrides)
    hooked = HookedViT.from_timm(model)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        output, cache = hooked.run_with_cache(x, names_filter="hook_pos_embed")
        expected = model(x)
    assert relative_error(output, expected) <= TOLERANCE
    grid = (size[0] // 8, size[1] // 8)
    assert cache["hook_pos_embed"].shape == (2, hooked.cfg.n_prefix_tokens + grid[0] * grid[1], 32)
    with pytest.raises(ValueError, match="at least one patch"):
        hooked(torch.randn(1, 3, 4, 32))
