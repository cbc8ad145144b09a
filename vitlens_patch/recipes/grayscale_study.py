"""The grayscale study: which layers carry the colour information a CIFAR-10 ViT relies on?

A ViT trained on colour CIFAR-10 misclassifies many grayscale images. Clean run = the colour image,
corrupted run = its grayscale version (:func:`~vitlens_patch.patching.corruptions.corrupt_grayscale`),
score = softmax probability of the true class. For each centre layer, the clean attention outputs
(or MLP outputs) of a window of layers around it are restored into the grayscale run; the rise of the
true-class probability is that window's indirect effect. Averaged over many images (with 95%
confidence intervals, overall, per class and per image), the curve shows where colour matters::

    result = grayscale_study(model, "../shared/data/cifar10/test.tar.gz", indices=..., out="runs/gray")
    result.layer_means()           # per-layer mean indirect effect with its 95% CI
    result.per_class()             # the same per class
    result.accuracy()              # accuracy on colour vs grayscale images (Wilson 95% CI), per class and overall
    plot_layer_curve(result.trace)  # vitlens_patch.plots

The recipe is thin: each batch is one :func:`~vitlens_patch.patching.tracing.trace_layers` call, and
the batches run through :func:`~vitlens_patch.studies.runner.run_study` (progress bar, one Parquet
part per batch, resumable, shardable with torchrun).
"""

from __future__ import annotations

import functools
import html
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.utils.data import Dataset

from vitlens_patch.data.folder import LabelledImages
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.corruptions import corrupt_grayscale
from vitlens_patch.patching.results import TraceResult, read_saved_metadata
from vitlens_patch.patching.sites import PositionSelector, kind_hook, layer_window, resolve_positions
from vitlens_patch.patching.tracing import trace_layers
from vitlens_patch.statistics import wilson_interval
from vitlens_patch.studies.runner import run_study, stack_column, study_dataset

