"""Attribution patching: a first-order estimate of every cell's restoration effect.

The exact engine (``run_restore``) runs one (partial) forward pass per (image, cell). Attribution
patching (Nanda 2023; AtP of Kramár et al. 2024, "AtP*: An efficient and scalable method for
localizing LLM behaviour to components") estimates all cells at once, from one clean forward pass
and one corrupted forward + backward pass per batch of images:

    effect(cell) ~= sum over the cell's entries e of (a_clean[e] - a_corrupted[e]) . d score / d a[e]

with the gradient taken on the corrupted run (the denoising direction: restoring clean values into
the corrupted run, so the signs match the engine's effects). An entry is one token (and head) of
one hook; a cell restoring several layers or tokens (a layer window) is the sum of its entries'
terms. The estimate is exact when the score is linear in the restored activations; it is weak
where the score is far from linear in them: the literature (Kramár et al. 2024) and this
project's benchmark (``benchmarks/fast_patching.py``) find it poor for large activations such as
the residual stream.

**QK fix** (AtP*, ``qk_fix=True``, the default): linearising through the attention softmax is the
main failure of AtP when a restored activation changes attention scores (saturated softmaxes). For
sites that feed a layer's attention scores directly, the patched softmax is recomputed exactly and
only its change is linearised, ``sum_(query, key) (pattern' - pattern) * d score / d pattern``:

- ``attn.hook_q`` / ``attn.hook_k``: the queries (keys) feed only the scores, so their whole term
  is the pattern term (row ``t`` of the pattern recomputed with the clean query of token ``t``;
  column ``t`` of every row with its clean key);
- ``hook_resid_pre``: the token's clean residual gives the clean query and key of that layer's
  attention; their first-order term (the gradient through ``ln1`` -> q, k) is replaced by the
  pattern term with both patched, and the remaining paths (residual, values) stay linear.

Each token's patched softmax is recomputed on its own; a cell restoring several tokens sums its
tokens' terms, as it sums its layers' terms. The fix does not apply to other sites
(``hook_attn_out``, ``hook_mlp_out``, ``hook_resid_mid`` / ``hook_resid_post``, ``attn.hook_z`` /
``hook_v`` / ``hook_result``, MLP hooks): they reach attention scores only through later layers
(LayerNorm, MLP), where the patched queries and keys are not known without running the patched
model; their terms stay linear. The fix assumes the model's attention scores are
``q . k / sqrt(d_head)`` (what ``Attention`` computes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from vitlens_patch.checks import check_positive_int
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.engine import (
    Corruption,
    RestoreOutput,
    cached_run,
    check_cells,
    precision,
    resolve_corruption,
    rows_per_pass_within,
    run_restore,
    site_masks,
    stack_site_masks,
)
from vitlens_patch.patching.scores import apply_score, check_score_for_model, resolve_score, resolve_target
from vitlens_patch.patching.sites import BLOCK_HOOK, Site

METHODS = ("exact", "attribution")
QK_PATCHES = ("query", "key", "both")
_QK_SITES = {"attn.hook_q": "query", "attn.hook_k": "key", "hook_resid_pre": "both"}


# Bytes of one [image, head, pos, pos] float32 temporary of ``pattern_terms`` per chunk of images:
# its ~20 elementwise passes ran 2x faster on chunks that stay in a CPU core's L2 cache (34 embedded-model
# images: 19 ms against 40 ms unchunked; 256 KB and 1 MB chunks 21-23 ms).
PATTERN_CHUNK_BYTES = 2**19


def pattern_terms(
    q_clean: Float[Tensor, "batch pos head d_head"],
    k_clean: Float[Tensor, "batch pos head d_head"],
    q_corrupted: Float[Tensor, "batch pos head d_head"],
    k_corrupted: Float[Tensor, "batch pos head d_head"],
    grad_pattern: Float[Tensor, "batch head query_pos key_pos"],
    patch: str,
) -> Float[Tensor, "batch pos head"]:
    """AtP*'s QK fix: per token t and head, ``sum (pattern' - pattern) * grad_pattern`` with
    pattern' the softmax recomputed exactly with token t's clean query, key, or both.

    ``patch="query"``: row t of the scores becomes ``q_clean[t] . k_corrupted``; ``"key"``: column
    t of every row becomes ``q_corrupted . k_clean[t]``; ``"both"``: row t becomes
    ``q_clean[t] . k'`` (k' = corrupted keys with key t clean) and column t of the other rows
    ``q_corrupted . k_clean[t]``. Scores are ``q . k / sqrt(d_head)``. All rows, columns and tokens
    are done at once, in float32, in chunks of images of ``PATTERN_CHUNK_BYTES``: a new row is a
    softmax of [batch, head, pos, pos]; a changed column t changes each row's softmax by a single
    entry (see :func:`_column_terms`).

    Returns:
        terms [batch, pos, head]: the first-order effect of token ``pos``'s patch, per head.
    """
    if patch not in QK_PATCHES:
        raise ValueError(f"patch must be one of {QK_PATCHES}, got {patch!r}")
    batch, pos, head, _ = q_clean.shape
    chunk = max(1, PATTERN_CHUNK_BYTES // (4 * head * pos * pos))
    return torch.cat([
        _pattern_terms_chunk(*(t[start : start + chunk] for t in (q_clean, k_clean, q_corrupted, k_corrupted,
                                                                   grad_pattern)), patch)
        for start in range(0, batch, chunk)
    ])


def _pattern_terms_chunk(q_clean, k_clean, q_corrupted, k_corrupted, grad_pattern, patch: str) -> Tensor:
    """:func:`pattern_terms` on one chunk of images."""
    q_clean, k_clean, q_corrupted, k_corrupted = (
        rearrange(t.float(), "batch pos head d_head -> batch head pos d_head")
        for t in (q_clean, k_clean, q_corrupted, k_corrupted)
    )
    grad = grad_pattern.float()
    q_corrupted = q_corrupted * q_clean.shape[-1] ** -0.5
    scores = q_corrupted @ k_corrupted.transpose(-1, -2)  # [batch, head, query, key]
    if scores.shape[-1] == 1:  # a single key: the pattern is 1 whatever the scores
        return q_clean.new_zeros(q_clean.shape[0], 1, q_clean.shape[1])
    row = _RowSoftmax(scores, grad)
    terms = 0
    if patch in ("key", "both"):
        column = _column_terms(row, q_corrupted @ (k_clean - k_corrupted).transpose(-1, -2), grad)
        if patch == "both":  # row t is recomputed in full below
            column.diagonal(dim1=-2, dim2=-1).zero_()
        terms = column.sum(-2)
    if patch in ("query", "both"):
        new_rows = (q_clean * q_clean.shape[-1] ** -0.5) @ k_corrupted.transpose(-1, -2)  # [batch, head, t, key]
        if patch == "both":
            new_rows.diagonal(dim1=-2, dim2=-1).copy_((q_clean * k_clean).sum(-1) * q_clean.shape[-1] ** -0.5)
        terms = terms + (new_rows.softmax(-1) * grad).sum(-1) - row.mean_grad[..., 0]
    return rearrange(terms, "batch head pos -> batch pos head")


class _RowSoftmax:
    """Each row's softmax split into its largest entry and the rest, without under- or overflow.

    Scores are shifted by the row's second-largest score, so the other entries' weights ``w``
    (entry ``top`` set to 0) are at most 1 and sum to ``rest >= 1``; the largest entry's pattern
    value is ``sigmoid(logit_top)`` with ``logit_top = (first - second) - log(rest)``, and the
    other entries' ``w * sigmoid(-logit_top) / rest``. Per row ([batch, head, query, 1]):
    ``top``, ``logit_top``, ``grad_top``, ``spread = grad_top - (weighted mean of the other
    entries' grad)`` and ``mean_grad = sum_k pattern_k grad_k``; ``log_weights`` and
    ``pattern`` are [batch, head, query, key] (pattern 0 at ``top``).
    """

    def __init__(self, scores: Tensor, grad: Tensor):
        first, self.top = scores.max(-1, keepdim=True)  # max and a masked amax: 3.8x faster than topk(2)
        second = scores.scatter(-1, self.top, -torch.inf).amax(-1, keepdim=True)
        self.log_weights = scores.sub_(second)  # in place: the caller's scores are not used again
        weights = self.log_weights.exp().scatter_(-1, self.top, 0.0)
        rest = weights.sum(-1, keepdim=True)
        self.logit_top = (first - second) - rest.log()
        self.grad_top = grad.gather(-1, self.top)
        self.spread = self.grad_top - (weights * grad).sum(-1, keepdim=True) / rest
        self.mean_grad = self.grad_top - torch.sigmoid(-self.logit_top) * self.spread
        self.log_scale = F.logsigmoid(-self.logit_top) - rest.log()  # log pattern = log_weights + log_scale
        self.pattern = weights.mul_(self.log_scale.exp())


def _column_terms(
    row: _RowSoftmax, delta: Float[Tensor, "batch head query key"], grad: Float[Tensor, "batch head query key"]
) -> Float[Tensor, "batch head query key"]:
    """``sum_k (p'_k - p_k) g_k`` of each row when only entry t's score changes by ``delta[..., t]``.

    The row becomes p' with ``p'_t = sigmoid(logit_t + delta)`` and the other entries scaled by
    ``(1 - p'_t) / (1 - p_t)``, so the sum is ``(p'_t - p_t) (g_t - mean of the others' g)`` =
    ``u (g_t - sum_k p_k g_k)`` with ``u = m / (1 + m)``, ``m = p_t e^delta - p_t``. For the
    entries below a row's largest (``p_t <= 1/2``, so ``1 + m >= 1/2``) ``p_t e^delta`` is taken
    in log space, capped at ``e^80`` where ``u`` is 1 in float32; at the largest entry, where
    ``p_t`` may round to 1, ``(p'_t - p_t)`` is a difference of sigmoids written without
    cancellation and multiplied by ``spread``.
    """
    shifted = row.log_weights.add_(delta).add_(row.log_scale).clamp_(max=80.0)  # log(p_t e^delta)
    m = shifted.exp_().sub_(row.pattern)
    column = m.div_(m + 1).mul_(grad - row.mean_grad)
    d, logit = delta.gather(-1, row.top), row.logit_top
    change_top = torch.where(
        d > 0,
        -torch.expm1(-d) * torch.sigmoid(logit + d) * torch.sigmoid(-logit),
        torch.expm1(d) * torch.sigmoid(logit) * torch.sigmoid(-logit - d),
    )
    return column.scatter_(-1, row.top, change_top * row.spread)


# Activation memory per attribution pass (MB). A backward pass keeps every layer's activations, so
# the no-grad engine's small, cache-sized CPU passes do not apply; on the embedded model 35 images
# per pass ran in 0.7x the CPU time of 13 (the engine's 96 MB): per-op overhead dominates small passes.
ATTRIBUTION_MEMORY_BUDGET_MB = {"cpu": 256, "cuda": 4096}


def images_per_pass(model: HookedViT, memory_budget_mb: float | None) -> int:
    """Images per attribution pass within ``memory_budget_mb`` (default
    ``ATTRIBUTION_MEMORY_BUDGET_MB`` for the device type); a backward pass keeps every layer's
    activations."""
    if memory_budget_mb is None:
        memory_budget_mb = ATTRIBUTION_MEMORY_BUDGET_MB.get(model.device.type, ATTRIBUTION_MEMORY_BUDGET_MB["cuda"])
    return max(1, rows_per_pass_within(model, memory_budget_mb) // model.cfg.n_layers)


def _qk_kind(site: Site, qk_fix: bool) -> str | None:
    """The QK-fix patch kind ("query", "key", "both") of a site's hook, or None (linear term)."""
    return _QK_SITES.get(BLOCK_HOOK.match(site.hook_name).group(2)) if qk_fix else None


def estimate_restore(
    model: HookedViT,
    clean: Float[Tensor, "batch channel height width"],
    corrupted: Corruption,
    cells: Sequence[Sequence[Site]],
    *,
    score="prob",
    target: int | Tensor | None = None,
    qk_fix: bool = True,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> RestoreOutput:
    """Attribution-patching estimate of ``run_restore``'s effects for every (image, cell).

    Per batch of images: one clean forward pass (caching the restored sites), one corrupted
    forward pass from the first restored layer and one backward pass to it; then every cell's
    estimate is a sum of per-entry terms (see the module docstring for the estimate and the QK
    fix).

    Args:
        model, clean, corrupted, cells, score, target: as in
            :func:`~vitlens_patch.patching.engine.run_restore`.
        qk_fix: apply AtP*'s QK fix to sites feeding attention scores (``hook_resid_pre``,
            ``attn.hook_q``, ``attn.hook_k``); other sites are linear either way.
        batch_size: at most this many images per forward/backward pass (split evenly); default
            from ``ATTRIBUTION_MEMORY_BUDGET_MB``.
        dtype: compute precision of the passes, as in ``run_restore`` (terms are float32).
        progress: show a progress bar over batches.

    Returns:
        RestoreOutput whose ``effects`` [image, cell] are the estimates (``restored_score`` is
        ``corrupted_score + estimate``).
    """
    clean = model.check_images(clean)
    corrupted_images, corrupted_hooks = resolve_corruption(model, clean, corrupted)
    cells = check_cells(model, cells)
    if not isinstance(qk_fix, bool):
        raise ValueError(f"qk_fix must be True or False, got {qk_fix!r}")
    if batch_size is None:
        batch_size = images_per_pass(model, None)
    check_positive_int(batch_size, "batch_size", allow_none=True)
    score_fn = resolve_score(score)
    precision(model, dtype)  # rejects a bad dtype before any work
    check_score_for_model(score_fn, score, model.cfg.n_classes)
    n_images = clean.shape[0]
    if target is not None:  # checked once for all images, then sliced per batch
        target = resolve_target(target, clean.new_empty(n_images, 0), model.cfg.n_classes)

    # Which term each hook contributes: hook name -> QK patch kind or None (linear).
    kinds: dict[str, str | None] = {site.hook_name: _qk_kind(site, qk_fix) for cell in cells for site in cell}
    # One float mask per hook: [cell, entry] with entry = pos or (pos head), flattened.
    cell_masks = site_masks(model, cells)
    masks = {
        name: stack_site_masks(cell_masks, name, range(len(cells))).flatten(1).to(model.device, torch.float32)
        for name in kinds
    }

    qk_layers = sorted({int(BLOCK_HOOK.match(name).group(1)) for name, kind in kinds.items() if kind})
    qk_names = {f"blocks.{layer}.attn.hook_{part}" for layer in qk_layers for part in ("q", "k")}
    pattern_names = {f"blocks.{layer}.attn.hook_pattern" for layer in qk_layers}
    first_layer = min(site.layer for cell in cells for site in cell)

    estimate = torch.empty(n_images, len(cells), device=model.device)
    clean_score = torch.empty(n_images, device=model.device)
    corrupted_score = torch.empty(n_images, device=model.device)
    targets = []
    batch_size = -(-n_images // -(-n_images // batch_size))  # balanced passes of at most batch_size images
    starts = range(0, n_images, batch_size)
    for start in tqdm(starts, desc="attribution", disable=not progress or len(starts) <= 1, leave=False):
        batch = slice(start, start + batch_size)
        with torch.no_grad(), precision(model, dtype):
            clean_logits, clean_cache = cached_run(model, clean[batch], set(kinds) | qk_names)
        batch_target = resolve_target(None if target is None else target[batch], clean_logits, model.cfg.n_classes)
        targets.append(batch_target)
        with precision(model, dtype):
            corrupted_logits, acts, grads = _gradient_run(
                model, corrupted_images[batch], corrupted_hooks, set(kinds) | qk_names | pattern_names,
                first_layer,
                lambda logits, t=batch_target, c=clean_logits: apply_score(score_fn, logits, t, c).sum(),
            )
        estimate[batch] = sum(
            _site_terms(name, kind, clean_cache, acts, grads).flatten(1) @ masks[name].T
            for name, kind in kinds.items()
        )
        del acts, grads  # frees the retained graph
        clean_score[batch] = apply_score(score_fn, clean_logits, batch_target, clean_logits)
        corrupted_score[batch] = apply_score(score_fn, corrupted_logits.detach(), batch_target, clean_logits)
    return RestoreOutput(corrupted_score[:, None] + estimate, clean_score, corrupted_score, torch.cat(targets))


def _gradient_run(
    model: HookedViT, images: Tensor, corruption_hooks: list, names: set[str], first_layer: int, total_score
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """The corrupted run with gradients: no-grad up to ``first_layer``, then forward and backward.

    Returns (logits, activations at ``names``, d total_score / d activation at ``names``). The
    graph is retained so that :func:`_site_terms` can take gradients within a block.
    """
    with torch.no_grad():
        resid = model.run_with_hooks(images, stop_at_layer=first_layer, fwd_hooks=corruption_hooks)
    acts: dict[str, Tensor] = {}

    def store(act: Tensor, hook) -> None:
        acts[hook.name] = act

    with torch.enable_grad():
        resid.requires_grad_(True)  # the graph exists even if the weights do not require grad
        logits = model.run_with_hooks(
            resid, start_at_layer=first_layer,
            fwd_hooks=[*corruption_hooks, *((name, store) for name in sorted(names))],
        )
        ordered = sorted(acts)
        gradients = torch.autograd.grad(
            total_score(logits), [acts[name] for name in ordered], retain_graph=True, allow_unused=True
        )
    grads = {
        name: torch.zeros_like(acts[name]) if grad is None else grad for name, grad in zip(ordered, gradients)
    }
    return logits, acts, grads


def _site_terms(
    name: str, kind: str | None, clean: dict[str, Tensor], acts: dict[str, Tensor], grads: dict[str, Tensor]
) -> Float[Tensor, "batch pos *head"]:
    """Per-entry terms of one hook: [batch, pos] or [batch, pos, head] (head hooks, QK-fixed q/k).

    Linear: ``(a_clean - a_corrupted) . grad``. QK-fixed q / k: the pattern term alone. QK-fixed
    ``hook_resid_pre``: the linear term without its path through this layer's queries and keys,
    plus the pattern term with both patched (summed over heads).
    """
    corrupted = acts[name].detach()
    if kind is None:
        return ((clean[name] - corrupted).float() * grads[name].float()).sum(-1)
    prefix = f"blocks.{BLOCK_HOOK.match(name).group(1)}"
    q_name, k_name = f"{prefix}.attn.hook_q", f"{prefix}.attn.hook_k"
    terms = pattern_terms(
        clean[q_name], clean[k_name], acts[q_name].detach(), acts[k_name].detach(),
        grads[f"{prefix}.attn.hook_pattern"], kind,
    )
    if kind != "both":
        return terms
    # gradient at resid_pre through ln1 -> (q, k) of this layer only: removed from the linear term
    (through_qk,) = torch.autograd.grad(
        [acts[q_name], acts[k_name]], acts[name], [grads[q_name], grads[k_name]], retain_graph=True
    )
    linear = ((clean[name] - corrupted).float() * (grads[name] - through_qk).float()).sum(-1)
    return linear + terms.sum(-1)


def restore_cells(
    model: HookedViT,
    clean: Float[Tensor, "batch channel height width"],
    corrupted: Corruption,
    cells: Sequence[Sequence[Site]],
    *,
    method: str = "exact",
    verify_top_k: int | None = None,
    qk_fix: bool = True,
    score="prob",
    target: int | Tensor | None = None,
    memory_budget_mb: float | None = None,
    rows_per_pass: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[RestoreOutput, Bool[Tensor, "batch cell"]]:
    """Every cell's effect by ``method``, and which (image, cell) effects are exact.

    Args:
        method: "exact" (``run_restore``) or "attribution" (``estimate_restore``).
        verify_top_k: with "attribution": rank each image's cells by their estimated effect
            (largest first) and score the top k with the exact engine (``run_restore`` on those
            (image, cell) pairs only), replacing their estimates.
        qk_fix: AtP*'s QK fix for "attribution" (see the module docstring).
        score, target, memory_budget_mb, rows_per_pass, dtype, progress: as in ``run_restore``
            (``memory_budget_mb`` also sets the images per attribution pass).

    Returns:
        (output, exact): the RestoreOutput, and exact [image, cell] True where the effect is the
        engine's (everywhere for "exact"; the verified cells for "attribution").
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if verify_top_k is not None and (
        method != "attribution" or isinstance(verify_top_k, bool) or not isinstance(verify_top_k, int)
        or verify_top_k < 1
    ):
        raise ValueError(
            f"verify_top_k must be None or, with method='attribution', a positive int; got "
            f"{verify_top_k!r} with method={method!r}"
        )
    engine = dict(score=score, memory_budget_mb=memory_budget_mb, rows_per_pass=rows_per_pass, dtype=dtype,
                  progress=progress)
    if method == "exact":
        output = run_restore(model, clean, corrupted, cells, target=target, **engine)
        return output, torch.ones_like(output.restored_score, dtype=torch.bool)
    output = estimate_restore(
        model, clean, corrupted, cells, score=score, target=target, qk_fix=qk_fix,
        batch_size=images_per_pass(model, memory_budget_mb), dtype=dtype, progress=progress,
    )
    exact = torch.zeros_like(output.restored_score, dtype=torch.bool)
    if verify_top_k is None:
        return output, exact
    top = output.effects.topk(min(verify_top_k, exact.shape[1]), dim=1).indices
    exact.scatter_(1, top, True)
    verified = run_restore(model, clean, corrupted, cells, target=output.target, selected=exact, **engine)
    restored = torch.where(exact, verified.restored_score, output.restored_score)
    return RestoreOutput(restored, output.clean_score, output.corrupted_score, output.target), exact
