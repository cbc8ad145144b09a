"""CAAP's block range chosen by a faithfulness metric: one CAAP map per range, scored and ranked."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from vitlens_patch.attribution.base import Target
from vitlens_patch.attribution.caap import caap, check_block_range
from vitlens_patch.metrics import deletion_auc, insertion_auc
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.scores import resolve_target

SWEEP_METRICS = {"deletion": (deletion_auc, False), "insertion": (insertion_auc, True)}


@dataclass(frozen=True)
class LayerSweepResult:
    """Faithfulness of CAAP maps for each block range.

    Attributes:
        table: one row per range: start, stop, mean (over images), std.
        best: the (start, stop) with the best mean.
        metric: the metric's name.
        higher_is_better: direction of the metric.
    """

    table: pd.DataFrame
    best: tuple[int, int]
    metric: str
    higher_is_better: bool


def caap_layer_sweep(
    model: HookedViT,
    images: Float[Tensor, "batch channel height width"],
    *,
    target: Target = None,
    metric: str | Callable = "deletion",
    higher_is_better: bool | None = None,
    ranges: Sequence[tuple[int, int]] | None = None,
    progress: bool = True,
    **caap_options,
) -> LayerSweepResult:
    """Score CAAP maps of every block range (start, stop) by a faithfulness metric; pick the best.

    Args:
        model, images, target: as in :func:`caap`.
        metric: "deletion" (RISE deletion AUC, lower is better), "insertion" (higher is better),
            or a callable (model, images, maps, target) -> [batch] with ``higher_is_better`` given.
        ranges: block ranges to try; default every 0 <= start < stop <= n_layers.
        progress: progress bar over ranges.
        caap_options: context, score, batch_size... passed to :func:`caap`.

    Returns:
        LayerSweepResult with the per-range table and the best range.
    """
    if isinstance(metric, str):
        if metric not in SWEEP_METRICS:
            raise ValueError(f"metric must be one of {sorted(SWEEP_METRICS)} or a callable, got {metric!r}")
        metric_fn, higher_is_better = SWEEP_METRICS[metric]
        name = metric
    elif callable(metric):
        if higher_is_better is None:
            raise ValueError("higher_is_better must be given with a callable metric")
        metric_fn, name = metric, getattr(metric, "__name__", "custom")
    else:
        raise ValueError(f"metric must be a name or a callable, got {metric!r}")
    n_layers = model.cfg.n_layers
    if ranges is None:
        ranges = [(start, stop) for start in range(n_layers) for stop in range(start + 1, n_layers + 1)]
    ranges = [check_block_range(block_range, n_layers) for block_range in ranges]
    if not ranges:
        raise ValueError("ranges must hold at least one (start, stop) block range")
    with torch.no_grad():
        target = resolve_target(target, model(model._check_images(images)), model.cfg.n_classes)
    rows = []
    for start, stop in tqdm(ranges, desc="layer ranges", disable=not progress):
        maps = caap(model, images, target=target, layers=(start, stop), progress=False, **caap_options)
        values = metric_fn(model, images, maps, target, progress=False).float()
        rows.append(dict(start=start, stop=stop, mean=values.mean().item(), std=values.std().item()))
    table = pd.DataFrame(rows)
    best = table.loc[table["mean"].idxmax() if higher_is_better else table["mean"].idxmin()]
    return LayerSweepResult(table, (int(best.start), int(best.stop)), name, higher_is_better)
