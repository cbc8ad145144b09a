"""Backbones without a classifier, with_head and the zero-shot head."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import QuickGELU
from torch import nn

from tests.conftest import tiny_timm_vit
from vitlens_patch.model import HookedViT
from vitlens_patch.model.components import ZeroShotHead


@pytest.fixture(scope="module")
def backbone() -> HookedViT:
    return HookedViT.from_timm(tiny_timm_vit(num_classes=0, reg_tokens=4, no_embed_class=True, init_values=0.1))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_linear_probe_reads_the_features(backbone, images):
    torch.manual_seed(0)
    probe = nn.Linear(32, 5)
    model = backbone.with_head(probe, class_names=tuple("abcde"))
    assert model.cfg.n_classes == 5 and model.class_names == tuple("abcde")
    with torch.no_grad():
        logits, cache = model.run_with_cache(images, names_filter=["hook_pooled", "hook_logits"])
        expected = probe(backbone(images))
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.equal(cache["hook_logits"], logits)
    assert torch.allclose(probe(cache["hook_pooled"]), logits, atol=1e-6)


def test_with_head_shares_the_backbone_and_leaves_it_headless(backbone, images):
    model = backbone.with_head(nn.Linear(32, 3))
    assert backbone.head is None and backbone.cfg.n_classes == 0
    assert model.blocks is backbone.blocks and model.embed.W_E is backbone.embed.W_E
    assert backbone(images).shape == (3, 32)
    assert set(model.hook_dict) == set(backbone.hook_dict)


def test_hooks_on_the_backbone_change_the_head_output(backbone, images):
    model = backbone.with_head(nn.Linear(32, 3))
    with torch.no_grad():
        clean = model(images)
        zeroed = model.run_with_hooks(images, fwd_hooks=[("blocks.1.hook_mlp_out", lambda act, hook: act * 0)])
    assert not torch.allclose(clean, zeroed)


def test_head_replaces_an_existing_classifier(images):
    classifier = HookedViT.from_timm(tiny_timm_vit(num_classes=10))
    probe = nn.Linear(32, 4)
    model = classifier.with_head(probe)
    with torch.no_grad():
        _, cache = classifier.run_with_cache(images, names_filter="hook_pooled")
        assert torch.allclose(model(images), probe(cache["hook_pooled"]), atol=1e-6)
    assert model.cfg.n_classes == 4 and classifier.cfg.n_classes == 10


def test_head_on_tokens_of_a_global_pool_none_backbone(images):
    tokens = HookedViT.from_timm(tiny_timm_vit(num_classes=0, global_pool=""))
    assert tokens.feature_shape == (tokens.cfg.n_pos, 32)

    class PatchMeanProbe(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(32, 2)

        def forward(self, tokens):
            return self.linear(tokens[:, 1:].mean(dim=1))

    probe = PatchMeanProbe()
    with torch.no_grad():
        assert torch.allclose(tokens.with_head(probe)(images), probe(tokens(images)), atol=1e-6)


@pytest.mark.parametrize(
    "head, message",
    [
        ("linear", "head must be an nn.Module"),
        (nn.Linear(31, 5), "mat1 and mat2"),
        (nn.Identity(), None),
        (nn.Sequential(nn.Linear(32, 5), nn.Unflatten(1, (5, 1))), r"got \(1, 5, 1\)"),
    ],
)
@pytest.mark.usefixtures("without_type_checks")
def test_with_head_rejects_bad_heads(backbone, head, message):
    if message is None:  # an identity "head" is a valid 32-class classifier
        assert backbone.with_head(head).cfg.n_classes == 32
        return
    with pytest.raises((ValueError, RuntimeError), match=message):
        backbone.with_head(head)


def test_zero_shot_head_siglip_style_value(backbone, images):
    text = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    model = backbone.with_zero_shot_head(text, logit_scale=2.3, logit_bias=-10.0)
    with torch.no_grad():
        features = backbone(images)
        expected = F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).T * torch.tensor(2.3).exp() - 10.0
        assert torch.allclose(model(images), expected, atol=1e-5)


def test_zero_shot_head_keeps_clip_projection(images):
    # A CLIP-style timm tower whose "classifier" is the image projection to a 16-d joint space.
    tower = HookedViT.from_timm(tiny_timm_vit(num_classes=16, pre_norm=True, act_layer=QuickGELU))
    text = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    model = tower.with_zero_shot_head(text, logit_scale=torch.tensor(4.6052))
    with torch.no_grad():
        embeds = tower(images)
        expected = 100.0 * F.normalize(embeds, dim=-1) @ F.normalize(text, dim=-1).T
        assert torch.allclose(model(images), expected, atol=1e-3)
    assert model.head.projection is tower.head


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text_embeddings=torch.zeros(5)), r"text_embeddings must be a tensor \[n_classes, d_embed\]"),
        (dict(text_embeddings=torch.zeros(0, 32)), "n_classes >= 1"),
    ],
)
@pytest.mark.usefixtures("without_type_checks")
def test_zero_shot_head_rejects_bad_text_embeddings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZeroShotHead(logit_scale=1.0, **kwargs)


def test_zero_shot_head_embedding_width_must_match(backbone):
    with pytest.raises(ValueError, match=r"image embeddings must be \[batch, 8\]"):
        backbone.with_zero_shot_head(torch.randn(3, 8), logit_scale=1.0)


def test_linear_classifier_needs_pooled_vector():
    from vitlens_patch.model import ViTConfig

    with pytest.raises(ValueError, match="pooling='none'"):
        HookedViT(ViTConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, img_size=32, patch_size=8,
                            n_classes=3, pooling="none"))
