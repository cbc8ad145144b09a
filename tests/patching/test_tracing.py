"""The engine and the tracing sweeps against a plain cell-by-cell reference."""

import pytest
import torch

from tests.conftest import tiny_timm_vit
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.engine import run_restore
from vitlens_patch.patching.scores import resolve_score
from vitlens_patch.patching.sites import BLOCK_HOOK, HEAD_HOOKS, Site, layer_window
from vitlens_patch.patching.tracing import trace_grid, trace_heads, trace_layers

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return HookedViT.from_timm(tiny_timm_vit(depth=4))


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 3, 32, 32, generator=generator)
    return clean, clean + 1.5 * torch.randn(3, 3, 32, 32, generator=generator)


def reference_scores(model, clean, corrupted, cells, score="prob"):
    """One full run_with_hooks per (image, cell): the plain definition of restoration."""
    score_fn = resolve_score(score)
    with torch.no_grad():
        names = {site.hook_name for cell in cells for site in cell}
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda name: name in names)
        target = model(clean).argmax(-1)
        out = torch.empty(clean.shape[0], len(cells))
        for c, cell in enumerate(cells):
            hooks = []
            for site in cell:
                def restore(act, hook, site=site):
                    act = act.clone()
                    positions = slice(None) if site.positions is None else list(site.positions)
                    source = clean_cache[site.hook_name]
                    if BLOCK_HOOK.match(site.hook_name).group(2) in HEAD_HOOKS and site.heads is not None:
                        for head in site.heads:
                            act[:, positions, head] = source[:, positions, head]
                    else:
                        act[:, positions] = source[:, positions]
                    return act
                hooks.append((site.hook_name, restore))
            logits = model.run_with_hooks(corrupted, fwd_hooks=hooks)
            out[:, c] = score_fn(logits, target)
    return out


def window_cells(model, hook, window, tokens=None, heads=None, per_token=False):
    n_layers = model.cfg.n_layers
    cells = []
    for layer in range(n_layers):
        start = layer - window // 2
        layers = range(max(0, start), min(n_layers, start + window))
        if per_token:
            cells += [tuple(Site(f"blocks.{j}.{hook}", (t,)) for j in layers) for t in tokens]
        elif heads is not None:
            cells += [tuple(Site(f"blocks.{j}.{hook}", tokens, (h,)) for j in layers) for h in heads]
        else:
            cells.append(tuple(Site(f"blocks.{j}.{hook}", tokens) for j in layers))
    return cells


@pytest.mark.parametrize("kind, hook", [("attn", "hook_attn_out"), ("mlp", "hook_mlp_out"), ("resid", "hook_resid_post")])
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("budget_mb", [0.05, 1024])
def test_trace_layers_matches_reference(model, images, kind, hook, window, budget_mb):
    clean, corrupted = images
    result = trace_layers(model, clean, corrupted, kind=kind, window=window, positions=[0, 3, 7],
                          memory_budget_mb=budget_mb, progress=False)
    expected = reference_scores(model, clean, corrupted, window_cells(model, hook, window, (0, 3, 7)))
    assert result.dims == ("image", "layer")
    assert (result.effects + result.corrupted_score[:, None] - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("budget_mb", [0.02, 0.3, 1024])
@pytest.mark.parametrize("batch", [1, 3])
def test_trace_grid_matches_reference_for_any_packing(model, images, budget_mb, batch):
    clean, corrupted = (x[:batch] for x in images)
    result = trace_grid(model, clean, corrupted, kind="attn", window=3, memory_budget_mb=budget_mb, progress=False)
    tokens = tuple(range(model.cfg.n_pos))
    expected = reference_scores(model, clean, corrupted, window_cells(model, "hook_attn_out", 3, tokens, per_token=True))
    got = result.effects + result.corrupted_score[:, None, None]
    assert result.effects.shape == (batch, 4, 17)
    assert (got.reshape(batch, -1) - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("budget_mb", [0.05, 1024])
def test_trace_heads_matches_reference(model, images, budget_mb):
    clean, corrupted = images
    result = trace_heads(model, clean, corrupted, window=1, positions="patches", memory_budget_mb=budget_mb,
                         score="logit", progress=False)
    tokens = tuple(range(1, 17))
    expected = reference_scores(model, clean, corrupted, window_cells(model, "attn.hook_z", 1, tokens, heads=[0, 1]), "logit")
    got = result.effects + result.corrupted_score[:, None, None]
    assert result.dims == ("image", "layer", "head")
    assert (got.reshape(3, -1) - expected).abs().max() <= TOLERANCE


def test_restoring_resid_post_at_all_tokens_restores_clean_exactly(model, images):
    clean, corrupted = images
    result = trace_layers(model, clean, corrupted, kind="resid", window=1, progress=False)
    assert torch.allclose(result.normalized().effects, torch.ones(3, 4), atol=1e-4)


def test_restoring_nothing_gives_the_corrupted_score(model, images):
    clean, corrupted = images
    out = run_restore(model, clean, corrupted, [(Site("blocks.2.hook_attn_out", (), None),)], progress=False)
    assert torch.allclose(out.effects, torch.zeros(3, 1), atol=1e-6)


def test_embedding_noise_style_hook_corruption(model, images):
    clean, _ = images
    noise = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(3))

    class AddNoise:
        hook = ("hook_embed", lambda act, hook: act + noise)

    result = trace_layers(model, clean, AddNoise(), kind="resid", window=1, progress=False)
    noisy = model.run_with_hooks(clean, fwd_hooks=[AddNoise.hook])
    target = model(clean).argmax(-1)
    expected = noisy.softmax(-1).gather(1, target[:, None]).squeeze(1)
    assert torch.allclose(result.corrupted_score, expected, atol=1e-6)
    assert torch.allclose(result.normalized().effects, torch.ones(3, 4), atol=1e-4)


class FailingCorruption:
    """A corruption hook that raises inside the corrupted run, while the engine's caching hooks are attached."""

    calls = 0

    def fail(self, act, hook):
        self.calls += 1
        raise RuntimeError("corruption failed inside a hook")

    @property
    def hook(self):
        return ("blocks.0.hook_resid_mid", self.fail)


@pytest.mark.parametrize("trace", [trace_layers, trace_grid, trace_heads])
def test_no_hook_survives_an_error_inside_a_hook(model, images, trace):
    clean, _ = images
    corruption = FailingCorruption()
    with pytest.raises(RuntimeError, match="corruption failed inside a hook"):
        trace(model, clean, corruption, progress=False)
    assert corruption.calls == 1
    assert all(not hp.has_hooks("both", including_permanent=True) for hp in model.hook_dict.values())
    assert all(not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
               for module in model.modules())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="attention"), "kind must be one of"),
        (dict(window=0), r"window must be an int in \[1, 4\] \(the number of layers\), got 0"),
        (dict(window=1.5), r"window must be an int in \[1, 4\] \(the number of layers\), got 1.5"),
        (dict(window=50), r"window must be an int in \[1, 4\] \(the number of layers\), got 50"),
        (dict(positions=[0, 17]), r"positions must be token indices in \[0, 17\)"),
        (dict(positions="middle"), "positions must be 'all', 'cls', 'patches'"),
        (dict(positions=torch.ones(3, 3, dtype=torch.bool)), r"patch-grid shape \(4, 4\)"),
        (dict(score="accuracy"), "score must be 'prob'"),
        (dict(target=10), r"target must hold class indices in \[0, 9\], got \[10\]"),
    ],
)
@pytest.mark.usefixtures("without_type_checks")
def test_bad_arguments_raise_value_error(model, images, kwargs, message):
    clean, corrupted = images
    with pytest.raises(ValueError, match=message):
        trace_layers(model, clean, corrupted, progress=False, **kwargs)


