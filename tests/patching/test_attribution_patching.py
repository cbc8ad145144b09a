"""Attribution patching against exact effects, finite differences and an exact patched softmax."""

import pytest
import torch

import vitlens_patch
from vitlens_patch.model import HookedViT, ViTConfig
from vitlens_patch.patching.attribution_patching import estimate_restore, pattern_terms
from vitlens_patch.patching.engine import run_restore
from vitlens_patch.patching.results import TraceResult
from vitlens_patch.patching.sites import Site
from vitlens_patch.patching.tracing import trace_grid, trace_heads, trace_layers


@pytest.fixture(scope="module")
def linear_head_model() -> HookedViT:
    """2 layers, d_model 32, no final norm: the logit is linear in the last block's outputs."""
    cfg = ViTConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=64, img_size=32, patch_size=8, n_classes=10,
                    final_norm="none")
    model = HookedViT(cfg).double()
    model.init_weights(seed=0)
    with torch.no_grad():  # larger weights than the default init, for effects well above rounding
        for param in model.parameters():
            param.mul_(10.0)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64)
    return clean, clean + torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("hook", ["hook_mlp_out", "hook_resid_post"])
def test_estimate_equals_exact_effect_where_the_score_is_linear(linear_head_model, images, hook):
    model, (clean, corrupted) = linear_head_model, images
    cells = [[Site(f"blocks.1.{hook}", (token,))] for token in range(model.cfg.n_pos)]
    cells.append([Site(f"blocks.1.{hook}")])  # every token at once: the sum of the terms
    exact = run_restore(model, clean, corrupted, cells, score="logit", progress=False)
    estimate = estimate_restore(model, clean, corrupted, cells, score="logit", progress=False)
    assert exact.effects.abs().max() > 1e-2
    torch.testing.assert_close(estimate.effects, exact.effects, atol=1e-5, rtol=1e-5)  # float32 outputs
    torch.testing.assert_close(estimate.clean_score, exact.clean_score)
    torch.testing.assert_close(estimate.corrupted_score, exact.corrupted_score)


def test_estimate_is_not_exact_where_the_score_is_nonlinear(linear_head_model, images):
    """The test above can fail: through a block (LayerNorm, GELU, softmax) the estimate differs."""
    model, (clean, corrupted) = linear_head_model, images
    cells = [[Site("blocks.0.hook_attn_out", (token,))] for token in range(model.cfg.n_pos)]
    exact = run_restore(model, clean, corrupted, cells, score="logit", progress=False)
    estimate = estimate_restore(model, clean, corrupted, cells, score="logit", progress=False)
    assert (estimate.effects - exact.effects).abs().max() > 1e-3


@pytest.fixture(scope="module")
def embedded() -> HookedViT:
    return vitlens_patch.cifar10_vit().double()


@pytest.fixture(scope="module")
def sample(embedded) -> torch.Tensor:
    """Two test images of the embedded model, float64: [2, 3, 64, 64]."""
    return embedded.preprocess(vitlens_patch.pretrained.sample_images().images[[0, 50]])


def directional_derivative(model, clean, corrupted, cell, step=1e-4):
    """Central finite difference of the prob score along a = a_corrupted + e (a_clean - a_corrupted)
    at the cell's entries, for image 0."""
    names = {site.hook_name for site in cell}
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=lambda name: name in names)
        _, corrupted_cache = model.run_with_cache(corrupted, names_filter=lambda name: name in names)
        target = clean_logits.argmax(-1)

        def score_at(epsilon):
            def move(act, hook):
                act = act.clone()
                for site in cell:
                    if site.hook_name != hook.name:
                        continue
                    index = (slice(None), list(site.positions))
                    if site.heads is not None:
                        index = (*index, list(site.heads))
                    delta = clean_cache[hook.name] - corrupted_cache[hook.name]
                    act[index] = act[index] + epsilon * delta[index]
                return act

            logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, move) for name in names])
            return logits.softmax(-1).gather(1, target[:, None])[:, 0]

        return ((score_at(step) - score_at(-step)) / (2 * step))


