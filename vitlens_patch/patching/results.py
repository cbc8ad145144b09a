"""TraceResult: causal-tracing effects per image with their axes, baselines and settings.

Modelled on TransformerLens's ``PatchingResult``: the values, the axis names and the baselines
travel together, with ``normalized()``, ``mean()`` (with a confidence interval) and
``to_dataframe()`` on top, and a lossless ``save``/``load`` (safetensors tensors + JSON metadata in
one file).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from vitlens_patch.statistics import student_t_half_width

_METADATA_KEY = "vitlens_patch.TraceResult"
_FORMAT_VERSION = 1


def _labels(labels: list) -> np.ndarray:
    # element by element, so list-valued labels (e.g. layer windows) stay single cells
    array = np.empty(len(labels), dtype=object)
    for i, label in enumerate(labels):
        array[i] = tuple(label) if isinstance(label, list) else label
    return array


def short_settings(settings: dict, limit: int = 40) -> dict[str, str]:
    """Settings for a repr: each value as short text (long lists say their length)."""
    shown = {}
    for key, value in settings.items():
        if value is None:
            continue
        text = repr(value)
        if isinstance(value, (list, tuple)) and len(text) > limit:
            text = f"[{len(value)} values]"
        shown[key] = text if len(text) <= limit else text[: limit - 3] + "..."
    return shown


def read_saved_metadata(text: str | bytes | None, path: str | Path, written_by: str, version: int) -> dict:
    """The JSON metadata a result's ``save`` stored with it, checked for presence and version.

    ``written_by`` completes the error "path must be <written_by>"; ``version`` is the format
    version this code reads.
    """
    if text is None:
        raise ValueError(f"path must be {written_by}, got {str(path)!r}")
    metadata = json.loads(text)
    if metadata.get("version") != version:
        raise ValueError(
            f"path holds format version {metadata.get('version')} ({str(path)!r}); this version "
            f"of vitlens_patch reads version {version}"
        )
    return metadata


@dataclass(frozen=True)
class TraceMean:
    """Mean over images of a :class:`TraceResult`, with a confidence interval per cell.

    Attributes:
        mean, lower, upper: [*axes] mean and interval bounds (NaN where undefined).
        count: [*axes] number of images that entered each cell (non-NaN effects).
        dims: names of the axes (the result's dims without ``"image"``).
        coords: labels per axis.
        confidence: the interval's confidence level.
    """

    mean: Tensor
    lower: Tensor
    upper: Tensor
    count: Tensor
    dims: tuple[str, ...]
    coords: dict[str, list]
    confidence: float


@dataclass
class TraceResult:
    """Indirect effects of restoring clean activations into a corrupted run, per image.

    Attributes:
        effects: [image, *axes] indirect effects ``score(restored) - score(corrupted)``
            (after :meth:`normalized`: divided by ``clean_score - corrupted_score``).
        dims: axis names, first ``"image"``: e.g. ``("image", "layer")``,
            ``("image", "layer", "position")``, ``("image", "layer", "head")``.
        clean_score, corrupted_score: [image] score of the clean and of the corrupted run.
        settings: JSON-able run settings (kind, window, positions, score, target, hook names...);
            ``settings["normalized"]`` is True once effects are normalised.
        coords: labels per axis, e.g. ``{"layer": [0, 1], "position": [0, 5, 6]}`` (token
            indices for ``"position"``); an axis without labels counts 0, 1, ...
        grid_size: (grid_h, grid_w) patch grid, to draw position effects over the image.
        n_prefix_tokens: tokens before the patches (class token, registers); token ``t`` is patch
            ``t - n_prefix_tokens``.
        exact: [image, *axes] bool, True where the effect is the exact engine's and False where it
            is an attribution-patching estimate (``method="attribution"``); default all True.
    """

    effects: Float[Tensor, "batch *axes"]
    dims: tuple[str, ...]
    clean_score: Float[Tensor, " batch"]
    corrupted_score: Float[Tensor, " batch"]
    settings: dict = field(default_factory=dict)
    coords: dict[str, list] = field(default_factory=dict)
    grid_size: tuple[int, int] | None = None
    n_prefix_tokens: int = 1
    exact: Bool[Tensor, "batch *axes"] | None = None

    def __post_init__(self) -> None:
        self.dims = tuple(self.dims)
        if self.exact is None:
            self.exact = torch.ones(self.effects.shape, dtype=torch.bool)
        if self.exact.dtype != torch.bool or self.exact.shape != self.effects.shape:
            raise ValueError(
                f"exact must be a bool tensor of the effects' shape {tuple(self.effects.shape)}, got "
                f"{self.exact.dtype} {tuple(self.exact.shape)}"
            )
        if len(self.dims) != self.effects.ndim or not self.dims or self.dims[0] != "image":
            raise ValueError(
                f"dims must name every axis of effects {tuple(self.effects.shape)}, starting with "
                f"'image', got {self.dims}"
            )
        if len(set(self.dims)) != len(self.dims):
            raise ValueError(f"dims must be distinct, got {self.dims}")
        for name in ("clean_score", "corrupted_score"):
            score = getattr(self, name)
            if score.shape != (self.n_images,):
                raise ValueError(
                    f"{name} must have shape [{self.n_images}] (one score per image), "
                    f"got {tuple(score.shape)}"
                )
        self.coords = {dim: list(labels) for dim, labels in self.coords.items()}
        for dim, labels in self.coords.items():
            if dim not in self.dims:
                raise ValueError(f"coords keys must be among dims {self.dims}, got {dim!r}")
            size = self.effects.shape[self.dims.index(dim)]
            if len(labels) != size:
                raise ValueError(f"coords[{dim!r}] must have {size} labels, got {len(labels)}")
        if self.grid_size is not None:
            self.grid_size = tuple(int(n) for n in self.grid_size)

    @property
    def n_images(self) -> int:
        return self.effects.shape[0]

    def _summary(self) -> tuple[str, str, str]:
        """(shape, settings, summary) lines for the reprs."""
        shape = " x ".join(
            f"{size} {dim}{'' if size == 1 else 's'}" for dim, size in zip(self.dims, self.effects.shape)
        )
        settings = ", ".join(f"{key}={value}" for key, value in short_settings(self.settings).items())
        effects = self.effects.detach().cpu().double()
        valid = ~effects.isnan()
        if not valid.any():
            return shape, settings, "no effects (all NaN)"
        mean = effects.nan_to_num().sum(0) / valid.sum(0)
        flat = mean.nan_to_num(nan=-torch.inf).argmax().item()
        cell = np.unravel_index(flat, tuple(mean.shape))
        where = ", ".join(f"{dim} {self.coord(dim)[i]}" for dim, i in zip(self.dims[1:], cell))
        scores = (
            f"clean score {self.clean_score.double().mean().item():.4g}, corrupted "
            f"{self.corrupted_score.double().mean().item():.4g} (means)"
        )
        exact = "" if bool(self.exact.all()) else f"; {int((~self.exact).sum())} estimated effects"
        summary = (
            f"mean effect over images: max {mean.view(-1)[flat].item():.4g} at {where}, min "
            f"{mean.nan_to_num(nan=torch.inf).min().item():.4g}; {scores}{exact}"
        )
        return shape, settings, summary

    def __repr__(self) -> str:
        shape, settings, summary = self._summary()
        return f"TraceResult({shape}; {settings})\n  {summary}"

    def _repr_html_(self) -> str:
        shape, settings, summary = self._summary()
        parts = [f"<b>TraceResult</b>: {html.escape(shape)}<br>{html.escape(settings)}<br>{html.escape(summary)}"]
        if self.effects.ndim == 2 and self.effects.shape[1] <= 64:
            # one axis: the mean and its interval per label, as a short table
            summary_mean = self.mean()
            dim = self.dims[1]
            table = pd.DataFrame({
                dim: _labels(self.coord(dim)),
                "mean": summary_mean.mean.double().numpy(),
                "lower": summary_mean.lower.double().numpy(),
                "upper": summary_mean.upper.double().numpy(),
            }).set_index(dim).T
            parts.append(table.to_html(float_format="{:.4g}".format, border=0))
        return "\n".join(parts)

    @property
    def is_normalized(self) -> bool:
        return bool(self.settings.get("normalized", False))

    def coord(self, dim: str) -> list:
        """Labels of axis ``dim`` (``coords[dim]``, or 0, 1, ... when not given)."""
        if dim not in self.dims:
            raise ValueError(f"dim must be one of {self.dims}, got {dim!r}")
        return self.coords.get(dim, list(range(self.effects.shape[self.dims.index(dim)])))

    def __getitem__(self, index: int | slice | list[int] | Tensor) -> "TraceResult":
        """Images selected by ``index`` (int, slice, index list or bool mask); the image axis stays."""
        index = torch.arange(self.n_images)[index].reshape(-1)  # an int gives [1], keeping the axis
        coords = dict(self.coords)
        if "image" in coords:
            coords["image"] = [coords["image"][i] for i in index.tolist()]
        return replace(
            self,
            effects=self.effects[index],
            clean_score=self.clean_score[index],
            corrupted_score=self.corrupted_score[index],
            coords=coords,
            exact=self.exact[index],
        )

    def normalized(self, *, eps: float = 1e-6) -> "TraceResult":
        """Effects as a fraction of each image's gap: ``effects / (clean_score - corrupted_score)``.

        0 means the restoration did nothing, 1 that it recovered the clean score. An image whose
        gap ``|clean_score - corrupted_score|`` is below ``eps`` has no scale: its effects become
        NaN, and :meth:`mean` and the plots leave it out (nan-aware).
        """
        if self.is_normalized:
            raise ValueError("this result is already normalized (settings['normalized'] is True)")
        gap = (self.clean_score - self.corrupted_score).to(self.effects.dtype)
        gap = torch.where(gap.abs() < eps, torch.nan, gap)
        # broadcast the per-image gap over the other axes
        gap = gap.reshape(-1, *([1] * (self.effects.ndim - 1)))
        return replace(self, effects=self.effects / gap, settings={**self.settings, "normalized": True})

    def mean(self, *, confidence: float = 0.95) -> TraceMean:
        """Mean over images with a Student-t confidence interval per cell.

        NaN effects (images without a scale after :meth:`normalized`) are left out, so each cell
        averages its ``count`` remaining images. The interval is ``mean +- t * sd / sqrt(count)``
        with ``t`` the ``(1 + confidence) / 2`` quantile of Student's t with ``count - 1`` degrees
        of freedom and ``sd`` the sample standard deviation; it is NaN where ``count < 2`` (one
        image gives no spread) and the mean is NaN where ``count == 0``.
        """
        effects = self.effects.detach().cpu().double()
        valid = ~effects.isnan()
        count = valid.sum(dim=0)
        mean = effects.nansum(dim=0) / count  # 0 / 0 -> NaN for empty cells
        squares = torch.where(valid, (effects - mean) ** 2, 0.0).sum(dim=0)
        sd = (squares / (count - 1)).sqrt()
        half_width = torch.from_numpy(student_t_half_width(sd.numpy(), count.numpy(), confidence))
        dtype = self.effects.dtype
        return TraceMean(
            mean=mean.to(dtype),
            lower=(mean - half_width).to(dtype),
            upper=(mean + half_width).to(dtype),
            count=count,
            dims=self.dims[1:],
            coords={dim: self.coord(dim) for dim in self.dims[1:]},
            confidence=confidence,
        )

    def to_dataframe(self) -> pd.DataFrame:
        """Long format: one row per effect, a column per dim (its labels) plus ``effect``,
        ``clean_score`` and ``corrupted_score`` (of that row's image)."""
        shape = tuple(self.effects.shape)
        cells = np.indices(shape).reshape(len(shape), -1)  # [dim, row] index of each effect
        columns = {dim: _labels(self.coord(dim))[cells[axis]] for axis, dim in enumerate(self.dims)}
        columns["effect"] = self.effects.detach().cpu().double().numpy().reshape(-1)
        columns["clean_score"] = self.clean_score.detach().cpu().double().numpy()[cells[0]]
        columns["corrupted_score"] = self.corrupted_score.detach().cpu().double().numpy()[cells[0]]
        return pd.DataFrame(columns).infer_objects()

    def save(self, path: str | Path) -> None:
        """Write one safetensors file: the tensors, and the rest as JSON in its metadata.

        ``settings`` and ``coords`` must be JSON-able; tuples come back as lists.
        """
        metadata = {
            "version": _FORMAT_VERSION,
            "dims": list(self.dims),
            "settings": self.settings,
            "coords": self.coords,
            "grid_size": None if self.grid_size is None else list(self.grid_size),
            "n_prefix_tokens": self.n_prefix_tokens,
        }
        try:
            text = json.dumps(metadata)
        except TypeError as error:
            message = f"settings and coords must be JSON-serialisable to save: {error}"
            raise ValueError(message) from error
        tensors = {
            name: getattr(self, name).detach().cpu().contiguous()
            for name in ("effects", "clean_score", "corrupted_score", "exact")
        }
        save_file(tensors, str(path), metadata={_METADATA_KEY: text})

    @classmethod
    def load(cls, path: str | Path) -> "TraceResult":
        """Read a file written by :meth:`save`."""
        with safe_open(str(path), framework="pt") as file:
            text = (file.metadata() or {}).get(_METADATA_KEY)
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        metadata = read_saved_metadata(text, path, "a file written by TraceResult.save", _FORMAT_VERSION)
        return cls(
            effects=tensors["effects"],
            dims=tuple(metadata["dims"]),
            clean_score=tensors["clean_score"],
            corrupted_score=tensors["corrupted_score"],
            settings=metadata["settings"],
            coords=metadata["coords"],
            grid_size=None if metadata["grid_size"] is None else tuple(metadata["grid_size"]),
            n_prefix_tokens=metadata["n_prefix_tokens"],
            exact=tensors.get("exact"),
        )