def test_even_window_reaches_one_layer_further_down():
    assert list(layer_window(2, 4, 12)) == [0, 1, 2, 3]
    assert list(layer_window(5, 2, 12)) == [4, 5]
    assert list(layer_window(11, 12, 12)) == list(range(5, 12))


def test_bad_sites_and_shapes_raise_value_error(model, images):
    clean, corrupted = images
    with pytest.raises(ValueError, match="corrupted must have the same shape as clean"):
        trace_layers(model, clean, corrupted[:2], progress=False)
    with pytest.raises(KeyError, match=r"unknown hook name 'blocks.9.hook_attn_out'.*'blocks.1.hook_attn_out'"):
        run_restore(model, clean, corrupted, [(Site("blocks.9.hook_attn_out"),)], progress=False)
    with pytest.raises(KeyError, match=r"did you mean \['blocks.1.hook_mlp_out'"):
        run_restore(model, clean, corrupted, [(Site("blocks.1.hook_mlp_ot"),)], progress=False)
    with pytest.raises(ValueError, match="hook_name must be a block hook"):
        run_restore(model, clean, corrupted, [(Site("hook_embed"),)], progress=False)
    with pytest.raises(ValueError, match=r"heads must be in \[0, 2\)"):
        run_restore(model, clean, corrupted, [(Site("blocks.0.attn.hook_z", None, (2,)),)], progress=False)


def test_patch_grid_mask_selects_patch_tokens(model, images):
    clean, corrupted = images
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True
    result = trace_layers(model, clean, corrupted, positions=mask, progress=False)
    assert result.settings["positions"] == [2, 12]


def test_corruption_by_name_equals_corrupted_images(model, images):
    from vitlens_patch.patching.corruptions import corrupt_grayscale

    clean, _ = images
    by_name = trace_layers(model, clean, "grayscale", progress=False)
    by_images = trace_layers(model, clean, corrupt_grayscale(clean, model.data_config), progress=False)
    assert torch.equal(by_name.effects, by_images.effects)
    with pytest.raises(ValueError, match="corruption must be one of"):
        trace_layers(model, clean, "sepia", progress=False)


@pytest.mark.parametrize("sweep", [trace_layers, trace_grid, trace_heads])
def test_score_keyword_and_its_deprecated_name_metric(model, images, sweep):
    clean, corrupted = images
    options = dict(positions=[0, 5], progress=False)
    by_score = sweep(model, clean, corrupted, score="logit", **options)
    assert by_score.settings["score"] == "logit"
    with pytest.warns(DeprecationWarning, match=rf"{sweep.__name__}\(metric=...\) is deprecated .* use score="):
        by_metric = sweep(model, clean, corrupted, metric="logit", **options)
    assert torch.equal(by_metric.effects, by_score.effects)
    with pytest.raises(TypeError, match="got both score= and its deprecated name metric="):
        sweep(model, clean, corrupted, score="logit", metric="prob", **options)


def test_run_restore_takes_score_and_the_deprecated_metric(model, images):
    clean, corrupted = images
    cells = [(Site("blocks.1.hook_attn_out"),)]
    by_score = run_restore(model, clean, corrupted, cells, score="logprob", progress=False)
    with pytest.warns(DeprecationWarning, match=r"run_restore\(metric=...\) is deprecated"):
        by_metric = run_restore(model, clean, corrupted, cells, metric="logprob", progress=False)
    assert torch.equal(by_metric.restored_score, by_score.restored_score)
    expected = reference_scores(model, clean, corrupted, cells, "logprob")
    assert (by_score.restored_score - expected).abs().max() <= TOLERANCE
