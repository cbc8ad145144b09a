"""EvaluationResult: per-image scores and maps of an evaluation, its summary table and its files."""

from __future__ import annotations

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
from vitlens_patch.statistics import student_t_half_width

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
        grouped = self.scores.groupby(["method", "metric"], sort=False)["value"]
        table = grouped.agg(mean="mean", sd="std", n="count").reset_index()
        half_width = student_t_half_width(table["sd"].to_numpy(), table["n"].to_numpy(), confidence)
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
