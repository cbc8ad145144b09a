"""CAAP's block range chosen by a faithfulness metric: one CAAP map per range, scored and ranked.

    ranges = default_sweep_ranges(model.cfg.n_layers)        # 10 ranges on the quarter points (12 blocks)
    caap_sweep_cost(model, n_images=1)                       # forward passes, before running it
    result = caap_layer_sweep(model, images)                 # progress bar in forward passes, ETA
    result.table, result.best, result.range_means()          # range_means: 95% CIs over images

    # a data set, resumably (one Parquet part per batch, run again to resume; torchrun shards it)
    result = caap_layer_study(model, "../shared/data/cifar10/test.tar.gz", indices=..., out="runs/caap")

Cost: every range runs one CAAP map per image (a full forward of the image and of its context,
then one partial forward per patch from the range's start block) and scores it (``n_steps + 1 = 17``
forwards for deletion or insertion). Ranges that start early cost most: on ViT-S/16 (12 blocks,
196 patches) the 10 default ranges cost 1,671 forward passes for one image, all 78 ranges 12,178
(7.3x more; the issue measured 1,036 s for those on a 2-core CPU).

:func:`caap_layer_study` runs the same computation (:func:`measure_caap_layers` per batch: the
sweep's per-range step on the batch's images) through
:func:`~vitlens_patch.studies.runner.run_study`, keeping every image's value for every range.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vitlens_patch.attribution.caap import caap, check_block_range, default_layers
from vitlens_patch.checks import Target
from vitlens_patch.data.folder import LabelledImages, load_image_folder
from vitlens_patch.metrics import deletion_auc, insertion_auc
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.scores import resolve_target
from vitlens_patch.statistics import student_t_half_width
from vitlens_patch.studies.runner import run_study, stack_column, study_dataset

SWEEP_METRICS = {"deletion": (deletion_auc, False), "insertion": (insertion_auc, True)}
_METRIC_STEPS = 16  # n_steps of deletion_auc / insertion_auc: n_steps + 1 forwards per image
STUDY_TARGETS = ("label", "predicted")


@dataclass(frozen=True)
class LayerSweepResult:
    """Faithfulness of CAAP maps for each block range.

    Attributes:
        table: one row per range: start, stop, mean (over images), std (sample standard deviation
            over images; 0 for one image), n_images.
        best: the (start, stop) with the best mean.
        metric: the metric's name.
        higher_is_better: direction of the metric.
        values: the metric of every image for every range [image, range] (float64), ranges in
            the table's order; None when only the table is known.
        indices: data set index of each image of ``values`` (:func:`caap_layer_study`), or None.
    """

    table: pd.DataFrame
    best: tuple[int, int]
    metric: str
    higher_is_better: bool
    values: Float[Tensor, "image range"] | None = None
    indices: list[int] | None = None

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The block ranges (start, stop), in the table's order."""
        return [(int(start), int(stop)) for start, stop in zip(self.table["start"], self.table["stop"])]

    def range_means(self, *, confidence: float = 0.95) -> pd.DataFrame:
        """Mean metric per range over images with its Student-t confidence interval.

        Columns ``start``, ``stop`` (ints), ``mean``, ``lower``, ``upper``, ``n_images``: one row
        per range. The interval is ``mean +- t * std / sqrt(n_images)``
        (:func:`~vitlens_patch.statistics.student_t_half_width`), NaN for one image.
        """
        table = self.table
        # NaN for one image: the table's std 0 is no spread
        half_width = student_t_half_width(table["std"].to_numpy(), table["n_images"].to_numpy(), confidence)
        mean = table["mean"].to_numpy(dtype=np.float64)
        return pd.DataFrame({
            "start": table["start"].astype(np.int64), "stop": table["stop"].astype(np.int64), "mean": mean,
            "lower": mean - half_width, "upper": mean + half_width, "n_images": table["n_images"].astype(np.int64),
        })

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
    columns = []
    total = caap_sweep_cost(model, n_images, metric=metric, ranges=ranges, **caap_options)
    with tqdm(total=round(total), desc="CAAP layer sweep", unit="fwd", disable=not progress) as bar:
        bar.update(n_images)
        for start, stop in ranges:
            bar.set_postfix_str(f"blocks [{start}, {stop})")
            columns.append(_range_values(model, images, target, (start, stop), metric_fn, caap_options))
            bar.update(round(_range_cost(model, n_images, start, metric_passes, caap_options)))
    return _sweep_result(torch.stack(columns, dim=1), ranges, name, higher_is_better)


