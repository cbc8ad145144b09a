"""evaluate: every method's maps scored by every metric on the same images, run as a resumable study."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor
from torch.utils.data import TensorDataset

from vitlens_patch.checks import check_images, check_positive_int
from vitlens_patch.attribution.base import Attributor
from vitlens_patch.attribution.registry import ATTRIBUTORS, get_attributor
from vitlens_patch.evaluation.dataset import EvaluationSet
from vitlens_patch.evaluation.metrics import DEFAULT_METRICS, METRICS, ImageKind
from vitlens_patch.evaluation.result import EvaluationResult
from vitlens_patch.model import HookedViT
from vitlens_patch.studies.runner import run_study, stack_column

TARGETS = ("label", "predicted")
# Attributor attributes that change how a map is computed, not what it is: a resumed evaluation
# may change them.
_EXECUTION_OPTIONS = ("model", "score_fn", "progress", "batch_size", "rows_per_pass")


def evaluate(
    methods: Sequence[str | Attributor] | Mapping[str, str | Attributor],
    model: HookedViT,
    dataset: EvaluationSet,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    target: Literal["label", "predicted"] = "label",
    method_options: Mapping[str, dict] | None = None,
    metric_options: Mapping[str, dict] | None = None,
    batch_size: int = 25,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    seed: int = 0,
) -> EvaluationResult:
    """Score attribution methods with faithfulness and localization metrics on the same images.

    For each batch of images and each method, maps are computed once on the full-frame images
    (if a faithfulness metric is asked for) and once on the canvas images (if a localization
    metric is), with ``method.attribute(images, target)``; every metric of that image kind then
    scores the same maps. See :data:`METRICS` for the metrics and their directions.

    Args:
        methods: registered names (``vitlens_patch.attribution.ATTRIBUTORS``, "caap" included),
            ``Attributor`` instances bound to ``model`` (named by their registry name), or a
            mapping name -> either, to name them yourself (e.g. two CAAP settings).
        model: the HookedViT, in eval mode.
        dataset: the images; localization metrics need ``canvas_images`` and ``masks``
            (:meth:`EvaluationSet.from_cifar10` builds both).
        metrics: names among "deletion", "insertion", "token_deletion" (full-frame images) and
            "aupr", "pointing_game" (canvas images).
        target: the class explained and scored: "label" (the true class, default: every method
            is judged on the same question whether or not the model gets it right) or
            "predicted" (the model's class on the image kind at hand).
        method_options: name -> constructor options of a method given by registry name, e.g.
            ``{"caap": {"layers": (2, 10)}}``. Methods built here get ``progress=False`` unless
            their options say otherwise.
        metric_options: name -> keyword options of the metric function, e.g.
            ``{"deletion": {"n_steps": 32}}`` (see ``MetricSpec.options``).
        batch_size: images per step of the study, its unit of progress and of storage.
        out: a directory to keep the study in, so an interrupted evaluation resumes with the
            next call (same arguments); default a temporary directory. It holds one evaluation:
            the call raises if the model, the data, the methods, their options or the metrics
            differ from the stored ones.
        progress: show the study's progress bar (images done).
        seed: the global torch RNG is seeded with ``seed`` + the batch's first image position
            around each batch, for methods that draw from it. (The "random" method uses its own
            ``seed`` option and draws the same noise for every batch of equal size: its maps
            still ignore the image, which is all the baseline needs.)

    Returns:
        :class:`EvaluationResult`: per-image scores, every map, and the settings.
    """
    if not isinstance(model, HookedViT):
        raise ValueError(f"model must be a HookedViT, got {type(model).__name__}")
    if not isinstance(dataset, EvaluationSet):
        raise ValueError(f"dataset must be an EvaluationSet, got {type(dataset).__name__}")
    check_images(dataset.images, channels=model.cfg.in_chans, size=model.cfg.img_size, argument="dataset images")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    check_positive_int(batch_size, "batch_size")
    attributors = _build_methods(methods, model, method_options or {})
    metrics = _check_metrics(metrics, dataset, metric_options or {})
    metric_options = {name: dict((metric_options or {}).get(name, {})) for name in metrics}
    kinds = [kind for kind in ("full", "canvas") if any(METRICS[m].images == kind for m in metrics)]
    map_shapes = {
        name: list(model.cfg.img_size if method.upsample else model.cfg.grid_size)
        for name, method in attributors.items()
    }
    settings = {
        "methods": {name: _describe_method(method) for name, method in attributors.items()},
        "metrics": metrics,
        "metric_options": _jsonable(metric_options),
        "target": target,
        "seed": seed,
        "n_images": len(dataset),
        "map_shapes": map_shapes,
    }

    def measure(model: HookedViT, images: Tensor, labels: Tensor, indices: Tensor) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        with torch.random.fork_rng():
            torch.manual_seed(seed + int(indices[0]))
            for kind in kinds:
                inputs, masks = images, None
                if kind == "canvas":
                    inputs = dataset.canvas_images[indices.cpu()].to(images.device, images.dtype)
                    masks = dataset.masks[indices.cpu()].to(images.device)
                with torch.no_grad():
                    prediction = model(inputs).argmax(dim=-1)
                values[_column(kind, "prediction")] = prediction
                explained = labels if target == "label" else prediction
                for name, method in attributors.items():
                    maps = method.attribute(inputs, explained)
                    values[_column(kind, "map", name)] = maps.flatten(1)
                    for metric in metrics:
                        if METRICS[metric].images == kind:
                            values[_column(kind, metric, name)] = _score(
                                metric, model, inputs, maps, explained, masks, metric_options[metric]
                            )
        return values

    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch if out is None else out)
        frame = run_study(
            model, TensorDataset(dataset.images, dataset.labels), measure, directory,
            batch_size=batch_size, with_indices=True,
            settings={**settings, "data_sha256": _data_fingerprint(dataset)}, progress=progress,
            description=f"evaluation ({len(attributors)} methods, {len(metrics)} metrics)",
        )
    return _to_result(frame, list(attributors), metrics, kinds, settings)


def _column(kind: ImageKind, quantity: str, method: str | None = None) -> str:
    """Study column name, e.g. "full | deletion | caap" or "canvas | prediction"."""
    return " | ".join([kind, quantity] + ([] if method is None else [method]))


def _build_methods(
    methods: Sequence[str | Attributor] | Mapping[str, str | Attributor],
    model: HookedViT,
    method_options: Mapping[str, dict],
) -> dict[str, Attributor]:
    """name -> Attributor bound to ``model``, in the given order."""
    if isinstance(methods, (str, Attributor)):
        methods = [methods]
    if isinstance(methods, Mapping):
        named = list(methods.items())
    else:
        registered = {cls: name for name, cls in reversed(list(ATTRIBUTORS.items()))}
        named = [
            (method, method) if isinstance(method, str)
            else (registered.get(type(method), type(method).__name__), method)
            for method in methods
        ]
    if not named:
        raise ValueError("methods must name at least one attribution method, got none")
    names = [name for name, _ in named]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"methods must have distinct names, got {duplicates} more than once (name them with a dict)")
    unknown = [method for _, method in named if isinstance(method, str) and method not in ATTRIBUTORS]
    if unknown:
        raise ValueError(f"methods must be among {sorted(ATTRIBUTORS)} or Attributor instances, got unknown {unknown}")
    by_name = [name for name, method in named if isinstance(method, str)]
    stray = sorted(set(method_options) - set(by_name))
    if stray:
        raise ValueError(
            f"method_options must only name methods given by registry name {by_name}, got {stray}"
        )
    attributors = {}
    for name, method in named:
        if isinstance(method, str):
            method = get_attributor(method, model, **{"progress": False, **method_options.get(name, {})})
        elif not isinstance(method, Attributor):
            raise ValueError(f"methods must hold registry names or Attributor instances, got {type(method).__name__}")
        elif method.model is not model:
            raise ValueError(f"methods must be bound to the evaluated model; {name!r} explains another model")
        attributors[name] = method
    return attributors


def _describe_method(method: Attributor) -> dict:
    """JSON-able description of a method: its class and the options that shape its maps."""
    options = {
        key: value for key, value in vars(method).items()
        if key not in _EXECUTION_OPTIONS and not key.startswith("_")
    }
    return {"class": type(method).__name__, "options": _jsonable(options)}


def _jsonable(value) -> object:
    """``value`` through JSON, with stand-ins stable across sessions for what JSON cannot hold."""

    def stand_in(value) -> str:
        if isinstance(value, Tensor):
            digest = hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            return f"tensor {list(value.shape)} sha256 {digest[:16]}"
        if callable(value):  # a repr would hold a memory address
            return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
        return repr(value)

    return json.loads(json.dumps(value, default=stand_in))


def _check_metrics(metrics: Sequence[str], dataset: EvaluationSet, metric_options: Mapping[str, dict]) -> list[str]:
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown or not metrics or len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics must be distinct names among {list(METRICS)}, got {metrics}")
    localization = [metric for metric in metrics if METRICS[metric].images == "canvas"]
    if localization and not dataset.has_canvas:
        raise ValueError(
            f"metrics {localization} need canvas images with object masks, but the dataset has none "
            "(build it with EvaluationSet.from_cifar10, or give canvas_images and masks)"
        )
    stray = sorted(set(metric_options) - set(metrics))
    if stray:
        raise ValueError(f"metric_options must only name evaluated metrics {metrics}, got {stray}")
    for metric, options in metric_options.items():
        allowed = METRICS[metric].options()
        bad = sorted(set(options) - set(allowed))
        if bad:
            raise ValueError(f"metric_options[{metric!r}] must be among {allowed}, got {bad}")
    return metrics


def _score(
    metric: str,
    model: HookedViT,
    images: Tensor,
    maps: Tensor,
    target: Tensor,
    masks: Tensor | None,
    options: dict,
) -> Float[Tensor, " batch"]:
    spec = METRICS[metric]
    if spec.images == "full":
        return spec.function(model, images, maps, target, progress=False, **options).float()
    return spec.function(maps, masks, **options).float()


def _data_fingerprint(dataset: EvaluationSet) -> str:
    """A digest of the evaluation images, labels and masks (the runner digests the model)."""
    digest = hashlib.sha256()
    tensors = [dataset.images, dataset.labels]
    tensors += [t for t in (dataset.canvas_images, dataset.masks) if t is not None]
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _to_result(
    frame: pd.DataFrame, methods: list[str], metrics: list[str], kinds: list[ImageKind], settings: dict
) -> EvaluationResult:
    """The study's wide frame (a row per image) -> the long scores and the maps per method."""
    parts = []
    for method in methods:
        for metric in metrics:
            kind = METRICS[metric].images
            parts.append(pd.DataFrame({
                "method": method,
                "metric": metric,
                "image": frame["index"].to_numpy(),
                "label": frame["label"].to_numpy(),
                "prediction": frame[_column(kind, "prediction")].to_numpy(),
                "value": frame[_column(kind, metric, method)].to_numpy(dtype=np.float64),
            }))
    maps: dict[ImageKind, dict[str, Tensor]] = {"full": {}, "canvas": {}}
    for kind in kinds:
        for method in methods:
            map_h, map_w = settings["map_shapes"][method]
            flat = stack_column(frame, _column(kind, "map", method)).float()
            maps[kind][method] = rearrange(flat, "image (map_h map_w) -> image map_h map_w", map_h=map_h, map_w=map_w)
    return EvaluationResult(pd.concat(parts, ignore_index=True), maps["full"], maps["canvas"], settings)
