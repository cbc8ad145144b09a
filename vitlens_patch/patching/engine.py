"""The batched restoration engine: every patching experiment in the project runs through here.

A *cell* is a set of sites (hook, token positions, heads) whose clean activations replace the
corrupted run's. ``run_restore`` evaluates many cells on many images at once:

1. the clean run is cached once, at the hooks the cells restore;
2. the corrupted run is cached once, at the residual stream entering each cell's first layer;
3. cells are grouped by that first layer; each batch row is one (image, cell) pair, starting at
   that layer from the cached corrupted residual stream (``start_at_layer``), so the shared
   prefix is never recomputed; rows are chunked to stay within ``memory_budget_mb``;
4. a hook at each restored hook point writes the clean values in place, at exactly the (row,
   position, head) entries the rows' cells restore.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from vitlens_patch.checks import check_positive_int
from vitlens_patch.deprecation import renamed_keywords
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.corruptions import corrupt
from vitlens_patch.patching.scores import apply_score, check_score_for_model, resolve_score, resolve_target
from vitlens_patch.patching.sites import BLOCK_HOOK, HEAD_HOOKS, Cell, Site, check_site

FwdHook = tuple[str, Callable]
# Activation memory per batched pass (MB): measured fastest around 100 MB on a 2-core CPU
# (benchmarks/caap_speed.py); GPUs want large passes.
DEFAULT_MEMORY_BUDGET_MB = {"cpu": 96, "cuda": 4096}


@runtime_checkable
class HookCorruption(Protocol):
    """A corruption applied by a forward hook on a run of the clean images (``EmbeddingNoise``)."""

    hook: tuple[str, Callable]


Corruption = Tensor | str | Callable[[Tensor], Tensor] | HookCorruption


@dataclass(frozen=True)
class RestoreOutput:
    """Scores of the clean, corrupted and restored runs.

    Attributes:
        restored_score: [image, cell] score with the cell's clean activations restored.
        clean_score, corrupted_score: [image].
        target: [image] class each score refers to.
    """

    restored_score: Float[Tensor, "batch cell"]
    clean_score: Float[Tensor, " batch"]
    corrupted_score: Float[Tensor, " batch"]
    target: Int[Tensor, " batch"]

    @property
    def effects(self) -> Float[Tensor, "batch cell"]:
        """Indirect effect per (image, cell): restored score - corrupted score."""
        return self.restored_score - self.corrupted_score[:, None]


def resolve_corruption(model: HookedViT, clean: Tensor, corrupted) -> tuple[Tensor, list[FwdHook]]:
    """What the corrupted run sees: (images, forward hooks active during it).

    ``corrupted`` may be a tensor of corrupted images (same shape as ``clean``), the name of a
    pixel corruption ("grayscale", "pixel_noise", "blur", "patches" with defaults, see
    ``corruptions.corrupt``), a callable ``clean images -> corrupted images``, or an object with a
    ``hook`` attribute (a TransformerLens forward hook such as ``EmbeddingNoise.hook``), applied to
    a run on the clean images.
    """
    if isinstance(corrupted, str):
        return resolve_corruption(model, clean, corrupt(model, clean, corrupted))
    if isinstance(corrupted, Tensor):
        if corrupted.shape != clean.shape:
            raise ValueError(
                f"corrupted must have the same shape as clean {tuple(clean.shape)}, got {tuple(corrupted.shape)}"
            )
        return model.check_images(corrupted), []
    if hasattr(corrupted, "hook"):
        return clean, [corrupted.hook]
    if callable(corrupted):
        return resolve_corruption(model, clean, corrupted(clean))
    raise ValueError(
        "corrupted must be corrupted images, a callable images -> images, or an object with a "
        f"forward `hook` (e.g. embedding noise), got {type(corrupted).__name__}"
    )


def cached_run(
    model: HookedViT, images: Tensor, names: set[str], hooks: Sequence[FwdHook] = ()
) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward pass, storing the activations at ``names`` (only those are hooked, so every
    other hook point keeps its fast path)."""
    cache: dict[str, Tensor] = {}

    def store(act: Tensor, hook) -> None:
        cache[hook.name] = act.detach()

    logits = model.run_with_hooks(images, fwd_hooks=[*hooks, *((name, store) for name in sorted(names))])
    return logits, cache


