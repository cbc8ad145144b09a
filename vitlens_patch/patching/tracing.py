"""Causal tracing sweeps on top of the engine: layers, layer x position, layer x head.

A note on ``kind="resid"``: restoring ``hook_resid_post`` at *all* tokens of any layer restores
the clean run exactly (normalised effect 1), because everything downstream depends only on that
residual stream. Informative sweeps restore sub-layer outputs (``attn``, ``mlp``) or subsets of
tokens (``trace_grid``).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from vitlens_patch.deprecation import renamed_keywords
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.attribution_patching import restore_cells
from vitlens_patch.patching.engine import Corruption
from vitlens_patch.patching.results import TraceResult
from vitlens_patch.patching.sites import PositionSelector, Site, kind_hook, layer_window, resolve_positions


def _run_trace(
    model: HookedViT, clean: Tensor, corrupted: Corruption, cells: list, *, shape: tuple[int, ...],
    dims: tuple[str, ...], coords: dict[str, list], settings: dict, score, target, memory_budget_mb, progress,
    method: str, verify_top_k: int | None, dtype: torch.dtype | None,
) -> TraceResult:
    """One engine (or attribution) call over ``cells``; effects reshaped to [image, *shape]."""
    output, exact = restore_cells(
        model, clean, corrupted, cells, method=method, verify_top_k=verify_top_k, score=score, target=target,
        memory_budget_mb=memory_budget_mb, dtype=dtype, progress=progress,
    )
    settings = settings | {
        "score": score if isinstance(score, (str, tuple)) else repr(score),
        "target": output.target.tolist(),
        "method": method,
        "verify_top_k": verify_top_k,
        "dtype": None if dtype is None else str(dtype),
    }
    return TraceResult(
        effects=output.effects.reshape(output.effects.shape[0], *shape).cpu(),
        dims=dims,
        clean_score=output.clean_score.cpu(),
        corrupted_score=output.corrupted_score.cpu(),
        settings=settings,
        coords=coords,
        grid_size=model.cfg.grid_size,
        n_prefix_tokens=model.cfg.n_prefix_tokens,
        exact=exact.reshape(exact.shape[0], *shape).cpu(),
    )


@renamed_keywords(metric="score")
def trace_layers(
    model: HookedViT,
    clean: Float[Tensor, "batch channel height width"],
    corrupted: Corruption,
    *,
    kind: str = "attn",
    window: int = 3,
    positions: PositionSelector = None,
    score="prob",
    target: int | Tensor | None = None,
    memory_budget_mb: float | None = None,
    method: str = "exact",
    verify_top_k: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> TraceResult:
    """Indirect effect of restoring a window of sub-layer outputs around each layer.

    For each centre layer l, restores ``blocks.{j}.<kind hook>`` for every j in
    ``range(max(0, l - window//2), min(n_layers, l - window//2 + window))`` at ``positions``.

    Args:
        model, clean, corrupted: as in :func:`~vitlens_patch.patching.engine.run_restore`.
        kind: "attn" (hook_attn_out), "mlp" (hook_mlp_out), "resid" (hook_resid_post) or
            "resid_pre" (hook_resid_pre).
        window: layers restored per centre layer, in [1, n_layers] (3 = l-1, l, l+1; an even
            window reaches one layer further down than up: 4 = l-2 .. l+1).
        positions: "all" (default), "cls", "patches", token indices or a patch-grid bool mask.
        score, target, memory_budget_mb, progress: passed to the engine (``score``: the function
            of the logits, "prob" by default; ``metric=`` is its deprecated name).
        method: "exact" (the engine) or "attribution" (the first-order estimate of
            :mod:`~vitlens_patch.patching.attribution_patching`, with AtP*'s QK fix where it
            applies: ``kind="resid_pre"``).
        verify_top_k: with "attribution", score each image's k largest estimates exactly;
            ``result.exact`` marks them.
        dtype: compute precision (None, or ``torch.bfloat16``), see ``engine.precision``.

    Returns:
        TraceResult with effects [image, layer].
    """
    hook, n_layers = kind_hook(kind), model.cfg.n_layers
    tokens = resolve_positions(positions, model.cfg)
    cells = [
        tuple(Site(f"blocks.{j}.{hook}", tokens) for j in layer_window(layer, window, n_layers))
        for layer in range(n_layers)
    ]
    return _run_trace(
        model, clean, corrupted, cells, shape=(n_layers,), dims=("image", "layer"),
        coords={"layer": list(range(n_layers))},
        settings=dict(function="trace_layers", kind=kind, hook=hook, window=window, positions=list(tokens)),
        score=score, target=target, memory_budget_mb=memory_budget_mb, progress=progress,
        method=method, verify_top_k=verify_top_k, dtype=dtype,
    )


@renamed_keywords(metric="score")
def trace_grid(
    model: HookedViT,
    clean: Float[Tensor, "batch channel height width"],
    corrupted: Corruption,
    *,
    kind: str = "resid_pre",
    window: int = 1,
    positions: PositionSelector = None,
    score="prob",
    target: int | Tensor | None = None,
    memory_budget_mb: float | None = None,
    method: str = "exact",
    verify_top_k: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> TraceResult:
    """ROME's heatmap: restore one token's sub-layer output over a window around each layer.

    One cell per (centre layer l, token t): ``blocks.{j}.<kind hook>`` at token t for every j in
    the window around l (same rule as :func:`trace_layers`). Token indices include the prefix
    tokens (0 is the class token). ``method``, ``verify_top_k``, ``dtype`` and the other options
    as in :func:`trace_layers`.

    Returns:
        TraceResult with effects [image, layer, position] and ``coords["position"]`` the token
        indices.
    """
    hook, n_layers = kind_hook(kind), model.cfg.n_layers
    tokens = resolve_positions(positions, model.cfg)
    cells = [
        tuple(Site(f"blocks.{j}.{hook}", (token,)) for j in layer_window(layer, window, n_layers))
        for layer in range(n_layers)
        for token in tokens
    ]
    return _run_trace(
        model, clean, corrupted, cells, shape=(n_layers, len(tokens)), dims=("image", "layer", "position"),
        coords={"layer": list(range(n_layers)), "position": list(tokens)},
        settings=dict(function="trace_grid", kind=kind, hook=hook, window=window, positions=list(tokens)),
        score=score, target=target, memory_budget_mb=memory_budget_mb, progress=progress,
        method=method, verify_top_k=verify_top_k, dtype=dtype,
    )


@renamed_keywords(metric="score")
def trace_heads(
    model: HookedViT,
    clean: Float[Tensor, "batch channel height width"],
    corrupted: Corruption,
    *,
    window: int = 1,
    positions: PositionSelector = None,
    score="prob",
    target: int | Tensor | None = None,
    memory_budget_mb: float | None = None,
    method: str = "exact",
    verify_top_k: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> TraceResult:
    """Restore one attention head's output (``attn.hook_z``) over a window around each layer.

    One cell per (centre layer l, head h): ``blocks.{j}.attn.hook_z`` of head h at ``positions``
    for every j in the window around l. Options as in :func:`trace_layers` (no QK fix applies
    to ``hook_z``: its attribution estimate is linear).

    Returns:
        TraceResult with effects [image, layer, head].
    """
    cfg = model.cfg
    tokens = resolve_positions(positions, cfg)
    cells = [
        tuple(Site(f"blocks.{j}.attn.hook_z", tokens, (head,)) for j in layer_window(layer, window, cfg.n_layers))
        for layer in range(cfg.n_layers)
        for head in range(cfg.n_heads)
    ]
    return _run_trace(
        model, clean, corrupted, cells, shape=(cfg.n_layers, cfg.n_heads), dims=("image", "layer", "head"),
        coords={"layer": list(range(cfg.n_layers)), "head": list(range(cfg.n_heads))},
        settings=dict(function="trace_heads", hook="attn.hook_z", window=window, positions=list(tokens)),
        score=score, target=target, memory_budget_mb=memory_budget_mb, progress=progress,
        method=method, verify_top_k=verify_top_k, dtype=dtype,
    )