@pytest.mark.parametrize("cell", [
    (Site("blocks.4.hook_resid_pre", (0,)),),
    (Site("blocks.2.hook_attn_out", (7,)), Site("blocks.3.hook_attn_out", (7,))),
    (Site("blocks.6.hook_mlp_out", (0, 20)),),
    (Site("blocks.8.attn.hook_z", (0, 1, 2), (1,)),),
    (Site("blocks.5.attn.hook_k", (9,), (2,)),),
])
def test_estimate_without_qk_fix_is_the_directional_derivative(embedded, sample, cell):
    clean, corrupted = sample[:1], sample[1:]
    estimate = estimate_restore(embedded, clean, corrupted, [cell], qk_fix=False, progress=False)
    expected = directional_derivative(embedded, clean, corrupted, cell)
    assert expected.abs().max() > 1e-6
    torch.testing.assert_close(estimate.effects[:, 0], expected.float(), rtol=1e-5, atol=1e-9)


def brute_force_pattern_terms(q_clean, k_clean, q_corrupted, k_corrupted, grad, patch):
    """For each token, rebuild the queries / keys with that token's clean ones and recompute the
    whole softmax."""
    def pattern(q, k):
        return (torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5).softmax(-1)

    base = pattern(q_corrupted, k_corrupted)
    terms = torch.empty(q_clean.shape[:3], dtype=q_clean.dtype)
    for token in range(q_clean.shape[1]):
        q, k = q_corrupted.clone(), k_corrupted.clone()
        if patch in ("query", "both"):
            q[:, token] = q_clean[:, token]
        if patch in ("key", "both"):
            k[:, token] = k_clean[:, token]
        terms[:, token] = ((pattern(q, k) - base) * grad).sum((-1, -2))
    return terms


@pytest.mark.parametrize("patch", ["query", "key", "both"])
def test_pattern_terms_equal_an_exact_recomputation_of_the_patched_softmax(patch):
    generator = torch.Generator().manual_seed(0)
    q_clean, k_clean, q_corrupted, k_corrupted = (
        3 * torch.randn(2, 7, 3, 4, generator=generator, dtype=torch.float64) for _ in range(4)
    )  # large scores: saturated softmaxes, where linearising fails
    grad = torch.randn(2, 3, 7, 7, generator=generator, dtype=torch.float64)
    terms = pattern_terms(q_clean, k_clean, q_corrupted, k_corrupted, grad, patch)
    expected = brute_force_pattern_terms(q_clean, k_clean, q_corrupted, k_corrupted, grad, patch)
    torch.testing.assert_close(terms, expected.float(), rtol=1e-4, atol=1e-5)


def test_qk_fix_agrees_with_the_linear_estimate_to_first_order(embedded, sample):
    """For a small corruption the fixed and the plain estimate agree up to second-order terms;
    for a large one the fix changes the estimate."""
    clean = sample[:1]
    direction = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cells = [[Site("blocks.3.hook_resid_pre", (token,))] for token in (0, 5, 30)]
    cells += [[Site("blocks.7.attn.hook_q", (0,))], [Site("blocks.7.attn.hook_k", (12,))]]
    gaps = []
    for size in (1e-3, 1.0):
        corrupted = clean + size * direction
        fixed = estimate_restore(embedded, clean, corrupted, cells, progress=False).effects
        plain = estimate_restore(embedded, clean, corrupted, cells, qk_fix=False, progress=False).effects
        gaps.append(((fixed - plain).abs().max() / plain.abs().max()).item())
    assert gaps[0] < 1e-2
    assert gaps[1] > 10 * gaps[0]