_METADATA_KEY = b"vitlens_patch.GrayscaleStudyResult"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class GrayscaleStudyResult:
    """Per-image results of :func:`grayscale_study`, with per-layer, per-class and accuracy summaries.

    Attributes:
        trace: effects [image, layer]: true-class probability with the window's clean activations
            restored into the grayscale run, minus the grayscale run's; ``clean_score`` /
            ``corrupted_score`` [image] are the true-class probabilities on the colour / grayscale
            image; ``coords["image"]`` holds the data set indices; ``settings`` the study settings.
        labels: true class per image [image].
        colour_prediction, grayscale_prediction: predicted class per image [image] on the colour
            and on the grayscale image.
        class_names: class index -> name, when known.
    """

    trace: TraceResult
    labels: Int[Tensor, " batch"]
    colour_prediction: Int[Tensor, " batch"]
    grayscale_prediction: Int[Tensor, " batch"]
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.trace.dims != ("image", "layer"):
            raise ValueError(f"trace must have dims ('image', 'layer'), got {self.trace.dims}")
        for name in ("labels", "colour_prediction", "grayscale_prediction"):
            if getattr(self, name).shape != (self.n_images,):
                raise ValueError(
                    f"{name} must have shape [{self.n_images}] (one per image), "
                    f"got {tuple(getattr(self, name).shape)}"
                )

    @property
    def n_images(self) -> int:
        return self.trace.n_images

    def _summary(self) -> str:
        settings = self.settings
        means = self.layer_means()
        peak = ""
        if means["mean"].notna().any():
            best = means["mean"].idxmax()
            peak = f"; largest mean effect {means.at[best, 'mean']:.4g} at layer {means.at[best, 'layer']}"
        return (
            f"{self.n_images} images, {settings.get('kind')} window {settings.get('window')}, "
            f"{len(means)} layers; accuracy colour {self.colour_accuracy:.1%}, grayscale "
            f"{self.grayscale_accuracy:.1%}{peak}"
        )

    def __repr__(self) -> str:
        return f"GrayscaleStudyResult({self._summary()})"

    def _repr_html_(self) -> str:
        means = self.layer_means()[["layer", "mean", "lower", "upper"]].set_index("layer").T
        accuracy = self.accuracy().tail(1)[
            ["n_images", "colour_accuracy", "colour_lower", "colour_upper", "grayscale_accuracy",
             "grayscale_lower", "grayscale_upper"]
        ]
        return "\n".join([
            f"<b>GrayscaleStudyResult</b>: {html.escape(self._summary())}",
            "<br>Mean indirect effect per layer (95% CI):",
            means.to_html(float_format="{:.4g}".format, border=0),
            "Accuracy, all images (95% Wilson interval):",
            accuracy.to_html(index=False, float_format="{:.4g}".format, border=0),
        ])

    @property
    def indices(self) -> list[int]:
        """Data set index of each image."""
        return self.trace.coord("image")

    @property
    def settings(self) -> dict:
        """Study settings: corruption, kind, hook, window, positions, score."""
        return {key: value for key, value in self.trace.settings.items() if key != "target"}

    @property
    def colour_accuracy(self) -> float:
        """Fraction of colour images classified correctly."""
        return (self.colour_prediction == self.labels).double().mean().item()

    @property
    def grayscale_accuracy(self) -> float:
        """Fraction of grayscale images classified correctly."""
        return (self.grayscale_prediction == self.labels).double().mean().item()

    def class_name(self, label: int) -> str:
        """Name of class ``label`` (its number as text when names are unknown)."""
        return self.class_names[label] if self.class_names is not None else str(label)

    def _class_label(self, label: int | str) -> int:
        if isinstance(label, str):
            if self.class_names is None or label not in self.class_names:
                raise ValueError(f"label must be one of the class names {self.class_names}, got {label!r}")
            return self.class_names.index(label)
        present = sorted(set(self.labels.tolist()))
        if label not in present:
            raise ValueError(f"label must be one of the classes studied {present}, got {label!r}")
        return label

    def for_class(self, label: int | str) -> TraceResult:
        """The trace restricted to the images of one class (index or name), dims [image, layer]."""
        return self.trace[self.labels == self._class_label(label)]

    def accuracy(self, *, confidence: float = 0.95) -> pd.DataFrame:
        """Accuracy on colour and on grayscale images with Wilson intervals: a row per class, then ``"all"``.

        Columns: ``class``, ``label`` (-1 for ``"all"``), ``n_images``, ``colour_accuracy``,
        ``colour_lower``, ``colour_upper``, ``grayscale_accuracy``, ``grayscale_lower``,
        ``grayscale_upper``. An accuracy is a proportion, so its interval is the Wilson score
        interval (:func:`~vitlens_patch.statistics.wilson_interval`), inside [0, 1].
        """
        correct = {
            "colour": (self.colour_prediction == self.labels).long(),
            "grayscale": (self.grayscale_prediction == self.labels).long(),
        }
        groups = [(label, self.labels == label) for label in sorted(set(self.labels.tolist()))]
        groups.append((-1, torch.ones_like(self.labels, dtype=torch.bool)))
        columns: dict[str, list] = {"label": [label for label, _ in groups]}
        n_images = np.array([int(members.sum()) for _, members in groups])
        columns["n_images"] = n_images.tolist()
        for kind, hits in correct.items():
            successes = np.array([int(hits[members].sum()) for _, members in groups])
            lower, upper = wilson_interval(successes, n_images, confidence)
            columns[f"{kind}_accuracy"] = (successes / n_images).tolist()
            columns[f"{kind}_lower"] = lower.tolist()
            columns[f"{kind}_upper"] = upper.tolist()
        frame = pd.DataFrame(columns)
        frame.insert(0, "class", [self.class_name(label) if label >= 0 else "all" for label in frame["label"]])
        return frame

    def layer_means(self, *, normalized: bool = False, confidence: float = 0.95) -> pd.DataFrame:
        """Mean indirect effect per layer over all images, with its confidence interval.

        Args:
            normalized: average ``trace.normalized()`` (each image's effect as a fraction of its
                colour - grayscale probability gap) instead of raw probability differences.
            confidence: level of the Student-t interval (see :meth:`TraceResult.mean`).

        Returns:
            Columns ``layer``, ``mean``, ``lower``, ``upper``, ``n_images``: one row per layer.
        """
        return _mean_frame(self.trace, normalized, confidence)

    def per_class(self, *, normalized: bool = False, confidence: float = 0.95) -> pd.DataFrame:
        """:meth:`layer_means` for each class: columns ``class``, ``label``, then those of
        :meth:`layer_means`; one row per (class, layer)."""
        frames = []
        for label in sorted(set(self.labels.tolist())):
            frame = _mean_frame(self.for_class(label), normalized, confidence)
            frame.insert(0, "label", label)
            frame.insert(0, "class", self.class_name(label))
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per image: ``index``, ``label``, ``class``, ``colour_prediction``,
        ``grayscale_prediction``, ``clean_score``, ``corrupted_score`` and ``effect`` (an array
        over layers; :func:`~vitlens_patch.studies.runner.stack_column` gives [image, layer])."""
        return pd.DataFrame({
            "index": np.asarray(self.indices, dtype=np.int64),
            "label": self.labels.numpy(),
            "class": [self.class_name(label) for label in self.labels.tolist()],
            "colour_prediction": self.colour_prediction.numpy(),
            "grayscale_prediction": self.grayscale_prediction.numpy(),
            "clean_score": self.trace.clean_score.numpy(),
            "corrupted_score": self.trace.corrupted_score.numpy(),
            "effect": list(self.trace.effects.numpy()),
        })

    def save(self, path: str | os.PathLike) -> None:
        """Write the per-image table (:meth:`to_dataframe`) as Parquet, settings in its metadata."""
        metadata = {
            "version": _FORMAT_VERSION,
            "settings": self.settings,
            "class_names": None if self.class_names is None else list(self.class_names),
            "layers": self.trace.coord("layer"),
            "grid_size": None if self.trace.grid_size is None else list(self.trace.grid_size),
            "n_prefix_tokens": self.trace.n_prefix_tokens,
        }
        table = pa.Table.from_pandas(self.to_dataframe(), preserve_index=False)
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), _METADATA_KEY: json.dumps(metadata).encode()}
        )
        pq.write_table(table, str(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GrayscaleStudyResult":
        """Read a file written by :meth:`save`."""
        table = pq.read_table(str(path))
        metadata = read_saved_metadata(
            (table.schema.metadata or {}).get(_METADATA_KEY), path,
            "a file written by GrayscaleStudyResult.save", _FORMAT_VERSION,
        )
        return _result_from_frame(
            table.to_pandas(), metadata["settings"], metadata["class_names"], metadata["layers"],
            metadata["grid_size"], metadata["n_prefix_tokens"],
        )


def _mean_frame(trace: TraceResult, normalized: bool, confidence: float) -> pd.DataFrame:
    """Per-layer mean and confidence interval of a [image, layer] trace, as a frame."""
    if normalized:
        trace = trace.normalized()
    summary = trace.mean(confidence=confidence)
    return pd.DataFrame({
        "layer": summary.coords["layer"],
        "mean": summary.mean.double().numpy(),
        "lower": summary.lower.double().numpy(),
        "upper": summary.upper.double().numpy(),
        "n_images": summary.count.numpy(),
    })


def _result_from_frame(
    frame: pd.DataFrame,
    settings: dict,
    class_names: Sequence[str] | None,
    layers: list,
    grid_size: Sequence[int] | None,
    n_prefix_tokens: int,
) -> GrayscaleStudyResult:
    """Study rows (the runner's frame or a saved table) -> a GrayscaleStudyResult."""

    def column(name: str, dtype: torch.dtype) -> Tensor:
        return torch.tensor(frame[name].to_numpy(), dtype=dtype)  # a copy: Arrow memory is read-only

    labels = column("label", torch.long)
    trace = TraceResult(
        effects=stack_column(frame, "effect").float(),
        dims=("image", "layer"),
        clean_score=column("clean_score", torch.float32),
        corrupted_score=column("corrupted_score", torch.float32),
        settings={**settings, "target": labels.tolist()},
        coords={"image": frame["index"].tolist(), "layer": list(layers)},
        grid_size=None if grid_size is None else tuple(grid_size),
        n_prefix_tokens=n_prefix_tokens,
    )
    return GrayscaleStudyResult(
        trace=trace,
        labels=labels,
        colour_prediction=column("colour_prediction", torch.long),
        grayscale_prediction=column("grayscale_prediction", torch.long),
        class_names=None if class_names is None else tuple(class_names),
    )


@torch.no_grad()
def measure_grayscale(
    model: HookedViT,
    images: Float[Tensor, "batch channel height width"],
    labels: Int[Tensor, " batch"],
    *,
    kind: str = "attn",
    window: int = 3,
    positions: PositionSelector = None,
    memory_budget_mb: float | None = None,
) -> dict[str, Tensor]:
    """One batch of the study (the ``measure`` of :func:`~vitlens_patch.studies.runner.run_study`).

    Args:
        images: normalised colour images [batch, channel, height, width].
        labels: true classes [batch]: the target of the probability score.

    Returns:
        ``effect`` [batch, layer] (``trace_layers`` on colour vs grayscale, score "prob", target
        the true class), ``clean_score`` / ``corrupted_score`` [batch] (true-class probability on the
        colour / grayscale image), ``colour_prediction`` / ``grayscale_prediction`` [batch].
    """
    grayscale = corrupt_grayscale(images, model.data_config)
    trace = trace_layers(
        model, images, grayscale, kind=kind, window=window, positions=positions, score="prob",
        target=labels, memory_budget_mb=memory_budget_mb, progress=False,
    )
    colour_prediction, grayscale_prediction = model(torch.cat([images, grayscale])).argmax(-1).chunk(2)
    return {
        "effect": trace.effects,
        "clean_score": trace.clean_score,
        "corrupted_score": trace.corrupted_score,
        "colour_prediction": colour_prediction,
        "grayscale_prediction": grayscale_prediction,
    }


def grayscale_study(
    model: HookedViT,
    data: Tensor | LabelledImages | Dataset | str | os.PathLike,
    labels: Int[Tensor, " batch"] | None = None,
    *,
    kind: str = "attn",
    window: int = 3,
    positions: PositionSelector = None,
    indices: Sequence[int] | Tensor | None = None,
    batch_size: int = 32,
    out: str | os.PathLike | None = None,
    memory_budget_mb: float | None = None,
    progress: bool = True,
) -> GrayscaleStudyResult:
    """Restore clean (colour) activations into grayscale runs, window by window, over a data set.

    Args:
        model: the HookedViT, in eval mode on its device; ``model.data_config`` defines grayscale.
        data: the images, any of
            - a tensor [batch, channel, height, width] with ``labels``: float tensors are normalised
              model input (``model.preprocess``), uint8 tensors raw pixels;
            - a :class:`~vitlens_patch.data.folder.LabelledImages` (e.g. ``load_sample()``);
            - an ImageFolder-layout folder or ``.tar.gz`` (e.g. ``../shared/data/cifar10/test.tar.gz``);
            - a map-style Dataset of ``(image, label)`` pairs, as in :func:`run_study`.
        labels: true class per image [image], only when ``data`` is a tensor.
        kind: sub-layer output restored: "attn" (attention outputs, the study's default), "mlp",
            "resid" or "resid_pre" (see :func:`trace_layers`).
        window: layers restored around each centre layer, in [1, n_layers] (3 = l-1, l, l+1;
            1 = single layers; an even window reaches one layer further down than up).
        positions: tokens restored, as in :func:`trace_layers` (default all).
        indices: data set indices to study (default all); :func:`select_per_class` gives a
            balanced subset, e.g. 100 per class.
        batch_size: images per engine call and per stored Parquet part.
        out: study directory (Parquet parts + ``results.parquet`` + ``study.json``):
            an interrupted study resumes from it, and under ``torchrun`` each process takes a
            share of the images (see :func:`run_study`). Default: a temporary directory.
        memory_budget_mb: activation memory per batched restoration pass (default: the engine's).
        progress: show a progress bar over images.

    Returns:
        GrayscaleStudyResult: per-image effects [image, layer], true-class probabilities,
        colour and grayscale predictions, with per-layer / per-class means and accuracies.
    """
    cfg = model.cfg
    hook = kind_hook(kind)
    layer_window(0, window, cfg.n_layers)  # raises on a bad window before any work
    settings = dict(
        function="grayscale_study", corruption="grayscale", kind=kind, hook=hook, window=window,
        positions=list(resolve_positions(positions, cfg)), score="prob",
    )
    dataset = study_dataset(data, labels)
    class_names = data.class_names if isinstance(data, LabelledImages) else model.class_names
    measure = functools.partial(
        measure_grayscale, kind=kind, window=window, positions=positions, memory_budget_mb=memory_budget_mb
    )
    with tempfile.TemporaryDirectory(prefix="grayscale_study_") as scratch:
        directory = Path(out) if out is not None else Path(scratch)
        frame = run_study(
            model, dataset, measure, directory, batch_size=batch_size, indices=indices,
            settings=settings, progress=progress, description=f"grayscale study ({kind}, window {window})",
        )
    if len(frame) == 0:
        raise ValueError(f"indices must select at least one image, got {indices!r}")
    return _result_from_frame(
        frame, settings, class_names, list(range(cfg.n_layers)), cfg.grid_size, cfg.n_prefix_tokens
    )


def save_layer_curves(results: Sequence[GrayscaleStudyResult], path: str | os.PathLike, *, model: str) -> Path:
    """Write the per-layer means (95% CIs) of grayscale studies of one model as a small JSON file.

    The file holds what a figure needs, not the per-image rows: e.g. the attention and MLP
    studies with windows 3 and 1 on 1,000 images of a model the tutorials cannot run in CI
    (:data:`~vitlens_patch.pretrained.DINOV2_GRAYSCALE_CURVES`). Read it with :func:`load_layer_curves`.

    Args:
        results: studies of the same images and model, e.g. ``GrayscaleStudyResult.load(p)`` of
            the files ``vitlens-patch study grayscale`` writes.
        path: the JSON file to write.
        model: the model's name, e.g. "dinov2_small_cifar10".
    """
    results = list(results)
    if not results or not all(isinstance(result, GrayscaleStudyResult) for result in results):
        raise ValueError(f"results must be a non-empty sequence of GrayscaleStudyResult, got {results!r}")
    if any(result.indices != results[0].indices for result in results):
        raise ValueError("results must be studies of the same images (indices differ)")
    first = results[0]
    curves = []
    for result in results:
        means = result.layer_means()
        curves.append({
            "kind": result.settings["kind"], "window": result.settings["window"],
            **{column: means[column].tolist() for column in ("layer", "mean", "lower", "upper")},
        })
    summary = {
        "model": model, "n_images": first.n_images, "colour_accuracy": first.colour_accuracy,
        "grayscale_accuracy": first.grayscale_accuracy, "score": "prob", "confidence": 0.95, "curves": curves,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return path


def load_layer_curves(path: str | os.PathLike) -> dict:
    """A file of :func:`save_layer_curves`: its fields, with ``curves`` as a frame of columns
    ``model``, ``curve`` ("attn window 3"), ``kind``, ``window``, ``layer``, ``mean``, ``lower``,
    ``upper``: a row per (curve, layer)."""
    summary = json.loads(Path(path).read_text(encoding="utf-8"))
    frames = [
        pd.DataFrame({key: curve[key] for key in ("layer", "mean", "lower", "upper")}).assign(
            model=summary["model"], curve=f"{curve['kind']} window {curve['window']}",
            kind=curve["kind"], window=curve["window"],
        )
        for curve in summary["curves"]
    ]
    columns = ["model", "curve", "kind", "window", "layer", "mean", "lower", "upper"]
    return {**summary, "curves": pd.concat(frames, ignore_index=True)[columns]}


__all__ = ["GrayscaleStudyResult", "grayscale_study", "load_layer_curves", "measure_grayscale", "save_layer_curves"]
