"""The ``Attributor`` interface shared by CAAP and every baseline, and the helpers they share.

As in Captum's ``Attribution``: the constructor binds what is explained (a ``HookedViT``) and the
method's options; ``attribute(images, target)`` binds the data and returns one relevance map per
image over the patch grid, [batch, grid_h, grid_w] (or [batch, height, width] when upsampled).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from vitlens_patch.checks import Target, check_positive_int, check_target
from vitlens_patch.images import Fill
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.corruptions import corrupt_patches
from vitlens_patch.patching.scores import needs_clean_output, resolve_score

UPSAMPLE_MODES = ("bilinear", "bicubic")


class Attributor:
    """Base class of attribution methods over a ViT's patch grid.

    Args:
        model: the ``HookedViT`` to explain.
        score: what is attributed for the target class, any ``resolve_score`` spec ("logit",
            "prob", "logprob", ("logit_diff", other_class) or a callable); ignored by methods whose
            ``uses_target`` is False.
        upsample: False for maps over the patch grid [batch, grid_h, grid_w]; "bilinear" or
            "bicubic" to interpolate them to the image size [batch, height, width].
        batch_size: images (or occluded / interpolated copies) per model call.
        progress: show a tqdm progress bar when the work takes more than one model call.

    Subclasses implement ``_attribute(images, target)``: ``images`` are checked model inputs
    [batch, channel, height, width]; ``target`` is None (explain the predicted class, see
    ``_score``) or a LongTensor [batch]; the result is [batch, grid_h, grid_w]. A method that
    explains each chunk of ``batch_size`` images on its own implements
    ``_attribute_patches(images, target) -> [batch, n_patches]`` instead. Capabilities
    (``requires_gradients``, ``uses_target``) are class attributes a subclass overrides. Register
    a subclass with ``vitlens_patch.attribution.register_attributor(name, cls)`` to make it available by name.
    """

    def __init__(
        self,
        model: HookedViT,
        *,
        score="logit",
        upsample: Literal[False, "bilinear", "bicubic"] = False,
        batch_size: int = 32,
        progress: bool = True,
    ):
        if not isinstance(model, HookedViT):
            raise ValueError(f"model must be a HookedViT, got {type(model).__name__}")
        if upsample not in (False, None, *UPSAMPLE_MODES):
            raise ValueError(f"upsample must be False or one of {UPSAMPLE_MODES}, got {upsample!r}")
        check_positive_int(batch_size, "batch_size")
        other_class = score[1] if isinstance(score, tuple) and len(score) == 2 else None
        if isinstance(other_class, Tensor) and other_class.ndim > 0:
            # Methods re-batch and repeat images, which a per-image class tensor would not follow.
            raise ValueError(
                f"score ('logit_diff', other_class) needs an int other_class here, got a tensor of "
                f"shape {tuple(other_class.shape)}"
            )
        self.model = model
        self.score = score
        self.score_fn = resolve_score(score)
        if needs_clean_output(self.score_fn) or not model.cfg.n_classes:
            raise ValueError(
                f"attribution methods explain a class score (got score={score!r}, model n_classes="
                f"{model.cfg.n_classes}); score='cosine' works with run_restore and trace_*; for a "
                f"backbone without a classifier attach one with model.with_head(head)"
            )
        self.upsample = upsample or False
        self.batch_size = batch_size
        self.progress = progress

    # ------------------------------------------------------------------ capabilities
    #: Whether the method backpropagates through the model (slower, needs autograd).
    requires_gradients: bool = False
    #: Whether the map depends on the target class (False: class-agnostic).
    uses_target: bool = True

    # ------------------------------------------------------------------------ public
    def attribute(
        self, images: Float[Tensor, "batch channel height width"], target: Target = None
    ) -> Float[Tensor, "batch map_h map_w"]:
        """Relevance of each patch of each image for the target class.

        Args:
            images: normalised model inputs [batch, channel, height, width] (see ``model.preprocess``).
            target: class to explain: None (each image's predicted class), an int for all images,
                or a LongTensor [batch].

        Returns:
            maps [batch, grid_h, grid_w]; [batch, height, width] when ``upsample`` is set. Larger
            means more relevant; signed methods (occlusion, integrated gradients) may be negative.
        """
        images = self.model.check_images(images)
        target = check_target(target, len(images), self.model.cfg.n_classes, self.model.device)
        maps = self._attribute(images, target)
        if self.upsample:
            maps = upsample_maps(maps, self.model.cfg.img_size, self.upsample)
        return maps.detach()

    def _attribute(
        self, images: Float[Tensor, "batch channel height width"], target: Int[Tensor, " batch"] | None
    ) -> Float[Tensor, "batch grid_h grid_w"]:
        """By default ``_attribute_patches`` on chunks of ``batch_size`` images, as grid maps."""
        return self._to_grid(torch.cat([
            self._attribute_patches(images[batch], None if target is None else target[batch])
            for batch in self._batches(len(images))
        ]))

    def _attribute_patches(
        self, images: Float[Tensor, "batch channel height width"], target: Int[Tensor, " batch"] | None
    ) -> Float[Tensor, "batch n_patches"]:
        raise NotImplementedError(f"{type(self).__name__} must implement _attribute or _attribute_patches")

    # ------------------------------------------------------------ helpers for methods
    def _batches(self, n_items: int, desc: str | None = None) -> Iterator[slice]:
        """Slices of ``batch_size`` items covering ``range(n_items)``, with a progress bar."""
        starts = range(0, n_items, self.batch_size)
        disable = not self.progress or len(starts) <= 1
        for start in tqdm(starts, desc=desc or type(self).__name__, disable=disable, leave=False):
            yield slice(start, min(start + self.batch_size, n_items))

    def _score_gradients(
        self,
        images: Float[Tensor, "batch channel height width"],
        target: Int[Tensor, " batch"] | None,
        hook_names: list[str],
    ) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        """One forward and backward pass: the activations at ``hook_names`` (in call order, detached)
        and the gradient of the summed ``score`` with respect to each."""
        stored: list[Tensor] = []
        hooks = [(name, lambda activation, hook: stored.append(activation)) for name in hook_names]
        with torch.enable_grad(), self.model.hooks(fwd_hooks=hooks):
            # Inputs that require grad make the activations differentiable even with frozen weights.
            inputs = images.detach().requires_grad_(True)
            score = self._score(self.model(inputs), target)
            grads = torch.autograd.grad(score.sum(), stored)
        return [activation.detach() for activation in stored], grads

    def _score(
        self, logits: Float[Tensor, "batch n_classes"], target: Int[Tensor, " batch"] | None
    ) -> Float[Tensor, " batch"]:
        """The score of ``target``; a None target means each row's predicted class."""
        if target is None:
            target = logits.argmax(dim=-1)
        return self.score_fn(logits, target)

    def _resolve_target(
        self, images: Float[Tensor, "batch channel height width"], target: Int[Tensor, " batch"] | None
    ) -> Int[Tensor, " batch"]:
        """``target``, or the predicted classes (one forward pass) when it is None."""
        if target is not None:
            return target
        with torch.no_grad():
            return self.model(images).argmax(dim=-1)

    def _to_grid(self, values: Float[Tensor, "batch n_patches"]) -> Float[Tensor, "batch grid_h grid_w"]:
        return patches_to_grid(values, self.model.cfg.grid_size)


# ---------------------------------------------------------------------- shared functions
def patches_to_grid(
    values: Float[Tensor, "batch n_patches"], grid_size: tuple[int, int]
) -> Float[Tensor, "batch grid_h grid_w"]:
    """Per-patch values in token order (row-major) -> maps over the patch grid."""
    return rearrange(values, "batch (grid_h grid_w) -> batch grid_h grid_w", grid_h=grid_size[0])


def upsample_maps(
    maps: Float[Tensor, "batch grid_h grid_w"],
    size: tuple[int, int],
    mode: Literal["bilinear", "bicubic"] = "bilinear",
) -> Float[Tensor, "batch height width"]:
    """Interpolate patch-grid maps to the image size (``align_corners=False``, as for images)."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    upsampled = F.interpolate(maps.unsqueeze(1), size=tuple(size), mode=mode, align_corners=False)
    return upsampled.squeeze(1)


def make_baseline(
    images: Float[Tensor, "batch channel height width"],
    model: HookedViT,
    fill: Fill,
    sigma: float = 2.0,
) -> Float[Tensor, "batch channel height width"]:
    """The images with every patch filled as ``corrupt_patches`` fills them: the reference that
    replaces a patch (occlusion) or starts the path (integrated gradients).

    Args:
        images: normalised model inputs [batch, channel, height, width].
        model: gives the normalisation and the patch grid.
        fill: "zeros" (black pixels), "mean" (the normalisation's mean colour), "blur" (Gaussian
            blur of standard deviation ``sigma`` pixels) or a tensor broadcastable to ``images``;
            see :func:`~vitlens_patch.images.fill_images`.

    Returns:
        [batch, channel, height, width] normalised model inputs.
    """
    every_patch = torch.ones(model.cfg.grid_size, dtype=torch.bool)
    return corrupt_patches(
        images, model.data_config, every_patch, patch_size=model.cfg.patch_size, fill=fill, sigma=sigma
    )