LOW_PRECISION = {"cpu": (torch.bfloat16,), "cuda": (torch.bfloat16, torch.float16)}


def precision(model: HookedViT, dtype: torch.dtype | None) -> AbstractContextManager:
    """The context a pass runs in for ``dtype``: None or the model's dtype -> as is; a lower
    precision (``LOW_PRECISION`` per device type) -> ``torch.autocast``: matmuls and attention
    in ``dtype``, while the residual stream (sums with float32 inputs), the head (HookedViT runs it
    in float32 under autocast, so the logits keep float32 precision), LayerNorm statistics,
    softmax-based scores and the engine's score accumulation stay float32. Never a default:
    on CPUs without native bf16 (no AVX512-BF16 / AMX) bf16 is slower than float32."""
    if dtype is None or dtype == model.dtype:
        return nullcontext()
    allowed = LOW_PRECISION.get(model.device.type, ())
    if dtype not in allowed or model.dtype != torch.float32:
        raise ValueError(
            f"dtype must be None, the model's dtype ({model.dtype}) or, for a float32 model on "
            f"{model.device.type}, one of {[str(d) for d in allowed]}; got {dtype!r}"
        )
    return torch.autocast(model.device.type, dtype=dtype)


def check_cells(model: HookedViT, cells: Sequence[Sequence[Site]]) -> list[Cell]:
    """``cells`` as a list of site tuples; ValueError unless every cell holds valid block sites
    (KeyError with near matches for an unknown hook name)."""
    cells = [tuple(cell) for cell in cells]
    if not cells or any(not cell for cell in cells):
        raise ValueError("cells must be a non-empty list of non-empty site lists")
    for cell in cells:
        for site in cell:
            check_site(site, model)
    return cells


def _site_mask(site: Site, model: HookedViT, existing: Tensor | None) -> Tensor:
    """Bool mask over one row's positions (and heads) at the site's hook: [pos] or [pos, head]."""
    cfg = model.cfg
    has_heads = BLOCK_HOOK.match(site.hook_name).group(2) in HEAD_HOOKS
    shape = (cfg.n_pos, cfg.n_heads) if has_heads else (cfg.n_pos,)
    mask = torch.zeros(shape, dtype=torch.bool) if existing is None else existing
    positions = slice(None) if site.positions is None else list(site.positions)
    if has_heads:
        heads = slice(None) if site.heads is None else list(site.heads)
        mask[positions, heads] = True
    else:
        mask[positions] = True
    return mask


def site_masks(model: HookedViT, cells: Sequence[Cell], device: torch.device | None = None) -> list[dict[str, Tensor]]:
    """Per cell, per hook name it restores: the bool mask of restored entries, [pos] or [pos, head]
    (head hooks), on ``device`` (default the CPU)."""
    per_cell: list[dict[str, Tensor]] = []
    for cell in cells:
        masks: dict[str, Tensor] = {}
        for site in cell:
            masks[site.hook_name] = _site_mask(site, model, masks.get(site.hook_name))
        per_cell.append({name: mask.to(device) for name, mask in masks.items()})
    return per_cell


def stack_site_masks(
    cell_masks: list[dict[str, Tensor]], name: str, cell_ids: Sequence[int]
) -> Bool[Tensor, "row pos *head"]:
    """The masks at hook ``name`` of the cells ``cell_ids`` (from :func:`site_masks`), one row per
    cell id; all False for a cell that does not restore ``name``."""
    empty = torch.zeros_like(next(cell_masks[cell][name] for cell in cell_ids if name in cell_masks[cell]))
    return torch.stack([cell_masks[cell].get(name, empty) for cell in cell_ids])


