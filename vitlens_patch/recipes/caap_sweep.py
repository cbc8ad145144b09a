"""CAAP's block range chosen by a faithfulness metric: one CAAP map per range, scored and ranked.

    ranges = default_sweep_ranges(model.cfg.n_layers)        # 10 ranges on the quarter points (12 blocks)
    caap_sweep_cost(model, n_images=1)                       # forward passes, before running it
    result = caap_layer_sweep(model, images)                 # progress bar in forward passes, ETA
    result.table, result.best

Cost: every range runs one CAAP map per image (a full forward of the image and of its context,
then one partial forward per patch from the range's start block) and scores it (``n_steps + 1 = 17``
forwards for deletion or insertion). Ranges that start early cost most: on ViT-S/16 (12 blocks,
196 patches) the 10 default ranges cost 1,671 forward passes for one image, all 78 ranges 12,178
(7.3x more; the issue measured 1,036 s for those on a 2-core CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from vitlens_patch.attribution.caap import caap, check_block_range, default_layers
from vitlens_patch.checks import Target
from vitlens_patch.metrics import deletion_auc, insertion_auc
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.scores import resolve_target

SWEEP_METRICS = {"deletion": (deletion_auc, False), "insertion": (insertion_auc, True)}
_METRIC_STEPS = 16  # n_steps of deletion_auc / insertion_auc: n_steps + 1 forwards per image


@dataclass(frozen=True)
class LayerSweepResult:
    """Faithfulness of CAAP maps for each block range.

    Attributes:
        table: one row per range: start, stop, mean (over images), std (sample standard deviation
            over images; 0 for one image), n_images.
        best: the (start, stop) with the best mean.
        metric: the metric's name.
        higher_is_better: direction of the metric.
    """

    table: pd.DataFrame
    best: tuple[int, int]
    metric: str
    higher_is_better: bool

    def __repr__(self) -> str:
        return (
            f"LayerSweepResult({len(self.table)} block ranges, metric={self.metric!r} "
            f"({'higher' if self.higher_is_better else 'lower'} is better), best={self.best})"
        )


def default_sweep_ranges(n_layers: int) -> list[tuple[int, int]]:
    """Every block range (start, stop) whose ends lie on the quarter points of the network, and
    CAAP's default range.

    The points are ``round(k * n_layers / 4)`` for k = 0..4 (0, 3, 6, 9, 12 for 12 blocks), so a
    network of 4 or more blocks gets 10 ranges: the four quarters, the three halves, the two
    three-quarters and the whole network; CAAP's default (the middle half,
    :func:`~vitlens_patch.attribution.caap.default_layers`) is among them when ``n_layers`` is a
    multiple of 4 and added otherwise (11 ranges). Fewer blocks give fewer distinct points
    (3 ranges for 2 blocks, 1 for 1). Sorted by start, then stop.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be an integer >= 1, got {n_layers!r}")
    points = sorted({(2 * k * n_layers + 4) // 8 for k in range(5)})  # round half up of k * n / 4
    ranges = {(start, stop) for i, start in enumerate(points) for stop in points[i + 1 :]}
    return sorted(ranges | {default_layers(n_layers)})


def _range_cost(model: HookedViT, n_images: int, start: int, metric_passes: int, caap_options: dict) -> float:
    """Forward passes of one range: CAAP's maps, then the metric's scores."""
    cfg = model.cfg
    if caap_options.get("method", "exact") == "attribution":
        # source forward, context forward + backward (about two forwards), then the verified patches
        verified = caap_options.get("verify_top_k") or 0
        caap_passes = 4 + min(verified, cfg.n_patches) * (cfg.n_layers - start) / cfg.n_layers
    else:
        # source and context forwards, then one forward per patch from block `start` on
        caap_passes = 2 + cfg.n_patches * (cfg.n_layers - start) / cfg.n_layers
    # the metric: n_steps + 1 forwards per image, and one of one image to check the class count
    return n_images * (caap_passes + metric_passes) + (1 if metric_passes else 0)


def _resolve_metric(metric, higher_is_better) -> tuple[Callable, str, bool, int]:
    """(function, name, higher_is_better, forward passes per image or 0 when unknown)."""
    if isinstance(metric, str):
        if metric not in SWEEP_METRICS:
            raise ValueError(f"metric must be one of {sorted(SWEEP_METRICS)} or a callable, got {metric!r}")
        function, higher_is_better = SWEEP_METRICS[metric]
        return function, metric, higher_is_better, _METRIC_STEPS + 1
    if callable(metric):
        if higher_is_better is None:
            raise ValueError("higher_is_better must be given with a callable metric")
        return metric, getattr(metric, "__name__", "custom"), higher_is_better, 0
    raise ValueError(f"metric must be a name or a callable, got {metric!r}")


def _resolve_ranges(ranges, n_layers: int) -> list[tuple[int, int]]:
    ranges = default_sweep_ranges(n_layers) if ranges is None else ranges
    if ranges == "all":
        ranges = [(start, stop) for start in range(n_layers) for stop in range(start + 1, n_layers + 1)]
    ranges = [check_block_range(block_range, n_layers) for block_range in ranges]
    if not ranges:
        raise ValueError("ranges must hold at least one (start, stop) block range")
    return ranges


def caap_sweep_cost(
    model: HookedViT,
    n_images: int = 1,
    *,
    metric: str | Callable = "deletion",
    ranges: Sequence[tuple[int, int]] | str | None = None,
    **caap_options,
) -> float:
    """Estimated cost of :func:`caap_layer_sweep` in forward passes of one image.

    Per image: one forward to find the target, then per range (start, stop) CAAP's source and
    context forwards, ``n_patches * (n_layers - start) / n_layers`` forwards for the patch rows
    (each runs from block ``start``), and ``n_steps + 1 = 17`` forwards for "deletion" or
    "insertion" (plus one per range to check the class count; a callable metric's cost is
    unknown and counted as 0). With
    ``method="attribution"`` in ``caap_options`` a range costs about 4 forwards plus the
    verified patches. Partial forwards count as the fraction of blocks they run, so the estimate
    is proportional to time: 1,671 for one ViT-S/16 image with the default ranges.

    Args:
        model: the HookedViT.
        n_images: images swept.
        metric, ranges, caap_options: as in :func:`caap_layer_sweep`.
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be an integer >= 1, got {n_images!r}")
    _, _, _, metric_passes = _resolve_metric(metric, True)
    ranges = _resolve_ranges(ranges, model.cfg.n_layers)
    return n_images + sum(_range_cost(model, n_images, start, metric_passes, caap_options) for start, _ in ranges)


def caap_layer_sweep(
    model: HookedViT,
    images: Float[Tensor, "batch channel height width"],
    *,
    target: Target = None,
    metric: str | Callable = "deletion",
    higher_is_better: bool | None = None,
    ranges: Sequence[tuple[int, int]] | str | None = None,
    progress: bool = True,
    **caap_options,
) -> LayerSweepResult:
    """Score CAAP maps of each block range (start, stop) by a faithfulness metric; pick the best.

    Cost: :func:`caap_sweep_cost` forward passes (1,671 for one ViT-S/16 image with the default
    10 ranges, 12,178 with ``ranges="all"``); the progress bar counts them and shows the ETA.

    Args:
        model, images, target: as in :func:`caap`.
        metric: "deletion" (RISE deletion AUC, lower is better), "insertion" (higher is better),
            or a callable (model, images, maps, target) -> [batch] with ``higher_is_better`` given.
        ranges: block ranges to try; default :func:`default_sweep_ranges` (10 ranges on the
            quarter points of the network); "all" for every 0 <= start < stop <= n_layers
            (n_layers * (n_layers + 1) / 2 ranges: 78 for 12 blocks).
        progress: progress bar in forward passes, with an ETA.
        caap_options: context, score, batch_size... passed to :func:`caap`.

    Returns:
        LayerSweepResult with the per-range table and the best range.
    """
    metric_fn, name, higher_is_better, metric_passes = _resolve_metric(metric, higher_is_better)
    ranges = _resolve_ranges(ranges, model.cfg.n_layers)
    images = model.check_images(images)
    n_images = images.shape[0]
    with torch.no_grad():
        target = resolve_target(target, model(images), model.cfg.n_classes)
    rows = []
    total = caap_sweep_cost(model, n_images, metric=metric, ranges=ranges, **caap_options)
    with tqdm(total=round(total), desc="CAAP layer sweep", unit="fwd", disable=not progress) as bar:
        bar.update(n_images)
        for start, stop in ranges:
            bar.set_postfix_str(f"blocks [{start}, {stop})")
            maps = caap(model, images, target=target, layers=(start, stop), progress=False, **caap_options)
            values = metric_fn(model, images, maps, target, progress=False).double()
            # the sample std needs two images; one image has no spread to estimate
            std = values.std().item() if n_images > 1 else 0.0
            rows.append(dict(start=start, stop=stop, mean=values.mean().item(), std=std, n_images=n_images))
            bar.update(round(_range_cost(model, n_images, start, metric_passes, caap_options)))
    table = pd.DataFrame(rows)
    best = table.loc[table["mean"].idxmax() if higher_is_better else table["mean"].idxmin()]
    return LayerSweepResult(table, (int(best.start), int(best.stop)), name, higher_is_better)
