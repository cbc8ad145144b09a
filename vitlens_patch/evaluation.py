"""Compare attribution methods on one data set: faithfulness and localization, mean and 95% CI.

    data = EvaluationSet.from_cifar10(model, "../shared/data/cifar10/test.tar.gz", n=500)
    result = evaluate(["caap", "rollout", "random"], model, data, out="runs/evaluation")
    result.table()                                   # mean, ci_low, ci_high, n per (method, metric)
    print(result.to_markdown())                      # the same, as a README table

    from vitlens_patch.plots import plot_attribution_grid, plot_method_comparison
    plot_method_comparison(result.table())           # bars with confidence intervals, per metric
    plot_attribution_grid(data.pixels(range(6)), result.select_maps(range(6)), labels=data.labels[:6])

Every method's map is computed once per image and image kind, then scored by every metric of that
kind. Two image kinds are used (see :mod:`vitlens_patch.data.cifar10`):

- *full frame* images, for the faithfulness metrics ("deletion", "insertion", "token_deletion");
- *canvas* images, the object pasted on a class-free background with a known box, for the
  localization metrics ("aupr", "pointing_game") against the object masks.

The work runs as a study (:func:`vitlens_patch.studies.run_study`): batch by batch, each batch's
maps and scores stored at once, so an evaluation given an ``out`` directory resumes where it
stopped (and can be sharded with torchrun). The figures live in :mod:`vitlens_patch.plots`, one
layer up: they take ``result.table()`` and tensors, so this module builds no figure.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from scipy import stats
from torch import Tensor
from torch.utils.data import TensorDataset

# importing CAAP registers it as "caap" in the attribution registry
import vitlens_patch.recipes.caap  # noqa: F401
from vitlens_patch.attribution.base import Attributor
from vitlens_patch.attribution.registry import ATTRIBUTORS, get_attributor
from vitlens_patch.data.cifar10 import LabelledImages, canvas_test_set, load_image_folder
from vitlens_patch.metrics import (
    boxes_to_masks,
    deletion_auc,
    insertion_auc,
    localization_aupr,
    pointing_game,
    token_deletion_auc,
)
from vitlens_patch.model import DataConfig, HookedViT
from vitlens_patch.patching.results import read_saved_metadata
from vitlens_patch.studies.runner import run_study, select_per_class, stack_column

ImageKind = Literal["full", "canvas"]
TARGETS = ("label", "predicted")
_SCORES_FILE = "scores.parquet"
_MAPS_FILE = "maps.safetensors"
_METADATA_KEY = "vitlens_patch.EvaluationResult"
_FORMAT_VERSION = 1
# Attributor attributes that change how a map is computed, not what it is: a resumed evaluation
# may change them.
_EXECUTION_OPTIONS = ("model", "score_fn", "progress", "batch_size")


@dataclass(frozen=True)
class MetricSpec:
    """How the harness computes one metric.

    Attributes:
        function: the metric from :mod:`vitlens_patch.metrics`. Faithfulness metrics are called as
            ``function(model, images, maps, target, **options)``, localization metrics as
            ``function(maps, masks, **options)``.
        images: "full" (full-frame images) or "canvas" (canvas images with object masks).
        higher_is_better: the direction of a better map.
    """

    function: Callable[..., Tensor]
    images: ImageKind
    higher_is_better: bool

    def options(self) -> list[str]:
        """The keyword options ``metric_options`` may set (the harness sets ``progress``)."""
        parameters = inspect.signature(self.function).parameters.values()
        return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name != "progress"]


# name -> metric. deletion / insertion / token_deletion: area under the target probability as the
# top-ranked patches turn black / return into a blurred image / are dropped as tokens (RISE).
# aupr: average precision of the map's pixels against the object mask; pointing_game: whether the
# map's maximum falls on the object (1 or 0 per image, so its mean is the hit rate).
METRICS: dict[str, MetricSpec] = {
    "deletion": MetricSpec(deletion_auc, "full", higher_is_better=False),
    "insertion": MetricSpec(insertion_auc, "full", higher_is_better=True),
    "token_deletion": MetricSpec(token_deletion_auc, "full", higher_is_better=False),
    "aupr": MetricSpec(localization_aupr, "canvas", higher_is_better=True),
    "pointing_game": MetricSpec(pointing_game, "canvas", higher_is_better=True),
}
DEFAULT_METRICS = tuple(METRICS)


# --------------------------------------------------------------------------------- data set
@dataclass(frozen=True)
class EvaluationSet:
    """The images an evaluation runs on.

    Attributes:
        images: full-frame normalised model inputs [image, channel, height, width].
        labels: int64 true classes [image].
        canvas_images: optional canvas images, normalised model inputs [image, channel, height,
            width]: image i's object on a class-free background (needed by "aupr" and
            "pointing_game").
        masks: bool object masks of the canvas images [image, height, width]; given together with
            ``canvas_images``.
        class_names: class index -> name, if known.
        source_indices: int64 [image] index of each image in the data set it was drawn from.
        data_config: the normalisation of the images (``model.data_config``), for :meth:`pixels`.
    """

    images: Float[Tensor, "image channel height width"]
    labels: Int[Tensor, " image"]
    canvas_images: Float[Tensor, "image channel height width"] | None = None
    masks: Bool[Tensor, "image height width"] | None = None
    class_names: tuple[str, ...] | None = None
    source_indices: Int[Tensor, " image"] | None = None
    data_config: DataConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or self.images.ndim != 4 or not self.images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor [image, channel, height, width], got {_describe(self.images)}"
            )
        n_images = len(self.images)
        if n_images == 0:
            raise ValueError("images must hold at least one image, got 0")
        if (not isinstance(self.labels, Tensor) or self.labels.shape != (n_images,)
                or self.labels.is_floating_point() or self.labels.dtype == torch.bool):
            raise ValueError(f"labels must be an integer tensor [{n_images}], got {_describe(self.labels)}")
        object.__setattr__(self, "labels", self.labels.long())
        if (self.canvas_images is None) != (self.masks is None):
            raise ValueError("canvas_images and masks must be given together (or neither)")
        if self.canvas_images is not None:
            if (not isinstance(self.canvas_images, Tensor) or self.canvas_images.shape != self.images.shape
                    or not self.canvas_images.is_floating_point()):
                raise ValueError(
                    f"canvas_images must be a float tensor of the images' shape {tuple(self.images.shape)}, "
                    f"got {_describe(self.canvas_images)}"
                )
            expected = (n_images, *self.images.shape[-2:])
            if not isinstance(self.masks, Tensor) or self.masks.dtype != torch.bool or self.masks.shape != expected:
                raise ValueError(f"masks must be a bool tensor {list(expected)}, got {_describe(self.masks)}")
        if self.source_indices is not None:
            if not isinstance(self.source_indices, Tensor) or self.source_indices.shape != (n_images,):
                raise ValueError(f"source_indices must be a tensor [{n_images}], got {_describe(self.source_indices)}")
            object.__setattr__(self, "source_indices", self.source_indices.long())
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_canvas(self) -> bool:
        """Whether the set holds canvas images and masks, for the localization metrics."""
        return self.canvas_images is not None

    def subset(self, indices: Sequence[int] | slice | Tensor) -> EvaluationSet:
        """The images at ``indices`` (positions in this set), e.g. ``data.subset(range(10))``."""
        index = torch.arange(len(self))[indices if isinstance(indices, slice) else torch.as_tensor(indices)]
        index = index.reshape(-1)

        def pick(values: Tensor | None) -> Tensor | None:
            return None if values is None else values[index]

        return replace(
            self, images=self.images[index], labels=self.labels[index],
            canvas_images=pick(self.canvas_images), masks=pick(self.masks),
            source_indices=pick(self.source_indices),
        )

    def pixels(
        self, indices: Sequence[int] | slice | Tensor | None = None, *, canvas: bool = False
    ) -> Float[Tensor, "image channel height width"]:
        """Full-frame (or canvas) images at ``indices`` (default all) as [0, 1] pixels, for drawing."""
        if self.data_config is None:
            raise ValueError("pixels() needs the set's data_config (the normalisation of its images), got None")
        if canvas and not self.has_canvas:
            raise ValueError("canvas=True needs a set with canvas_images, got a set without them")
        chosen = self.subset(slice(None) if indices is None else indices)
        images = chosen.canvas_images if canvas else chosen.images
        return self.data_config.denormalize(images).clamp(0, 1)

    @classmethod
    def from_cifar10(
        cls, model: HookedViT, source: LabelledImages | str | os.PathLike, n: int, *, seed: int = 0
    ) -> EvaluationSet:
        """``n`` test images, ``n / n_classes`` per class, as full-frame and canvas model inputs.

        Images are chosen per class at random (``select_per_class(labels, n // n_classes,
        seed=seed)``). Full frame: ``model.preprocess`` (resized to the model's input). Canvas:
        the image at its own resolution pasted at a random position on a smooth-noise canvas of
        the model's input size (``canvas_test_set(..., seed=seed)``), then normalised; its mask
        is the pasted box.

        Args:
            model: gives the input size and normalisation (``model.data_config``).
            source: a :class:`LabelledImages` or an ImageFolder path / ``.tar.gz`` archive such as
                ``../shared/data/cifar10/test.tar.gz``; its images must be smaller than the
                model's (square) input, so that the canvas has a background.
            n: total number of images, a multiple of the number of classes.
            seed: seeds the choice of images, the canvas backgrounds and the object positions.
        """
        images = load_image_folder(source) if isinstance(source, (str, os.PathLike)) else source
        if not isinstance(images, LabelledImages):
            raise ValueError(f"source must be LabelledImages or an image folder path, got {type(source).__name__}")
        n_classes = len(images.class_names)
        if isinstance(n, bool) or not isinstance(n, int) or n < n_classes or n % n_classes:
            raise ValueError(f"n must be a positive multiple of the {n_classes} classes, got {n!r}")
        height, width = model.cfg.img_size
        if height != width or max(images.images.shape[-2:]) >= height:
            raise ValueError(
                f"source images ({tuple(images.images.shape[-2:])}) must be smaller than the model's "
                f"square input ({height}, {width}) to be pasted on a canvas"
            )
        model_names = getattr(model, "class_names", None)
        if model_names is not None and tuple(model_names) != tuple(images.class_names):
            raise ValueError(
                f"source class names {images.class_names} must match model.class_names {tuple(model_names)}"
            )
        indices = torch.tensor(select_per_class(images.labels, n // n_classes, seed=seed))
        chosen = images.subset(indices)
        canvases, boxes = canvas_test_set(chosen, canvas_size=height, seed=seed)
        return cls(
            images=model.preprocess(chosen.images).cpu(),
            labels=chosen.labels,
            canvas_images=model.data_config.normalize(canvases).to(model.dtype),
            masks=boxes_to_masks(boxes, (height, height)),
            class_names=images.class_names,
            source_indices=indices,
            data_config=model.data_config,
        )


# ---------------------------------------------------------------------------------- result
@dataclass
class EvaluationResult:
    """Per-image scores and maps of an evaluation.

    Attributes:
        scores: long frame, one row per (method, metric, image): columns ``method``, ``metric``,
            ``image`` (position in the :class:`EvaluationSet`), ``label``, ``prediction`` (the
            model's class for the image kind the metric uses), ``value``.
        maps: method -> maps on the full-frame images [image, map_h, map_w] (empty without a
            faithfulness metric).
        canvas_maps: method -> maps on the canvas images (empty without a localization metric).
        settings: JSON-able settings of the run (methods with their options, metrics, target...).
    """

    scores: pd.DataFrame
    maps: dict[str, Tensor] = field(default_factory=dict)
    canvas_maps: dict[str, Tensor] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = {"method", "metric", "image", "value"} - set(self.scores.columns)
        if missing:
            raise ValueError(f"scores must have columns method, metric, image, value; missing {sorted(missing)}")

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(self.scores["method"]))

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(self.scores["metric"]))

    def table(self, *, confidence: float = 0.95) -> pd.DataFrame:
        """Mean and Student-t confidence interval per (method, metric), in evaluation order.

        The interval is ``mean +- t * sd / sqrt(n)`` with ``t`` the ``(1 + confidence) / 2``
        quantile of Student's t with ``n - 1`` degrees of freedom, ``sd`` the sample standard
        deviation over the ``n`` images (NaN values left out); it is NaN for ``n < 2``. Being
        symmetric, it may reach past a metric's range (e.g. above 1 for a pointing game near 1).

        Returns:
            Columns ``method``, ``metric``, ``mean``, ``ci_low``, ``ci_high``, ``n``,
            ``higher_is_better``: the input of :func:`vitlens_patch.plots.plot_method_comparison`.
        """
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        grouped = self.scores.groupby(["method", "metric"], sort=False)["value"]
        table = grouped.agg(mean="mean", sd="std", n="count").reset_index()
        n = table["n"].to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            half_width = stats.t.ppf((1 + confidence) / 2, n - 1) * table["sd"].to_numpy() / np.sqrt(n)
        half_width = np.where(n >= 2, half_width, np.nan)
        table["ci_low"] = table["mean"] - half_width
        table["ci_high"] = table["mean"] + half_width
        table["higher_is_better"] = [METRICS[metric].higher_is_better for metric in table["metric"]]
        return table[["method", "metric", "mean", "ci_low", "ci_high", "n", "higher_is_better"]]

    def to_markdown(self, *, confidence: float = 0.95, digits: int = 3) -> str:
        """A Markdown table, a row per method and a column per metric: ``mean ± half-width``."""
        table = self.table(confidence=confidence)
        arrows = {metric: "↑" if METRICS[metric].higher_is_better else "↓" for metric in self.metrics}
        header = ["method", *(f"{metric} {arrows[metric]}" for metric in self.metrics)]
        cells = {(row.method, row.metric): row for row in table.itertuples()}
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method in self.methods:
            values = []
            for metric in self.metrics:
                row = cells[method, metric]
                half = (row.ci_high - row.ci_low) / 2
                values.append(f"{row.mean:.{digits}f}" + ("" if np.isnan(half) else f" ± {half:.{digits}f}"))
            lines.append("| " + " | ".join([method, *values]) + " |")
        n_images = int(table["n"].max())
        lines.append("")
        lines.append(
            f"Mean ± half-width of the {confidence:.0%} Student-t confidence interval over {n_images} "
            "images; ↑ higher is better, ↓ lower is better."
        )
        return "\n".join(lines)

    def select_maps(
        self, indices: Sequence[int] | slice | Tensor, *, canvas: bool = False
    ) -> dict[str, Float[Tensor, "image map_h map_w"]]:
        """Every method's maps of the images at ``indices``, for ``plot_attribution_grid``.

        Args:
            indices: positions in the evaluated set.
            canvas: the maps of the canvas images instead of the full-frame ones.
        """
        maps = self.canvas_maps if canvas else self.maps
        if not maps:
            kind = "canvas" if canvas else "full-frame"
            raise ValueError(f"canvas={canvas} needs {kind} maps, but this evaluation computed none")
        index = indices if isinstance(indices, slice) else torch.as_tensor(indices).reshape(-1)
        return {method: values[index] for method, values in maps.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write a directory: ``scores.parquet`` and ``maps.safetensors`` (with the settings)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.scores.to_parquet(path / _SCORES_FILE, index=False)
        tensors = {f"full/{method}": maps.contiguous() for method, maps in self.maps.items()}
        tensors |= {f"canvas/{method}": maps.contiguous() for method, maps in self.canvas_maps.items()}
        # safetensors needs at least one tensor to write a file with metadata
        tensors = tensors or {"empty": torch.zeros(0)}
        save_file(tensors, str(path / _MAPS_FILE), metadata={
            _METADATA_KEY: json.dumps({"version": _FORMAT_VERSION, "settings": self.settings})
        })

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvaluationResult:
        """Read a directory written by :meth:`save`."""
        path = Path(path)
        if not (path / _SCORES_FILE).is_file() or not (path / _MAPS_FILE).is_file():
            raise ValueError(
                f"path must be a directory written by EvaluationResult.save (holding {_SCORES_FILE} "
                f"and {_MAPS_FILE}), got {str(path)!r}"
            )
        with safe_open(str(path / _MAPS_FILE), framework="pt") as file:
            text = (file.metadata() or {}).get(_METADATA_KEY)
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        settings = read_saved_metadata(
            text, path, "a directory written by EvaluationResult.save", _FORMAT_VERSION
        )["settings"]
        maps = {name.split("/", 1)[1]: t for name, t in tensors.items() if name.startswith("full/")}
        canvas_maps = {name.split("/", 1)[1]: t for name, t in tensors.items() if name.startswith("canvas/")}
        return cls(pd.read_parquet(path / _SCORES_FILE), maps, canvas_maps, settings)


# -------------------------------------------------------------------------------- evaluate
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
    expected = (model.cfg.in_chans, *model.cfg.img_size)
    if tuple(dataset.images.shape[1:]) != expected:
        raise ValueError(
            f"dataset images must be model inputs [image, {', '.join(map(str, expected))}], "
            f"got {tuple(dataset.images.shape)}"
        )
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
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
        )
    return _to_result(frame, list(attributors), metrics, kinds, settings)


# ----------------------------------------------------------------------------- internals
def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


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
