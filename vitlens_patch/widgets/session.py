"""What the explorer computes, without any widget: settings, stages, caches and the JSON views.

An :class:`ExplorerSession` holds a model and its images and answers :class:`ExplorerSettings`
(image, corruption, kind, window, score, target, CAAP block range) with results of the library's
own sweeps, cached so that going back to earlier settings costs nothing:

========================  ====================================================================
stage                     call
========================  ====================================================================
``layers``                ``trace_layers(model, clean, corrupted, kind=, window=, score=, target=)``
``grid_estimate``         ``trace_grid(..., method="attribution")``: the first-order estimate
``grid_chunk``            ``trace_grid(..., positions=<some tokens>)``, exact; the chunks
                          together are ``trace_grid(...)`` over every token
``patch``                 ``trace_grid(..., positions=[token])``: the clicked patch, exact
``caap_estimate``         ``caap(model, clean, target=, layers=, score=, method="attribution")``
``caap``                  ``caap(...)``, exact
========================  ====================================================================

The estimates come first (they cost about one forward and backward pass), so every view is drawn
quickly; the exact values replace them as they arrive. :meth:`ExplorerSession.view` turns the
cached results into the JSON the front end draws; no patching happens in JavaScript.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from vitlens_patch.attribution.caap import caap, check_block_range
from vitlens_patch.data.folder import LabelledImages
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.corruptions import corrupt_blur, corrupt_grayscale, corrupt_patches, corrupt_pixel_noise
from vitlens_patch.patching.embedding_noise import embedding_noise
from vitlens_patch.patching.results import TraceResult
from vitlens_patch.patching.sites import KIND_HOOKS, layer_window
from vitlens_patch.patching.tracing import trace_grid, trace_layers

CORRUPTIONS = ("grayscale", "blur", "pixel_noise", "patches", "embedding_noise")
CORRUPTION_LABELS = {
    "grayscale": "grayscale (BT.601 luma)",
    "blur": "blur (sigma 2 px)",
    "pixel_noise": "pixel noise (std 0.1, seed 0)",
    "patches": "patch mask (central patches black)",
    "embedding_noise": "embedding noise (3 sd, seed 0)",
}
KINDS = tuple(KIND_HOOKS)
SCORES = ("prob", "logit", "logprob")
# exact grid rows are computed this many tokens at a time, so a newer request waits one chunk at most
GRID_CHUNK_TOKENS = 13


def central_patches(grid_size: tuple[int, int]) -> Tensor:
    """Bool mask [grid_h, grid_w] of the central patches (the middle half of rows and columns),
    the patch set that the explorer's "patches" corruption masks."""
    grid_h, grid_w = grid_size
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    mask[grid_h // 4 : grid_h - grid_h // 4, grid_w // 4 : grid_w - grid_w // 4] = True
    return mask


def explorer_corruption(model: HookedViT, clean: Tensor, name: str, *, reference: Tensor | None = None):
    """The corrupted run of the explorer's corruption ``name`` for ``clean`` images, as the engine
    takes it (corrupted images, or an :class:`EmbeddingNoise` whose hook corrupts the run).

    ``"grayscale"``: :func:`corrupt_grayscale`; ``"blur"``: :func:`corrupt_blur` (sigma 2);
    ``"pixel_noise"``: :func:`corrupt_pixel_noise` (std 0.1, seed 0); ``"patches"``:
    :func:`corrupt_patches` of :func:`central_patches` with black fill; ``"embedding_noise"``:
    :func:`embedding_noise` at level ``"s3"`` measured on ``reference`` (default ``clean``), seed 0.
    """
    config = model.data_config
    if name == "grayscale":
        return corrupt_grayscale(clean, config)
    if name == "blur":
        return corrupt_blur(clean, config, sigma=2.0)
    if name == "pixel_noise":
        return corrupt_pixel_noise(clean, config, std=0.1, seed=0)
    if name == "patches":
        return corrupt_patches(clean, config, central_patches(model.cfg.grid_size), patch_size=model.cfg.patch_size)
    if name == "embedding_noise":
        return embedding_noise(model, level="s3", reference=clean if reference is None else reference, seed=0)
    raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {name!r}")


@dataclass(frozen=True)
class ExplorerSettings:
    """One question the explorer answers.

    Attributes:
        image: index of the image.
        corruption: one of :data:`CORRUPTIONS` (see :func:`explorer_corruption`).
        kind: sub-layer restored by the layer curve and the patch grid: one of :data:`KINDS`.
        window: layers restored around each centre layer, in [1, n_layers].
        score: one of :data:`SCORES`, for tracing and CAAP alike.
        target: class the score refers to; None for the model's prediction on the clean image.
        caap_layers: CAAP's block range (start, stop); None for CAAP's default (the middle half).
    """

    image: int = 0
    corruption: str = "grayscale"
    kind: str = "attn"
    window: int = 3
    score: str = "prob"
    target: int | None = None
    caap_layers: tuple[int, int] | None = None

    @property
    def trace_key(self) -> tuple:
        return (self.image, self.corruption, self.kind, self.window, self.score, self.target)

    @property
    def caap_key(self) -> tuple:
        return (self.image, self.score, self.target, self.caap_layers)


@dataclass(frozen=True)
class Stage:
    """One cached computation: ``name`` (see the module table) and its cache ``key``."""

    name: str
    key: tuple

    @property
    def cache_key(self) -> tuple:
        return (self.name, *self.key)


@dataclass
class ExplorerResult:
    """What the explorer shows, to continue in code.

    Attributes:
        settings: the :class:`ExplorerSettings` (target resolved to a class index).
        layers: ``trace_layers`` result, effects [1, layer].
        grid: ``trace_grid`` result, effects [1, layer, position] (position = every token, class
            token first); exact once computed, else the attribution estimate (``grid.exact``), or
            None before either exists.
        caap_map: CAAP map [grid_h, grid_w] (exact once computed, else the estimate), or None.
        caap_exact: whether ``caap_map`` is the exact one.
        patch: the selected patch index (row-major over the grid), or None.
        patch_effects: [layer] effect of restoring the selected patch's token (exact when
            ``patch_exact``), or None.
        patch_exact: whether ``patch_effects`` is exact.
        caap_value: CAAP value of the selected patch, or None.
        pending: stages not computed yet.
    """

    settings: ExplorerSettings
    layers: TraceResult | None
    grid: TraceResult | None
    caap_map: Float[Tensor, "grid_h grid_w"] | None
    caap_exact: bool
    patch: int | None
    patch_effects: Float[Tensor, " layer"] | None
    patch_exact: bool
    caap_value: float | None
    pending: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every view holds exact values."""
        return not self.pending


def _png_data_uri(pixels: Float[Tensor, "channel height width"], scale: int = 1) -> str:
    """[0, 1] pixels -> a ``data:image/png`` URI, enlarged ``scale`` times (nearest neighbour)."""
    array = rearrange(pixels.clamp(0, 1).cpu().float() * 255, "channel height width -> height width channel")
    image = Image.fromarray(array.round().byte().numpy().squeeze(-1) if array.shape[-1] == 1 else array.round().byte().numpy())
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _floats(values: Tensor) -> list:
    """A tensor as nested lists of floats, NaN as None (JSON has no NaN)."""
    array = values.detach().cpu().double().numpy()
    return np.where(np.isnan(array), None, array).tolist()


def _merge_grid_chunks(chunks: Sequence[TraceResult]) -> TraceResult:
    """``trace_grid`` results over consecutive token chunks -> one result over all their tokens."""
    positions = [token for chunk in chunks for token in chunk.coord("position")]
    first = chunks[0]
    return replace(
        first,
        effects=torch.cat([chunk.effects for chunk in chunks], dim=2),
        exact=torch.cat([chunk.exact for chunk in chunks], dim=2),
        coords={**first.coords, "position": positions},
        settings={**first.settings, "positions": positions},
    )


class ExplorerSession:
    """A model, its images and every result computed for them so far.

    Args:
        model: the HookedViT.
        images: normalised model input [batch, channel, height, width] (the model's input size),
            uint8 images [batch, channel, height, width] (resized by ``model.preprocess``), or
            :class:`~vitlens_patch.data.folder.LabelledImages` (labels and class names with them).
        labels: true class per image (optional), shown beside the prediction.
        class_names: names of the classes; default ``model.class_names``.

    Raises:
        ValueError: for images that are not a batch of the model's input (naming the shapes).
    """

    def __init__(
        self, model: HookedViT, images, labels: Sequence[int] | Tensor | None = None,
        class_names: Sequence[str] | None = None,
    ):
        if not isinstance(model, HookedViT):
            raise ValueError(f"model must be a HookedViT, got {type(model).__name__}")
        self.model = model
        if isinstance(images, LabelledImages):
            labels = images.labels if labels is None else labels
            class_names = class_names or getattr(model, "class_names", None) or images.class_names
            images = images.images
        self.images = check_explorer_images(model, images)
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
            if len(labels) != len(self.images):
                raise ValueError(f"labels must hold one class per image ({len(self.images)}), got {len(labels)}")
        self.labels = labels
        n_classes = model.cfg.n_classes
        names = class_names or getattr(model, "class_names", None) or [str(i) for i in range(n_classes)]
        self.class_names = tuple(str(name) for name in names)
        if n_classes == 0:
            raise ValueError("model must have a classifier (n_classes > 0): the explorer scores class logits")
        with torch.no_grad():
            logits = torch.cat([model(batch) for batch in self.images.split(32)])
        self.predictions = logits.argmax(-1).cpu()
        self.pixels = model.data_config.denormalize(self.images).clamp(0, 1).cpu()
        self._cache: dict[tuple, object] = {}
        self._lock = threading.Lock()
        # one computation on the model at a time: the engine's hooks are live on the shared model
        self._model_lock = threading.RLock()

    # ----------------------------------------------------------------------------- settings
    @property
    def n_images(self) -> int:
        return len(self.images)

    def check(self, settings: ExplorerSettings) -> ExplorerSettings:
        """``settings`` if every field is valid for this model and these images, else ValueError
        naming the field, the allowed values and the value given."""
        cfg = self.model.cfg
        if not isinstance(settings.image, int) or not 0 <= settings.image < self.n_images:
            raise ValueError(f"image must be an index in [0, {self.n_images - 1}], got {settings.image!r}")
        if settings.corruption not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {settings.corruption!r}")
        if settings.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {settings.kind!r}")
        layer_window(0, settings.window, cfg.n_layers)  # ValueError naming the allowed windows
        if settings.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {settings.score!r}")
        if settings.target is not None and (
            isinstance(settings.target, bool) or not isinstance(settings.target, int)
            or not 0 <= settings.target < cfg.n_classes
        ):
            raise ValueError(
                f"target must be None (the prediction) or a class index in [0, {cfg.n_classes - 1}], "
                f"got {settings.target!r}"
            )
        check_block_range(settings.caap_layers, cfg.n_layers)
        return settings

    def check_patch(self, patch: int | None) -> int | None:
        if patch is None:
            return None
        n_patches = self.model.cfg.n_patches
        if isinstance(patch, bool) or not isinstance(patch, int) or not 0 <= patch < n_patches:
            raise ValueError(f"patch must be None or a patch index in [0, {n_patches - 1}], got {patch!r}")
        return patch

    def target(self, settings: ExplorerSettings) -> int:
        """The class scored: ``settings.target``, else the prediction on the clean image."""
        return int(self.predictions[settings.image]) if settings.target is None else settings.target

    def caap_layers(self, settings: ExplorerSettings) -> tuple[int, int]:
        return check_block_range(settings.caap_layers, self.model.cfg.n_layers)

    # ------------------------------------------------------------------------------- stages
    def _chunks(self) -> list[tuple[int, ...]]:
        tokens = list(range(self.model.cfg.n_pos))
        return [tuple(tokens[i : i + GRID_CHUNK_TOKENS]) for i in range(0, len(tokens), GRID_CHUNK_TOKENS)]

    def stages(self, settings: ExplorerSettings, patch: int | None = None) -> list[Stage]:
        """Every stage the views of ``settings`` (and the selected ``patch``) need, quickest first."""
        trace, caap_key = settings.trace_key, settings.caap_key
        stages = [Stage("layers", trace), Stage("grid_estimate", trace), Stage("caap_estimate", caap_key)]
        if patch is not None:
            stages.append(Stage("patch", (*trace, patch)))
        stages.append(Stage("caap", caap_key))
        stages += [Stage("grid_chunk", (*trace, chunk)) for chunk in self._chunks()]
        return stages

    def missing(self, settings: ExplorerSettings, patch: int | None = None) -> list[Stage]:
        """The stages of :meth:`stages` not cached yet; a patch inside a computed exact grid needs none."""
        with self._lock:
            missing = [stage for stage in self.stages(settings, patch) if stage.cache_key not in self._cache]
        grid_exact = self._grid_exact(settings) is not None
        caap_exact = self.is_cached(Stage("caap", settings.caap_key))
        # exact results make their estimates (and the single patch trace) unnecessary
        return [
            stage for stage in missing
            if not (grid_exact and stage.name in ("patch", "grid_estimate"))
            and not (caap_exact and stage.name == "caap_estimate")
        ]

    def is_cached(self, stage: Stage) -> bool:
        with self._lock:
            return stage.cache_key in self._cache

    def _get(self, name: str, *key):
        with self._lock:
            return self._cache.get((name, *key))

    def _settings_of(self, key: tuple) -> ExplorerSettings:
        image, corruption, kind, window, score, target = key[:6]
        return ExplorerSettings(image, corruption, kind, window, score, target)

    def _trace_inputs(self, settings: ExplorerSettings) -> tuple[Tensor, object, dict]:
        clean = self.images[settings.image : settings.image + 1]
        corrupted = explorer_corruption(self.model, clean, settings.corruption, reference=self.images)
        options = dict(kind=settings.kind, window=settings.window, score=settings.score,
                       target=self.target(settings), progress=False)
        return clean, corrupted, options

    def compute(self, stage: Stage) -> object:
        """Run ``stage`` (unless cached) and cache its result; returns the result."""
        with self._model_lock:
            return self._compute(stage)

    def _compute(self, stage: Stage) -> object:
        cached = self._get(*stage.cache_key)
        if cached is not None:
            return cached
        if stage.name in ("caap", "caap_estimate"):
            image, score, target, layers = stage.key
            settings = ExplorerSettings(image=image, score=score, target=target, caap_layers=layers)
            result = caap(
                self.model, self.images[image : image + 1], target=self.target(settings),
                layers=self.caap_layers(settings), score=score, progress=False,
                method="exact" if stage.name == "caap" else "attribution",
            )[0].detach().cpu()
        else:
            settings = self._settings_of(stage.key)
            clean, corrupted, options = self._trace_inputs(settings)
            if stage.name == "layers":
                result = trace_layers(self.model, clean, corrupted, **options)
            elif stage.name == "grid_estimate":
                result = trace_grid(self.model, clean, corrupted, method="attribution", **options)
            elif stage.name == "grid_chunk":
                result = trace_grid(self.model, clean, corrupted, positions=list(stage.key[6]), **options)
            elif stage.name == "patch":
                token = self.model.cfg.n_prefix_tokens + stage.key[6]
                result = trace_grid(self.model, clean, corrupted, positions=[token], **options)
            else:
                raise ValueError(f"stage must be one of the explorer's stages, got {stage.name!r}")
        with self._lock:
            self._cache[stage.cache_key] = result
        return result

    def compute_all(self, settings: ExplorerSettings, patch: int | None = None, *, estimates: bool = True) -> None:
        """Every missing stage of ``settings``, in the calling thread (``estimates=False``: only the
        exact ones, which is all a complete view needs)."""
        for stage in self.missing(self.check(settings), self.check_patch(patch)):
            if estimates or not stage.name.endswith("_estimate"):
                self.compute(stage)

    # ------------------------------------------------------------------------------ results
    def _grid_exact(self, settings: ExplorerSettings) -> TraceResult | None:
        chunks = [self._get("grid_chunk", *settings.trace_key, chunk) for chunk in self._chunks()]
        if any(chunk is None for chunk in chunks):
            return None
        return _merge_grid_chunks(chunks)

    def result(self, settings: ExplorerSettings, patch: int | None = None) -> ExplorerResult:
        """The best results cached for ``settings``: exact where computed, else the estimates."""
        settings, patch = self.check(settings), self.check_patch(patch)
        trace = settings.trace_key
        grid = self._grid_exact(settings)
        grid_exact = grid is not None
        if grid is None:
            grid = self._get("grid_estimate", *trace)
        caap_map = self._get("caap", *settings.caap_key)
        caap_exact = caap_map is not None
        if caap_map is None:
            caap_map = self._get("caap_estimate", *settings.caap_key)
        patch_effects, patch_exact, caap_value = None, False, None
        if patch is not None:
            token = self.model.cfg.n_prefix_tokens + patch
            single = self._get("patch", *trace, patch)
            if grid_exact:
                patch_effects, patch_exact = grid.effects[0, :, token], True
            elif single is not None:
                patch_effects, patch_exact = single.effects[0, :, 0], True
            elif grid is not None:
                patch_effects = grid.effects[0, :, token]
            if caap_map is not None:
                caap_value = float(caap_map.reshape(-1)[patch])
        return ExplorerResult(
            settings=replace(settings, target=self.target(settings), caap_layers=self.caap_layers(settings)),
            layers=self._get("layers", *trace), grid=grid, caap_map=caap_map, caap_exact=caap_exact,
            patch=patch, patch_effects=patch_effects, patch_exact=patch_exact, caap_value=caap_value,
            pending=[stage.name for stage in self.missing(settings, patch)],
        )

    # --------------------------------------------------------------------------------- JSON
    def options(self) -> dict:
        """What the controls offer: corruptions, kinds, scores, classes, layers, grid."""
        cfg = self.model.cfg
        return {
            "corruptions": [[name, CORRUPTION_LABELS[name]] for name in CORRUPTIONS],
            "kinds": list(KINDS),
            "scores": list(SCORES),
            "class_names": list(self.class_names),
            "n_layers": cfg.n_layers,
            "grid_size": list(cfg.grid_size),
            "n_prefix_tokens": cfg.n_prefix_tokens,
            "caap_default": list(check_block_range(None, cfg.n_layers)),
        }

    def thumbnails(self) -> list[dict]:
        """One entry per image: a PNG data URI, the true and the predicted class."""
        names = self.class_names
        return [
            {
                "src": _png_data_uri(self.pixels[i], scale=max(1, 64 // self.pixels.shape[-1])),
                "true": None if self.labels is None else names[int(self.labels[i])],
                "pred": names[int(self.predictions[i])],
            }
            for i in range(self.n_images)
        ]

    def view(self, settings: ExplorerSettings, patch: int | None = None) -> dict:
        """The JSON the front end draws for ``settings``: every number comes from :meth:`result`."""
        result = self.result(settings, patch)
        settings = result.settings
        image = settings.image
        clean = self.images[image : image + 1]
        scale = max(1, 256 // self.pixels.shape[-1])
        if settings.corruption == "embedding_noise":
            corrupted_pixels = None  # the corruption is in the patch embeddings, not the pixels
        else:
            corrupted = explorer_corruption(self.model, clean, settings.corruption)
            corrupted_pixels = _png_data_uri(self.model.data_config.denormalize(corrupted)[0], scale)
        view: dict = {
            "settings": {**asdict(settings), "caap_layers": list(settings.caap_layers)},
            "target_name": self.class_names[settings.target],
            "clean_pixels": _png_data_uri(self.pixels[image], scale),
            "pixel_size": [self.pixels.shape[-2] * scale, self.pixels.shape[-1] * scale],
            "corrupted_pixels": corrupted_pixels,
            "pending": result.pending,
            "layers": None, "grid": None, "caap": None, "patch": None,
        }
        if result.layers is not None:
            view["layers"] = {
                "effects": _floats(result.layers.effects[0]),
                "clean_score": float(result.layers.clean_score[0]),
                "corrupted_score": float(result.layers.corrupted_score[0]),
            }
        if result.grid is not None:
            n_prefix = self.model.cfg.n_prefix_tokens
            view["grid"] = {
                "effects": _floats(result.grid.effects[0, :, n_prefix:]),  # [layer, patch]
                "prefix": _floats(result.grid.effects[0, :, :n_prefix]),  # [layer, prefix token]
                "exact": bool(result.grid.exact.all()),
            }
        if result.caap_map is not None:
            view["caap"] = {"map": _floats(result.caap_map), "exact": result.caap_exact}
        if result.patch is not None:
            view["patch"] = {
                "index": result.patch,
                "effects": None if result.patch_effects is None else _floats(result.patch_effects),
                "exact": result.patch_exact,
                "caap": result.caap_value,
                "caap_exact": result.caap_exact,
            }
        return view


def check_explorer_images(model: HookedViT, images) -> Float[Tensor, "batch channel height width"]:
    """Images as normalised model input on the model's device: uint8 images are preprocessed
    (resized); float images must already be normalised model input of the model's input size."""
    cfg = model.cfg
    expected = (cfg.in_chans, *cfg.img_size)
    if not isinstance(images, Tensor):
        raise ValueError(
            f"images must be a tensor [image, {expected[0]}, {expected[1]}, {expected[2]}] of normalised model "
            f"input, uint8 images or LabelledImages, got {type(images).__name__}"
        )
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[1] != cfg.in_chans:
            raise ValueError(
                f"uint8 images must have shape [image, {cfg.in_chans}, height, width], got {tuple(images.shape)}"
            )
        images = model.preprocess(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or not images.is_floating_point():
        raise ValueError(
            f"images must be normalised model input of shape [image, {expected[0]}, {expected[1]}, {expected[2]}] "
            f"(this model's input size), got {images.dtype} {tuple(images.shape)}; pass uint8 images or "
            "LabelledImages to have them resized by model.preprocess"
        )
    if len(images) == 0:
        raise ValueError("images must hold at least one image, got 0")
    return images.to(model.device, model.dtype)

