"""Parity of HookedViT with timm's ``Eva`` class (EVA, EVA-02, RoPE-ViT, DINOv3), and the
patching tools on a converted Eva."""

import pytest
import timm
import torch
from timm.models.eva import Eva

from tests.conversion.checks import assert_timm_parity, family_tests, perturb_parameters, refusal_test
from tests.references import caap_per_patch_reference
from vitlens_patch.attribution.caap import caap
from vitlens_patch.conversion import config_from_timm
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.tracing import trace_grid

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)

FAMILIES = {
    "eva_plain_avg_fc_norm": dict(),
    "eva02_rope_swiglu_sub_ln": dict(use_rot_pos_emb=True, swiglu_mlp=True, scale_mlp=True),
    "eva02_packed_swiglu": dict(use_rot_pos_emb=True, swiglu_mlp=True),
    "eva02_sub_ln_attention_qk_norm": dict(
        use_rot_pos_emb=True, scale_attn_inner=True, swiglu_mlp=True, scale_mlp=True, qk_norm=True
    ),
    "rope_vit_half_rotation_token_pool": dict(use_rot_pos_emb=True, rope_rotate_half=True, attn_type="rope", global_pool="token"),
    "rope_vit_mixed_per_head_no_abs_pos": dict(
        use_rot_pos_emb=True, rope_type="mixed", attn_type="rope", global_pool="token", use_abs_pos_emb=False
    ),
    "dinov3_registers_layer_scale": dict(
        use_rot_pos_emb=True, rope_type="dinov3", rope_rotate_half=True, num_reg_tokens=4, init_values=0.1,
        dynamic_img_size=True, global_pool="token",
    ),
    "headless_eva02": dict(use_rot_pos_emb=True, swiglu_mlp=True, scale_mlp=True, num_classes=0),
    "eva02_separate_qkv_projections": dict(qkv_fused=False, use_rot_pos_emb=True, swiglu_mlp=True, scale_mlp=True),
    "sapiens2_gqa_rms_norm_attn_only_layer_scale": dict(
        attn_type="rope", qkv_fused=False, num_heads=4, num_kv_heads=(2, 4), qk_norm=True, use_rot_pos_emb=True,
        rope_type="dinov3", rope_rotate_half=True, num_reg_tokens=2, use_abs_pos_emb=False, global_pool="token",
        init_values=0.5, attn_only_layer_scale=True, swiglu_mlp=True, norm_layer=timm.layers.RmsNorm,
    ),
    "eva_clip_post_norm_blocks": dict(use_post_norm=True, global_pool="token"),
    "perception_encoder_map_pool": dict(global_pool="map", attn_type="rope", use_rot_pos_emb=True, use_pre_transformer_norm=True),
    "headless_map_pool_no_class_token": dict(global_pool="map", class_token=False, num_classes=0),
    "perception_encoder_pool_heads_and_mlp_differ": dict(global_pool="map", attn_pool_num_heads=1,
                                                          attn_pool_mlp_ratio=2.0),
}


def tiny_eva(**overrides) -> Eva:
    """A 2-layer Eva with every parameter perturbed (so a misplaced one shows), in eval mode."""
    torch.manual_seed(0)
    return perturb_parameters(Eva(**(TINY | overrides)))


NEW_VARIANTS = [
    "eva02_separate_qkv_projections", "sapiens2_gqa_rms_norm_attn_only_layer_scale", "eva_clip_post_norm_blocks",
    "perception_encoder_map_pool",
]
test_eva_family_parity, test_every_hook_of_the_new_eva_variants_is_live, test_tools_on_the_new_eva_variants_match_references = (
    family_tests(tiny_eva, FAMILIES, live=NEW_VARIANTS, traced=NEW_VARIANTS)
)


@pytest.mark.parametrize("name, kwargs", [
    ("eva02_base_patch14_224", dict(img_size=56)),
    ("vit_large_patch16_sapiens2", dict(img_size=(64, 48), embed_dim=64, num_heads=4, num_kv_heads=(4, 2, 2, 4))),
    ("eva02_enormous_patch14_clip_224", dict(img_size=56, embed_dim=64, num_heads=4)),
])
def test_new_eva_registry_models_by_name(name, kwargs):
    model = timm.create_model(name, pretrained=False, depth=len(kwargs.get("num_kv_heads", (0, 0))), **kwargs).eval()
    height, width = model.patch_embed.img_size
    assert_timm_parity(perturb_parameters(model), torch.randn(2, 3, height, width))


