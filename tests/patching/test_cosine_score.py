"""score="cosine": restoration measured on a backbone's features, against the clean output."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_timm_vit
from vitlens_patch.attribution import get_attributor
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.engine import run_restore
from vitlens_patch.patching.scores import resolve_score
from vitlens_patch.patching.sites import Site
from vitlens_patch.patching.tracing import trace_grid, trace_layers


@pytest.fixture(scope="module")
def backbone() -> HookedViT:
    return HookedViT.from_timm(tiny_timm_vit(num_classes=0, depth=3))


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 3, 32, 32, generator=generator)
    return clean, clean + 1.5 * torch.randn(3, 3, 32, 32, generator=generator)


def test_cosine_value():
    score = resolve_score("cosine")
    output = torch.tensor([[1.0, 0.0], [3.0, 4.0], [-2.0, 0.0]])
    clean = torch.tensor([[2.0, 0.0], [4.0, -3.0], [1.0, 1.0]])
    expected = torch.tensor([1.0, 0.0, -2 / (2 * 2**0.5)])
    assert torch.allclose(score(output, torch.zeros(3, dtype=torch.long), clean), expected, atol=1e-6)
    tokens = torch.randn(2, 5, 4)
    flat = F.cosine_similarity(tokens.flatten(1), (tokens + 1).flatten(1), dim=1)
    assert torch.allclose(score(tokens, None, tokens + 1), flat)


def test_restoring_everything_scores_one_and_the_corrupted_run_its_cosine(backbone, images):
    clean, corrupted = images
    result = trace_layers(backbone, clean, corrupted, kind="resid", window=1, score="cosine", progress=False)
    assert torch.allclose(result.clean_score, torch.ones(3), atol=1e-6)
    restored = result.effects + result.corrupted_score[:, None]
    assert torch.allclose(restored, torch.ones(3, 3), atol=1e-5)
    with torch.no_grad():
        expected = F.cosine_similarity(backbone(corrupted), backbone(clean), dim=1)
    assert torch.allclose(result.corrupted_score, expected, atol=1e-5)


def test_cosine_cells_match_a_per_cell_reference(backbone, images):
    clean, corrupted = images
    cells = [(Site(f"blocks.{layer}.hook_attn_out", (0, 4)),) for layer in range(3)]
    out = run_restore(backbone, clean, corrupted, cells, score="cosine", progress=False)
    with torch.no_grad():
        reference_clean, cache = backbone.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_attn_out"))
        for index, (site,) in enumerate(cells):
            def restore(act, hook, name=site.hook_name):
                act = act.clone()
                act[:, [0, 4]] = cache[name][:, [0, 4]]
                return act
            restored = backbone.run_with_hooks(corrupted, fwd_hooks=[(site.hook_name, restore)])
            expected = F.cosine_similarity(restored, reference_clean, dim=1)
            assert torch.allclose(out.restored_score[:, index], expected, atol=1e-5)
    assert (out.target == -1).all()


def test_cosine_on_tokens_output():
    tokens = HookedViT.from_timm(tiny_timm_vit(num_classes=0, global_pool=""))
    clean = torch.randn(2, 3, 32, 32)
    grid = trace_grid(tokens, clean, "grayscale", positions=[0, 3], score="cosine", progress=False)
    assert grid.effects.shape == (2, 2, 2) and torch.allclose(grid.clean_score, torch.ones(2), atol=1e-6)


def test_headless_model_refuses_class_scores_and_targets(backbone, images):
    clean, corrupted = images
    with pytest.raises(ValueError, match="needs class logits but the model has no classifier"):
        trace_layers(backbone, clean, corrupted, score="prob", progress=False)
    with pytest.raises(ValueError, match="target must be None for a model without a classifier"):
        trace_layers(backbone, clean, corrupted, score="cosine", target=1, progress=False)


def test_attributors_refuse_cosine_and_headless_models(backbone):
    with pytest.raises(ValueError, match="attribution methods explain a class score"):
        get_attributor("occlusion", backbone)
    classifier = HookedViT.from_timm(tiny_timm_vit())
    with pytest.raises(ValueError, match="score='cosine' works with run_restore and trace_"):
        get_attributor("occlusion", classifier, score="cosine")


def test_attribution_patching_takes_cosine(backbone, images):
    from vitlens_patch.patching.attribution_patching import estimate_restore

    clean, corrupted = images
    cells = [(Site(f"blocks.{layer}.hook_attn_out"),) for layer in range(3)]
    exact = run_restore(backbone, clean, corrupted, cells, score="cosine", progress=False)
    estimate = estimate_restore(backbone, clean, corrupted, cells, score="cosine", progress=False)
    assert estimate.effects.shape == (3, 3) and torch.isfinite(estimate.effects).all()
    assert torch.allclose(estimate.clean_score, exact.clean_score, atol=1e-6)
    assert torch.allclose(estimate.corrupted_score, exact.corrupted_score, atol=1e-6)