def _range_values(
    model: HookedViT,
    images: Float[Tensor, "batch channel height width"],
    target: Int[Tensor, " batch"],
    block_range: tuple[int, int],
    metric_fn: Callable,
    caap_options: dict,
) -> Float[Tensor, " batch"]:
    """The sweep's step: CAAP maps of one block range, scored by the metric, per image (float64)."""
    maps = caap(model, images, target=target, layers=block_range, progress=False, **caap_options)
    return metric_fn(model, images, maps, target, progress=False).double()


def _sweep_result(
    values: Float[Tensor, "image range"],
    ranges: Sequence[tuple[int, int]],
    metric: str,
    higher_is_better: bool,
    indices: list[int] | None = None,
) -> LayerSweepResult:
    """Per-image values of every range -> the per-range table (mean, std) and the best range."""
    values = values.double().cpu()
    n_images = values.shape[0]
    rows = []
    for column, (start, stop) in enumerate(ranges):
        range_values = values[:, column]
        # the sample std needs two images; one image has no spread to estimate
        std = range_values.std().item() if n_images > 1 else 0.0
        rows.append({
            "start": int(start), "stop": int(stop), "mean": range_values.mean().item(), "std": std, "n_images": n_images,
        })
    table = pd.DataFrame(rows)
    best = table.loc[table["mean"].idxmax() if higher_is_better else table["mean"].idxmin()]
    return LayerSweepResult(table, (int(best.start), int(best.stop)), metric, higher_is_better, values, indices)


def measure_caap_layers(
    model: HookedViT,
    images: Float[Tensor, "batch channel height width"],
    labels: Int[Tensor, " batch"],
    *,
    ranges: Sequence[tuple[int, int]],
    metric: str = "deletion",
    target: str = "label",
    **caap_options,
) -> dict[str, Tensor]:
    """One batch of :func:`caap_layer_study` (the ``measure`` of
    :func:`~vitlens_patch.studies.runner.run_study`): :func:`caap_layer_sweep`'s per-range step.

    Args:
        images: model input [batch, channel, height, width].
        labels: true classes [batch].
        ranges: checked block ranges (start, stop).
        metric: "deletion" or "insertion".
        target: "label" (explain and score the true class) or "predicted" (the model's class).
        caap_options: passed to :func:`caap`.

    Returns:
        ``value`` [batch, range] (float64: the metric of each range's CAAP map) and
        ``prediction`` [batch] (the model's class).
    """
    metric_fn, _, _, _ = _resolve_metric(metric, None)
    if target not in STUDY_TARGETS:
        raise ValueError(f"target must be one of {STUDY_TARGETS}, got {target!r}")
    with torch.no_grad():
        prediction = model(images).argmax(-1)
    explained = labels if target == "label" else prediction
    values = [_range_values(model, images, explained, block_range, metric_fn, caap_options) for block_range in ranges]
    return {"value": torch.stack(values, dim=1), "prediction": prediction}


def _digested_dataset(
    data: Tensor | LabelledImages | Dataset | str | os.PathLike, labels: Tensor | None
) -> tuple[Dataset | LabelledImages, str | None]:
    """What run_study reads, and a digest of the images and labels when they are in memory."""
    if isinstance(data, (str, os.PathLike)):
        data = load_image_folder(data)
    dataset = study_dataset(data, labels)
    if isinstance(data, Tensor):
        images, labels = dataset.tensors
    elif isinstance(dataset, LabelledImages):
        images, labels = dataset.images, dataset.labels
    else:
        return dataset, None  # a Dataset read lazily: not digested
    digest = hashlib.sha256()
    for tensor in (images, labels):
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return dataset, digest.hexdigest()


