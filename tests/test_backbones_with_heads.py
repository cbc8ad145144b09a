"""Backbones without a classifier, with a head attached, run every tool unchanged.

A DINOv2-like timm backbone (registers, no prefix positions, layer scale, ``num_classes=0``) with
a linear probe, and a CLIP-like tower (pre-norm, QuickGELU, its image projection as classifier)
with a zero-shot head: every attributor, every metric, the tracing sweeps and CAAP.
"""

import pytest
import torch
from timm.layers import QuickGELU
from torch import nn

from tests.conftest import tiny_timm_vit
from vitlens_patch.attribution import ATTRIBUTORS, attribute_all
from vitlens_patch.metrics import (
    boxes_to_masks,
    deletion_auc,
    insertion_auc,
    localization_aupr,
    pointing_game,
    token_deletion_auc,
)
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.tracing import trace_grid, trace_layers


def dinov2_with_probe() -> HookedViT:
    backbone = HookedViT.from_timm(
        tiny_timm_vit(num_classes=0, reg_tokens=4, no_embed_class=True, init_values=0.1)
    )
    torch.manual_seed(0)
    return backbone.with_head(nn.Linear(32, 5))


def clip_with_zero_shot_head() -> HookedViT:
    tower = HookedViT.from_timm(tiny_timm_vit(num_classes=16, pre_norm=True, act_layer=QuickGELU))
    text = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    return tower.with_zero_shot_head(text, logit_scale=2.0)


MODELS = {"dinov2_linear_probe": dinov2_with_probe, "clip_zero_shot": clip_with_zero_shot_head}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request) -> HookedViT:
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_every_attributor_and_metric(model, images):
    maps = attribute_all(
        model, images, method_options={"integrated_gradients": {"n_steps": 4}}, progress=False
    )
    assert set(maps) == set(ATTRIBUTORS) and "caap" in maps
    for name, attribution in maps.items():
        assert attribution.shape == (2, *model.cfg.grid_size) and torch.isfinite(attribution).all(), name
    # every metric on every method's maps at once: the images repeated once per method
    stacked = torch.cat(list(maps.values()))
    repeated = images.repeat(len(maps), 1, 1, 1)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 32.0, 24.0]]).repeat(len(maps), 1)
    for value in (
        deletion_auc(model, repeated, stacked, n_steps=4, progress=False),
        insertion_auc(model, repeated, stacked, n_steps=4, progress=False),
        token_deletion_auc(model, repeated, stacked, n_steps=4, progress=False),
        localization_aupr(stacked, boxes_to_masks(boxes, model.cfg.img_size)),
    ):
        assert value.shape == (len(stacked),) and ((value >= 0) & (value <= 1)).all()
    assert pointing_game(stacked, boxes, image_size=model.cfg.img_size).shape == (len(stacked),)


def test_occlusion_depends_on_the_head(images):
    # The head is what is explained: another probe on the same backbone gives other maps.
    first = dinov2_with_probe()
    torch.manual_seed(1)
    second = first.with_head(nn.Linear(32, 5))
    maps = [attribute_all(m, images, ["occlusion"], target=0, progress=False)["occlusion"] for m in (first, second)]
    assert not torch.allclose(*maps)


def test_tracing_restores_the_head_output(model, images):
    corrupted = images.flip(0)
    layers = trace_layers(model, images, corrupted, kind="resid", window=1, progress=False)
    # restoring the whole residual stream of any layer restores the clean score exactly
    assert torch.allclose(layers.effects + layers.corrupted_score[:, None],
                          layers.clean_score[:, None].expand_as(layers.effects), atol=1e-5)
    grid = trace_grid(model, images, corrupted, positions=[0, 5], progress=False)
    assert grid.effects.shape == (2, model.cfg.n_layers, 2)
