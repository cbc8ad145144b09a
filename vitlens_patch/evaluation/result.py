"""EvaluationResult: per-image scores and maps of an evaluation, its summary table and its files."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from vitlens_patch.evaluation.metrics import METRICS
from vitlens_patch.patching.results import read_saved_metadata
from vitlens_patch.statistics import student_t_half_width, wilson_interval

_SCORES_FILE = "scores.parquet"
_MAPS_FILE = "maps.safetensors"
_METADATA_KEY = "vitlens_patch.EvaluationResult"
_FORMAT_VERSION = 1


@dataclass
class EvaluationResult:
    """Per-image scores and maps of an evaluation.

    Attributes:
        scores: long frame, one row per (method, metric, image): columns ``method``, ``metric``,
            ``image`` (position in the :class:`EvaluationSet`), ``label``, ``prediction`` (the
            model's class for the image kind the metric uses), ``value``.
        maps: method -> maps on the full-frame images [batch, map_h, map_w] (empty without a
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

    def __repr__(self) -> str:
        n_images = self.scores["image"].nunique()
        return (
            f"EvaluationResult({len(self.methods)} methods x {len(self.metrics)} metrics on {n_images} images)\n"
            + self.to_markdown()
        )

    def _repr_html_(self) -> str:
        n_images = self.scores["image"].nunique()
        return (
            f"<b>EvaluationResult</b>: {len(self.methods)} methods x {len(self.metrics)} metrics on "
            f"{n_images} images"
            + self.summary_table().to_html(index=False, border=0)
            + f"<small>{html.escape(self.interval_note())}</small>"
        )

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(self.scores["method"]))

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(self.scores["metric"]))

    def table(self, *, confidence: float = 0.95) -> pd.DataFrame:
        """Mean and confidence interval per (method, metric), in evaluation order.

        NaN values are left out; ``n`` counts the rest. For a metric whose values are means
        (deletion, insertion, token_deletion, aupr) the interval is Student's t:
        ``mean +- t * sd / sqrt(n)``, ``t`` the ``(1 + confidence) / 2`` quantile with ``n - 1``
        degrees of freedom, ``sd`` the sample standard deviation; NaN for ``n < 2``. For a 0/1
        metric (``pointing_game``: :attr:`MetricSpec.proportion`) the mean is a proportion and the
        interval the Wilson score interval (:func:`~vitlens_patch.statistics.wilson_interval`):
        inside [0, 1], not symmetric, and not empty when every image hits or every image misses.

        Returns:
            Columns ``method``, ``metric``, ``mean``, ``ci_low``, ``ci_high``, ``n``,
            ``higher_is_better``, ``interval`` ("student_t" or "wilson"): the input of
            :func:`vitlens_patch.plots.plot_method_comparison`.
        """
        grouped = self.scores.groupby(["method", "metric"], sort=False)["value"]
        table = grouped.agg(mean="mean", sd="std", n="count").reset_index()
        half_width = student_t_half_width(table["sd"].to_numpy(), table["n"].to_numpy(), confidence)
        table["ci_low"] = table["mean"] - half_width
        table["ci_high"] = table["mean"] + half_width
        proportion = np.array([METRICS[metric].proportion for metric in table["metric"]], dtype=bool)
        if proportion.any():
            n = table.loc[proportion, "n"].to_numpy()
            low, high = wilson_interval(table.loc[proportion, "mean"].to_numpy() * n, n, confidence)
            table.loc[proportion, "ci_low"] = low
            table.loc[proportion, "ci_high"] = high
        table["higher_is_better"] = [METRICS[metric].higher_is_better for metric in table["metric"]]
        table["interval"] = np.where(proportion, "wilson", "student_t")
        return table[["method", "metric", "mean", "ci_low", "ci_high", "n", "higher_is_better", "interval"]]

    def summary_table(self, *, confidence: float = 0.95, digits: int = 3) -> pd.DataFrame:
        """The README's wide layout: a row per method, a column per metric (``"deletion ↓"``,
        ``"aupr ↑"``: the arrow points to the better direction), cells as text.

        A Student-t cell reads ``mean ± half-width``, a Wilson cell (a 0/1 metric, whose interval
        is not symmetric) ``mean [low, high]``; a cell without an interval (one image) the mean.
        """
        table = self.table(confidence=confidence)
        cells = {(row.method, row.metric): row for row in table.itertuples()}
        columns = {"method": self.methods}
        for metric in self.metrics:
            arrow = "↑" if METRICS[metric].higher_is_better else "↓"
            columns[f"{metric} {arrow}"] = [
                _format_cell(cells[method, metric], digits) for method in self.methods
            ]
        return pd.DataFrame(columns)

    def interval_note(self, *, confidence: float = 0.95) -> str:
        """One sentence saying what the cells of :meth:`summary_table` mean."""
        table = self.table(confidence=confidence)
        wilson = list(dict.fromkeys(table.loc[table["interval"] == "wilson", "metric"]))
        student = list(dict.fromkeys(table.loc[table["interval"] == "student_t", "metric"]))
        parts = []
        if student:
            parts.append(f"mean ± half-width of the {confidence:.0%} Student-t confidence interval")
        if wilson:
            parts.append(
                f"for {', '.join(wilson)} (0/1 per image) the hit rate [{confidence:.0%} Wilson score interval]"
            )
        n_images = int(table["n"].max())
        text = "; ".join(parts)
        return f"{text[0].upper()}{text[1:]}, over {n_images} images; ↑ higher is better, ↓ lower is better."

    def to_markdown(self, *, confidence: float = 0.95, digits: int = 3) -> str:
        """:meth:`summary_table` as a Markdown table, then :meth:`interval_note`."""
        table = self.summary_table(confidence=confidence, digits=digits)
        lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
        lines += ["| " + " | ".join(row) + " |" for row in table.itertuples(index=False)]
        return "\n".join([*lines, "", self.interval_note(confidence=confidence)])

    def select_maps(
        self, indices: Sequence[int] | slice | Tensor, *, canvas: bool = False
    ) -> dict[str, Float[Tensor, "batch map_h map_w"]]:
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


def _format_cell(row, digits: int) -> str:
    """``mean ± half-width`` (Student t), ``mean [low, high]`` (Wilson) or the mean alone."""
    mean = f"{row.mean:.{digits}f}"
    if np.isnan(row.ci_low) or np.isnan(row.ci_high):
        return mean
    if row.interval == "wilson":
        return f"{mean} [{row.ci_low:.{digits}f}, {row.ci_high:.{digits}f}]"
    return f"{mean} ± {(row.ci_high - row.ci_low) / 2:.{digits}f}"