def _bytes_per_row(model: HookedViT) -> int:
    """Rough peak activation memory of one batch row in a no-grad forward pass."""
    cfg = model.cfg
    width = 6 * cfg.d_model + 2 * cfg.d_mlp + 2 * cfg.n_heads * cfg.n_pos
    return cfg.n_pos * width * torch.finfo(model.dtype).bits // 8


def rows_per_pass_within(
    model: HookedViT,
    memory_budget_mb: float | None = None,
    rows_per_pass: int | None = None,
    *,
    device_type: str | None = None,
) -> int:
    """The (image, cell) rows per batched pass ``run_restore`` uses.

    Args:
        model: the HookedViT (its size and dtype set the memory of a row).
        memory_budget_mb: activation memory allowed per pass; default ``DEFAULT_MEMORY_BUDGET_MB``
            for ``device_type`` (the CUDA budget for accelerators not listed).
        rows_per_pass: an explicit choice, returned as is (a positive int), or None for the budget's.
        device_type: whose default budget applies; default the model's device type ("cpu",
            "cuda"...), so the choice for a model on a GPU can be asked without one.

    Returns:
        ``rows_per_pass``, or ``max(1, budget // bytes per row)``.
    """
    if memory_budget_mb is None:
        device_type = device_type or model.device.type
        memory_budget_mb = DEFAULT_MEMORY_BUDGET_MB.get(device_type, DEFAULT_MEMORY_BUDGET_MB["cuda"])
    if memory_budget_mb <= 0:
        raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
    if rows_per_pass is None:
        return max(1, int(memory_budget_mb * 2**20 // _bytes_per_row(model)))
    return check_positive_int(rows_per_pass, "rows_per_pass", allow_none=True)


@renamed_keywords(metric="score")
def run_restore(
    model: HookedViT,
    clean: Float[Tensor, "batch channel height width"],
    corrupted: Corruption,
    cells: Sequence[Sequence[Site]],
    *,
    score="prob",
    target: int | Tensor | None = None,
    memory_budget_mb: float | None = None,
    rows_per_pass: int | None = None,
    selected: Bool[Tensor, "batch cell"] | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> RestoreOutput:
    """Score every cell restored into the corrupted run of every image, in batched passes.

    Args:
        model: the HookedViT (its device and dtype are used throughout).
        clean: normalised clean images [batch, channel, height, width].
        corrupted: corrupted images [batch, channel, height, width], a callable
            ``clean -> corrupted``, or an object with a forward ``hook`` (embedding noise).
        cells: each a sequence of :class:`Site` restored together; all sites must be block
            hooks (``blocks.{l}.*``).
        score: the function of the logits each run is scored by: "prob" (default), "logit",
            "logprob", ("logit_diff", other_class), "cosine" (to the clean output of the same
            image: models without a classifier) or a callable (logits, target) -> [batch]; see
            :func:`~vitlens_patch.patching.scores.resolve_score`. (``metric=`` is its deprecated
            name.)
        target: class per image; default the clean run's prediction.
        memory_budget_mb: activation memory allowed per batched pass; sets the rows per pass
            (:func:`rows_per_pass_within`). Default ``DEFAULT_MEMORY_BUDGET_MB`` for the model's
            device type: small on the CPU, where passes that stay in cache run fastest, large on
            accelerators.
        rows_per_pass: (image, cell) rows per batched pass, overriding ``memory_budget_mb``.
        selected: [image, cell] bool: restore only these pairs (the others' restored_score is
            NaN); default every pair.
        dtype: compute precision, see :func:`precision`: None (the model's dtype),
            ``torch.bfloat16`` (or ``torch.float16`` on CUDA) for lower-precision matmuls.
        progress: show a progress bar.

    Returns:
        RestoreOutput with restored_score [image, cell] and the clean / corrupted baselines.
    """
    clean = model.check_images(clean)
    corrupted_images, corrupted_hooks = resolve_corruption(model, clean, corrupted)
    cells = check_cells(model, cells)
    chunk = rows_per_pass_within(model, memory_budget_mb, rows_per_pass)
    score_fn = resolve_score(score)
    check_score_for_model(score_fn, score, model.cfg.n_classes)
    device = model.device
    n_images = clean.shape[0]
    if selected is not None and (
        not isinstance(selected, Tensor) or selected.dtype != torch.bool
        or tuple(selected.shape) != (n_images, len(cells))
    ):
        got = tuple(selected.shape) if isinstance(selected, Tensor) else type(selected).__name__
        raise ValueError(f"selected must be a bool tensor [image, cell] = [{n_images}, {len(cells)}], got {got}")
    autocast = precision(model, dtype)

    start_layers = [min(site.layer for site in cell) for cell in cells]
    restored_names = {site.hook_name for cell in cells for site in cell}
    with torch.no_grad(), autocast:
        clean_logits, clean_cache = cached_run(model, clean, restored_names)
        target = resolve_target(target, clean_logits, model.cfg.n_classes)
        resid_names = {f"blocks.{layer}.hook_resid_pre" for layer in start_layers}
        corrupted_logits, corrupted_cache = cached_run(model, corrupted_images, resid_names, corrupted_hooks)
    clean_score = apply_score(score_fn, clean_logits, target, clean_logits)
    corrupted_score = apply_score(score_fn, corrupted_logits, target, clean_logits)

    # One mask per (cell, hook name): where that cell restores clean values at that hook.
    cell_masks = site_masks(model, cells, device)

    rows_by_start: dict[int, list[tuple[int, int]]] = defaultdict(list)
    chosen = None if selected is None else selected.cpu()
    for cell_index, layer in enumerate(start_layers):
        rows_by_start[layer].extend(
            (image, cell_index) for image in range(n_images) if chosen is None or chosen[image, cell_index]
        )
    chunks = [
        (layer, rows[i : i + chunk]) for layer, rows in sorted(rows_by_start.items())
        for i in range(0, len(rows), chunk)
    ]

    restored = torch.full((n_images, len(cells)), torch.nan, device=device)
    with torch.no_grad(), precision(model, dtype):
        for layer, rows in tqdm(chunks, desc="restoring", disable=not progress, leave=False):
            images = torch.tensor([image for image, _ in rows], device=device)
            cell_ids = [cell for _, cell in rows]
            hooks = _restore_hooks(clean_cache, cell_masks, images, cell_ids)
            resid = corrupted_cache[f"blocks.{layer}.hook_resid_pre"][images]
            logits = model.run_with_hooks(resid, start_at_layer=layer, fwd_hooks=hooks)
            restored[images, torch.tensor(cell_ids, device=device)] = apply_score(
                score_fn, logits, target[images], clean_logits[images]
            )
    return RestoreOutput(restored, clean_score, corrupted_score, target)


def _restore_hooks(
    clean_cache: dict[str, Tensor], cell_masks: list[dict[str, Tensor]], images: Tensor, cell_ids: list[int]
) -> list[FwdHook]:
    """Forward hooks for one chunk of rows: write clean values where each row's cell restores.

    Only the restored (row, position[, head]) entries are touched, in place: a CAAP row restores
    one token, so nothing else of the activation is read or copied.
    """
    hooks = []
    names = {name for cell in cell_ids for name in cell_masks[cell]}
    for name in sorted(names):
        mask = stack_site_masks(cell_masks, name, cell_ids)  # [row, pos(, head)]
        target_index = mask.nonzero(as_tuple=True)
        source_index = (images[target_index[0]], *target_index[1:])

        def restore(act: Tensor, hook, target=target_index, source=source_index, clean=clean_cache[name]) -> Tensor:
            act[target] = clean[source]
            return act

        hooks.append((name, restore))
    return hooks
