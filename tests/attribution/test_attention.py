"""Attention rollout and Chefer et al.'s gradient-weighted relevance."""

import pytest
import torch

from tests.conftest import tiny_timm_vit
from vitlens_patch.attribution import AttentionRollout, CheferAttention
from vitlens_patch.attribution.attention import read_patch_relevance
from vitlens_patch.model import HookedViT, ViTConfig


def pattern_cache(model, images):
    _, cache = model.run_with_cache(images, names_filter=lambda name: name.endswith("attn.hook_pattern"))
    return [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]


@pytest.mark.parametrize("head_fusion, fuse", [
    ("mean", lambda pattern: pattern.mean(dim=1)),
    ("max", lambda pattern: pattern.amax(dim=1)),
    ("min", lambda pattern: pattern.amin(dim=1)),
])
def test_rollout_multiplies_renormalised_attention_through_layers(head_fusion, fuse, tiny_model, tiny_images):
    n_pos, n_prefix = tiny_model.cfg.n_pos, tiny_model.cfg.n_prefix_tokens
    rollout = torch.eye(n_pos)
    for pattern in pattern_cache(tiny_model, tiny_images):
        attention = fuse(pattern) + torch.eye(n_pos)
        rollout = attention / attention.sum(dim=-1, keepdim=True) @ rollout
    expected = rollout[:, 0, n_prefix:].reshape(len(tiny_images), *tiny_model.cfg.grid_size)
    maps = AttentionRollout(tiny_model, head_fusion=head_fusion, progress=False).attribute(tiny_images)
    torch.testing.assert_close(maps, expected)


def test_rollout_of_uniform_attention_is_flat(tiny_model, tiny_images):
    with torch.no_grad():
        for block in tiny_model.blocks:  # zero queries and keys: every token attends uniformly
            for param in (block.attn.W_Q, block.attn.b_Q, block.attn.W_K, block.attn.b_K):
                param.zero_()
    maps = AttentionRollout(tiny_model, progress=False).attribute(tiny_images)
    torch.testing.assert_close(maps, maps.flatten()[0].expand_as(maps))


@pytest.mark.usefixtures("without_type_checks")
def test_rollout_rejects_unknown_head_fusion(tiny_model):
    with pytest.raises(ValueError, match=r"head_fusion must be one of \('mean', 'max', 'min'\), got 'sum'"):
        AttentionRollout(tiny_model, head_fusion="sum")


@pytest.mark.parametrize("config, rows", [
    (dict(), [0]),
    (dict(n_register_tokens=2), [0]),
    (dict(distilled=True, pooling="distilled"), [0, 1]),
    (dict(class_token=False, pooling="avg"), "patches"),
    (dict(pooling="max", n_register_tokens=1), "patches"),
])
def test_relevance_is_read_at_the_pooled_tokens(config, rows):
    cfg = ViTConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=8, img_size=16, patch_size=8, **config)
    relevance = torch.rand(2, cfg.n_pos, cfg.n_pos, generator=torch.Generator().manual_seed(0))
    n_prefix = cfg.n_prefix_tokens
    rows = list(range(n_prefix, cfg.n_pos)) if rows == "patches" else rows
    expected = relevance[:, rows, n_prefix:].mean(dim=1)
    torch.testing.assert_close(read_patch_relevance(relevance, cfg), expected)


def test_chefer_on_one_block_is_positive_gradient_times_attention(tiny_images):
    model = HookedViT.from_timm(tiny_timm_vit(depth=1))
    target = torch.tensor([1, 5, 7])
    stored = []

    def keep(pattern, hook):
        pattern.retain_grad()
        stored.append(pattern)

    logits = model.run_with_hooks(tiny_images, fwd_hooks=[("blocks.0.attn.hook_pattern", keep)])
    logits.gather(1, target[:, None]).sum().backward()
    (pattern,) = stored
    weighted = (pattern.grad * pattern).clamp(min=0).mean(dim=1)
    expected = weighted[:, 0, 1:].reshape(len(tiny_images), *model.cfg.grid_size)  # R = I + A_bar
    model.zero_grad(set_to_none=True)
    maps = CheferAttention(model, progress=False).attribute(tiny_images, target)
    torch.testing.assert_close(maps, expected)


def test_chefer_maps_are_non_negative(tiny_model, tiny_images):
    maps = CheferAttention(tiny_model, progress=False).attribute(tiny_images)
    assert (maps >= 0).all() and (maps > 0).any()


def test_chefer_is_zero_when_attention_has_no_effect(tiny_model, tiny_images):
    with torch.no_grad():
        for block in tiny_model.blocks:
            block.attn.W_O.zero_()
            block.attn.b_O.zero_()
    maps = CheferAttention(tiny_model, progress=False).attribute(tiny_images)
    torch.testing.assert_close(maps, torch.zeros_like(maps))