def _jsonable_options(options: dict) -> dict:
    """CAAP options as JSON settings, with stable stand-ins for tensors and other objects."""

    def stand_in(value) -> str:
        if isinstance(value, Tensor):
            digest = hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            return f"tensor {list(value.shape)} sha256 {digest[:16]}"
        return repr(value)

    return json.loads(json.dumps(options, default=stand_in))


def caap_layer_study(
    model: HookedViT,
    data: Tensor | LabelledImages | Dataset | str | os.PathLike,
    labels: Int[Tensor, " batch"] | None = None,
    *,
    metric: str = "deletion",
    ranges: Sequence[tuple[int, int]] | str | None = None,
    target: str = "label",
    indices: Sequence[int] | Tensor | None = None,
    batch_size: int = 32,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    **caap_options,
) -> LayerSweepResult:
    """:func:`caap_layer_sweep` over a data set, batch by batch through the study runner.

    Every batch runs :func:`measure_caap_layers` (each range's CAAP map and its metric, per image)
    and is stored as one Parquet part in ``out``: an interrupted study resumes when called again
    with the same arguments, and under ``torchrun`` each process takes a share of the images
    (see :func:`~vitlens_patch.studies.runner.run_study`). A directory holding another study
    (other model, data, metric, ranges, target or CAAP options) is refused.

    Args:
        model: the HookedViT, in eval mode on its device.
        data: a tensor of images [batch, channel, height, width] with ``labels`` (float: model
            input; uint8: raw pixels), a :class:`~vitlens_patch.data.folder.LabelledImages`, an
            ImageFolder-layout folder or ``.tar.gz``, or a Dataset of ``(image, label)`` pairs.
        labels: true class per image [image], only when ``data`` is a tensor.
        metric: "deletion" (lower is better) or "insertion" (higher is better).
        ranges: as in :func:`caap_layer_sweep` (default :func:`default_sweep_ranges`, "all", or
            a list of (start, stop)).
        target: "label" (the true class, explained and scored) or "predicted" (the model's class;
            :func:`caap_layer_sweep`'s default).
        indices: data set indices to study (default all), e.g. from
            :func:`~vitlens_patch.data.folder.select_per_class`.
        batch_size: images per batch (per call of :func:`caap` and per stored part).
        out: study directory; default a temporary one (no resuming).
        progress: progress bar over images.
        caap_options: context, score, rows_per_pass, method... passed to :func:`caap` (its images
            per call are the study's ``batch_size``).

    Returns:
        LayerSweepResult with the per-range table, the best range, ``values`` [image, range] and
        the images' data set ``indices``; :meth:`LayerSweepResult.range_means` adds 95% CIs.
    """
    if not isinstance(metric, str) or metric not in SWEEP_METRICS:  # settings are JSON: no callables
        raise ValueError(f"metric must be one of {sorted(SWEEP_METRICS)} in a study, got {metric!r}")
    _, name, higher_is_better, _ = _resolve_metric(metric, None)
    if target not in STUDY_TARGETS:
        raise ValueError(f"target must be one of {STUDY_TARGETS}, got {target!r}")
    ranges = _resolve_ranges(ranges, model.cfg.n_layers)
    dataset, data_sha256 = _digested_dataset(data, labels)
    settings = {
        "function": "caap_layer_study", "metric": name, "ranges": [list(block_range) for block_range in ranges],
        "target": target, "caap_options": _jsonable_options(caap_options),
    }
    if data_sha256 is not None:
        settings["data_sha256"] = data_sha256

    def measure(model: HookedViT, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return measure_caap_layers(model, images, labels, ranges=ranges, metric=name, target=target, **caap_options)

    with tempfile.TemporaryDirectory(prefix="caap_layer_study_") as scratch:
        frame = run_study(
            model, dataset, measure, Path(out) if out is not None else Path(scratch), batch_size=batch_size,
            indices=indices, settings=settings, progress=progress,
            description=f"CAAP layer study ({len(ranges)} ranges, {name})",
        )
    if len(frame) == 0:
        raise ValueError(f"indices must select at least one image, got {indices!r}")
    values = stack_column(frame, "value")
    return _sweep_result(values, ranges, name, higher_is_better, frame["index"].tolist())