def test_qk_fix_patched_softmax_matches_the_model(embedded, sample):
    """The pattern the fix recomputes for a restored key is the model's pattern with that key."""
    images = sample
    names = ["blocks.5.attn.hook_q", "blocks.5.attn.hook_k"]
    with torch.no_grad():
        _, clean = embedded.run_with_cache(images[:1], names_filter=lambda name: name in names)
        _, corrupted = embedded.run_with_cache(images[1:], names_filter=lambda name: name in names)

        def restore_key(act, hook):
            act[:, 9] = clean["blocks.5.attn.hook_k"][:, 9]
            return act

        patterns = {}
        for restore in (False, True):
            hooks = [("blocks.5.attn.hook_k", restore_key)] if restore else []
            hooks.append(("blocks.5.attn.hook_pattern", lambda act, hook, r=restore: patterns.__setitem__(r, act)))
            embedded.run_with_hooks(images[1:], fwd_hooks=hooks)
    grad = torch.zeros_like(patterns[False])
    grad[..., 9] = 1.0  # the term is then the change of every row's weight on key 9
    terms = pattern_terms(clean[names[0]], clean[names[1]], corrupted[names[0]], corrupted[names[1]], grad, "key")
    change = (patterns[True] - patterns[False])[..., 9].sum(-1)  # [batch, head]
    torch.testing.assert_close(terms[:, 9].double(), change, rtol=1e-5, atol=1e-7)


def test_batches_give_the_same_estimate(linear_head_model, images):
    model, (clean, corrupted) = linear_head_model, images
    cells = [[Site("blocks.0.hook_resid_pre", (token,))] for token in range(3)]
    whole = estimate_restore(model, clean, corrupted, cells, target=2, progress=False)
    split = estimate_restore(model, clean, corrupted, cells, target=2, batch_size=2, progress=False)
    torch.testing.assert_close(whole.effects, split.effects)
    assert split.target.tolist() == [2, 2, 2]


@pytest.mark.parametrize("options, message", [
    (dict(qk_fix="yes"), "qk_fix must be True or False, got 'yes'"),
    (dict(batch_size=0), "batch_size must be a positive int or None, got 0"),
    (dict(batch_size=2.5), "batch_size must be a positive int or None, got 2.5"),
    (dict(cells=[]), "cells must be a non-empty list"),
    (dict(cells=[[Site("hook_embed")]]), "hook_name must be a block hook of this model"),
    (dict(target=[1, 2]), r"target must be None, an int or an integer tensor of shape \[batch\] = \[3\], got list"),
])
@pytest.mark.usefixtures("without_type_checks")
def test_bad_input_is_rejected(linear_head_model, images, options, message):
    clean, corrupted = images
    options = dict(cells=[[Site("blocks.0.hook_attn_out")]]) | options
    with pytest.raises(ValueError, match=message):
        estimate_restore(linear_head_model, clean, corrupted, progress=False, **options)


def test_pattern_terms_reject_an_unknown_patch():
    q = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError, match=r"patch must be one of \('query', 'key', 'both'\), got 'value'"):
        pattern_terms(q, q, q, q, torch.zeros(1, 1, 2, 2), "value")


@pytest.mark.parametrize("trace, options", [
    (trace_grid, dict(kind="resid_pre")),
    (trace_layers, dict(kind="mlp", window=2)),
    (trace_heads, dict()),
])
def test_traces_take_the_attribution_method(tiny_model, tiny_pair, trace, options):
    clean, corrupted = tiny_pair
    exact = trace(tiny_model, clean, corrupted, progress=False, **options)
    estimate = trace(tiny_model, clean, corrupted, method="attribution", progress=False, **options)
    assert estimate.dims == exact.dims and estimate.effects.shape == exact.effects.shape
    assert exact.exact.all() and not estimate.exact.any()
    assert estimate.settings["method"] == "attribution"
    torch.testing.assert_close(estimate.clean_score, exact.clean_score)
    assert not torch.allclose(estimate.effects, exact.effects)


