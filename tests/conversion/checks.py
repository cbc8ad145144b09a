"""Shared parity and tool checks for every converted family (HF towers, timm VisionTransformer
variants): relative error, live hooks, and the patching tools against per-cell references."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import timm
import torch

from vitlens_patch.model import HookedViT

# 2 layers, d_model 32; 1e-5 relative to the activation scale (the tolerance).
TOLERANCE = 1e-5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_every_hook_is_live(model: HookedViT, images: torch.Tensor) -> None:
    """Adding noise at any cached hook point (every hook the forward pass runs, per-head results
    included when the model defines them) changes the output."""
    model.set_use_attn_result(not model.cfg.attn_norm)
    try:
        with torch.no_grad():
            clean, cache = model.run_with_cache(images)
            assert len(cache.keys()) >= 0.9 * len(model.hook_dict)
            for name in cache.keys():
                def perturb(act, hook):  # scaled to the activation, not constant (LayerNorms remove shifts)
                    noise = torch.randn(act.shape, generator=torch.Generator().manual_seed(0))
                    return act + 0.1 * (act.std() + 1e-3) * noise

                perturbed = model.run_with_hooks(images, fwd_hooks=[(name, perturb)])
                assert not torch.allclose(perturbed, clean), name
    finally:
        model.set_use_attn_result(False)


def assert_tools_match_references(model: HookedViT, clean: torch.Tensor) -> None:
    """trace_layers, trace_grid (two cells per layer) and CAAP on a 2-layer model equal their
    per-cell ``run_with_hooks`` references within TOLERANCE; a backbone gets a linear probe."""
    from tests.patching.test_tracing import reference_scores, window_cells
    from tests.references import caap_per_patch_reference
    from vitlens_patch.attribution.caap import caap
    from vitlens_patch.patching.tracing import trace_grid, trace_layers

    if not model.cfg.n_classes:  # backbones get a linear probe (the same for every run)
        torch.manual_seed(0)
        model = model.with_head(torch.nn.Linear(model.cfg.d_pooled, 5))
    corrupted = clean + 1.5 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))
    positions = (0, model.cfg.n_prefix_tokens + 3)
    layers = trace_layers(model, clean, corrupted, kind="attn", window=1, positions=list(positions), progress=False)
    expected = reference_scores(model, clean, corrupted, window_cells(model, "hook_attn_out", 1, positions))
    assert (layers.effects + layers.corrupted_score[:, None] - expected).abs().max() <= TOLERANCE
    grid = trace_grid(model, clean, corrupted, kind="resid_pre", window=1, positions=list(positions), progress=False)
    expected = reference_scores(model, clean, corrupted, window_cells(model, "hook_resid_pre", 1, positions, per_token=True))
    assert (grid.effects + grid.corrupted_score[:, None, None] - expected.reshape(grid.effects.shape)).abs().max() <= TOLERANCE
    maps = caap(model, clean[:1], layers=(0, 2), progress=False)
    assert (maps - caap_per_patch_reference(model, clean[:1], layers=(0, 2))).abs().max() <= TOLERANCE


def perturb_parameters(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """``model`` in eval mode with every parameter perturbed, so that a dropped, swapped or
    misplaced one shows (norm weights not 1, biases and bias tables not 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
    return model.eval()


def assert_timm_parity(timm_model: torch.nn.Module, images: torch.Tensor) -> HookedViT:
    """``HookedViT.from_timm(timm_model)``: its output (with no hook cached and with every hook
    cached) and every block's output (``resid_post``) within TOLERANCE of the timm model's;
    returns the converted model."""
    hooked = HookedViT.from_timm(timm_model)
    with torch.no_grad():
        expected_blocks = []
        handles = [b.register_forward_hook(lambda m, i, o: expected_blocks.append(o)) for b in timm_model.blocks]
        try:
            expected = timm_model(images)
        finally:
            for handle in handles:
                handle.remove()
        output, cache = hooked.run_with_cache(images, names_filter=lambda name: name.endswith("hook_resid_post"))
        explicit, _ = hooked.run_with_cache(images)  # every hook cached: patterns and norm scales materialised
    assert output.shape == expected.shape
    assert relative_error(output, expected) <= TOLERANCE
    assert relative_error(explicit, expected) <= TOLERANCE
    assert len(expected_blocks) == hooked.cfg.n_layers
    for layer, block_out in enumerate(expected_blocks):
        assert relative_error(cache["resid_post", layer], block_out) <= TOLERANCE, layer
    return hooked


def seeded_images(batch: int = 3, size: Sequence[int] = (32, 32)) -> torch.Tensor:
    """Random images [batch, 3, height, width], the same on every call."""
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


def family_tests(
    build: Callable[..., torch.nn.Module],
    families: dict[str, dict],
    *,
    live: Sequence[str] | None = None,
    traced: Sequence[str] | None = None,
    image_size: Callable[[torch.nn.Module], Sequence[int]] = lambda model: (32, 32),
) -> tuple[Callable, Callable, Callable]:
    """The tests every converted timm family gets, parametrised over ``families`` (name -> kwargs
    of ``build``, which returns a perturbed timm model): parity with timm, every hook live (the
    ``live`` names; default all) and the patching tools against per-cell references (``traced``;
    default all), on ``seeded_images`` of ``image_size(model)``. A test module assigns them to
    ``test_*`` names."""

    @pytest.mark.parametrize("family", list(families))
    def test_parity(family):
        model = build(**families[family])
        assert_timm_parity(model, seeded_images(3, image_size(model)))

    @pytest.mark.parametrize("family", list(families) if live is None else live)
    def test_every_hook_is_live(family):
        model = build(**families[family])
        assert_every_hook_is_live(HookedViT.from_timm(model), seeded_images(2, image_size(model)))

    @pytest.mark.parametrize("family", list(families) if traced is None else traced)
    def test_tools_match_references(family):
        model = build(**families[family])
        assert_tools_match_references(HookedViT.from_timm(model), seeded_images(2, image_size(model)))

    return test_parity, test_every_hook_is_live, test_tools_match_references


# Refused by every LayerNorm-only timm family (Beit, RelPos): per-token logits, RMSNorm.
LAYER_NORM_FAMILY_REFUSALS = [
    (dict(global_pool=""), "global_pool='' with a classifier"),
    (dict(norm_layer=timm.layers.RmsNorm), "normalisation RmsNorm"),
]


def refusal_test(build: Callable[..., torch.nn.Module], unsupported: list[tuple[dict, str]]) -> Callable:
    """A test, parametrised over ``unsupported`` (kwargs of ``build``, message), that converting
    ``build(**kwargs)`` raises ``NotImplementedError`` matching the message."""

    @pytest.mark.parametrize("overrides, message", unsupported, ids=[message for _, message in unsupported])
    def test_unsupported_feature_raises_naming_it(overrides, message):
        with pytest.raises(NotImplementedError, match=message):
            HookedViT.from_timm(build(**overrides))

    return test_unsupported_feature_raises_naming_it