def test_eva_registry_model_by_name():
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, depth=2).eval()
    cfg = config_from_timm(model)
    assert (cfg.rotary, cfg.gated_mlp) == ("interleaved", True)
    assert_timm_parity(model, torch.randn(2, 3, 56, 56))


def test_hook_q_and_k_see_the_rotated_queries_and_keys():
    model = HookedViT.from_timm(tiny_eva(use_rot_pos_emb=True))
    images = torch.randn(2, 3, 32, 32)
    _, cache = model.run_with_cache(images, names_filter=lambda name: name.startswith("blocks.0."))
    attn = model.blocks[0].attn
    resid = cache["blocks.0.ln1.hook_normalized"]
    q = torch.einsum("bpd,hde->bphe", resid, attn.W_Q) + attn.b_Q
    assert not torch.allclose(q, cache["blocks.0.attn.hook_q"], atol=1e-4)  # the rotation moved it
    assert torch.allclose(attn.rotary(q), cache["blocks.0.attn.hook_q"], atol=1e-5)
    # prefix (class) token is not rotated
    assert torch.allclose(q[:, 0], cache["blocks.0.attn.hook_q"][:, 0], atol=1e-6)


def test_every_cached_hook_of_an_eva02_is_live():
    model = HookedViT.from_timm(tiny_eva(use_rot_pos_emb=True, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        clean, cache = model.run_with_cache(images)
        for name in cache.keys():
            def shift(activation, hook):  # not a constant shift, which a LayerNorm would remove
                noise = torch.randn(activation.shape, generator=torch.Generator().manual_seed(0))
                return activation + 0.5 * activation.std() * noise

            perturbed = model.run_with_hooks(images, fwd_hooks=[(name, shift)])
            assert not torch.allclose(perturbed, clean, atol=1e-6), name


def test_trace_grid_on_eva_equals_per_cell_run_with_hooks():
    model = HookedViT.from_timm(tiny_eva(use_rot_pos_emb=True, swiglu_mlp=True, scale_mlp=True))
    clean = torch.randn(2, 3, 32, 32)
    corrupted = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 4])
    positions = [0, 5]
    result = trace_grid(model, clean, corrupted, positions=positions, target=target, progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)

        def prob(logits):
            return logits.softmax(-1).gather(1, target[:, None])[:, 0]

        base = prob(model(corrupted))
        expected = torch.empty(2, model.cfg.n_layers, len(positions))
        for layer in range(model.cfg.n_layers):
            name = f"blocks.{layer}.hook_resid_pre"
            for column, position in enumerate(positions):
                def restore(activation, hook, position=position):
                    activation = activation.clone()
                    activation[:, position] = cache[hook.name][:, position]
                    return activation

                expected[:, layer, column] = prob(model.run_with_hooks(corrupted, fwd_hooks=[(name, restore)])) - base
    assert torch.allclose(result.effects, expected, atol=1e-5)


def test_caap_on_eva_equals_per_patch_reference():
    model = HookedViT.from_timm(tiny_eva(use_rot_pos_emb=True, rope_rotate_half=True, attn_type="rope", global_pool="token"))
    images = torch.randn(2, 3, 32, 32)
    maps = caap(model, images, layers=(0, 2), progress=False)
    assert torch.allclose(maps, caap_per_patch_reference(model, images, layers=(0, 2)), atol=1e-5)


UNSUPPORTED = [
    (dict(global_pool="map", swiglu_mlp=True), "pooling MLP of another activation"),
    (dict(norm_layer=timm.layers.BatchNormAct2d), "normalisation BatchNormAct2d"),
    (dict(dynamic_img_pad=True), "Eva patch embedding PatchEmbed with these options"),
]


test_unsupported_eva_feature_raises_naming_it = refusal_test(tiny_eva, UNSUPPORTED)