def test_verify_top_k_scores_the_largest_estimates_exactly(tiny_model, tiny_pair):
    clean, corrupted = tiny_pair
    exact = trace_grid(tiny_model, clean, corrupted, progress=False)
    estimate = trace_grid(tiny_model, clean, corrupted, method="attribution", progress=False)
    verified = trace_grid(tiny_model, clean, corrupted, method="attribution", verify_top_k=5, progress=False)
    assert verified.exact.shape == exact.effects.shape
    assert verified.exact.flatten(1).sum(1).tolist() == [5, 5]
    for image in range(2):
        top = estimate.effects[image].flatten().topk(5).indices
        assert set(verified.exact[image].flatten().nonzero().flatten().tolist()) == set(top.tolist())
    mask = verified.exact
    torch.testing.assert_close(verified.effects[mask], exact.effects[mask])
    torch.testing.assert_close(verified.effects[~mask], estimate.effects[~mask])


def test_exact_mask_survives_save_and_indexing(tiny_model, tiny_pair, tmp_path):
    clean, corrupted = tiny_pair
    result = trace_heads(tiny_model, clean, corrupted, method="attribution", verify_top_k=2, progress=False)
    result.save(tmp_path / "heads.safetensors")
    loaded = TraceResult.load(tmp_path / "heads.safetensors")
    assert torch.equal(loaded.exact, result.exact)
    assert torch.equal(result[1].exact, result.exact[1:])
    assert torch.equal(result.normalized().exact, result.exact)


def test_bf16_engine_agrees_with_float32():
    model = vitlens_patch.cifar10_vit()
    images = model.preprocess(vitlens_patch.pretrained.sample_images().images[[0, 50]])
    full, low = (
        trace_grid(model, images, "grayscale", positions=[0, 30], dtype=dtype, progress=False)
        for dtype in (None, torch.bfloat16)
    )
    rank = lambda x: x.flatten().argsort().argsort().double()  # noqa: E731
    assert torch.corrcoef(torch.stack([rank(full.effects), rank(low.effects)]))[0, 1] > 0.99
    gap = (full.clean_score - full.corrupted_score).abs()
    assert ((full.effects - low.effects).abs().amax((1, 2)) / gap).max() < 0.1
    assert not torch.equal(full.effects, low.effects)  # bf16 did run


def test_bf16_autocast_keeps_the_logits_float32(tiny_model, tiny_pair):
    clean, _ = tiny_pair
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tiny_model(clean)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, tiny_model(clean).detach(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("options, message", [
    (dict(method="atp"), r"method must be one of \('exact', 'attribution'\), got 'atp'"),
    (dict(verify_top_k=5), "verify_top_k must be None or, with method='attribution', a positive int; got 5 with method='exact'"),
    (dict(method="attribution", verify_top_k=0), "verify_top_k must be None or, with method='attribution', a positive int; got 0"),
    (dict(dtype=torch.float16), r"dtype must be None, the model's dtype \(torch.float32\) or, for a float32 model on cpu, one of \['torch.bfloat16'\]; got torch.float16"),
    (dict(dtype="bf16"), "dtype must be None, the model's dtype"),
])
@pytest.mark.usefixtures("without_type_checks")
def test_trace_rejects_bad_method_options(tiny_model, tiny_pair, options, message):
    clean, corrupted = tiny_pair
    with pytest.raises(ValueError, match=message):
        trace_layers(tiny_model, clean, corrupted, window=1, progress=False, **options)


def test_engine_rejects_a_bad_selection(tiny_model, tiny_pair):
    clean, corrupted = tiny_pair
    with pytest.raises(ValueError, match=r"selected must be a bool tensor \[image, cell\] = \[2, 1\], got \(2, 2\)"):
        run_restore(tiny_model, clean, corrupted, [[Site("blocks.0.hook_attn_out")]], selected=torch.ones(2, 2, dtype=torch.bool))
