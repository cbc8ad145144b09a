"""The images an evaluation runs on: full-frame inputs and, for localization, canvas inputs with masks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vitlens_patch.checks import check_images, describe
from vitlens_patch.data.cifar10 import canvas_test_set
from vitlens_patch.data.folder import LabelledImages, load_image_folder
from vitlens_patch.metrics import boxes_to_masks
from vitlens_patch.model import DataConfig, HookedViT
from vitlens_patch.data.folder import select_per_class


@dataclass(frozen=True)
class EvaluationSet:
    """The images an evaluation runs on.

    Attributes:
        images: full-frame normalised model inputs [batch, channel, height, width].
        labels: int64 true classes [image].
        canvas_images: optional canvas images, normalised model inputs [batch, channel, height,
            width]: image i's object on a class-free background (needed by "aupr" and
            "pointing_game").
        masks: bool object masks of the canvas images [image, height, width]; given together with
            ``canvas_images``.
        class_names: class index -> name, if known.
        source_indices: int64 [image] index of each image in the data set it was drawn from.
        data_config: the normalisation of the images (``model.data_config``), for :meth:`pixels`.
    """

    images: Float[Tensor, "batch channel height width"]
    labels: Int[Tensor, " batch"]
    canvas_images: Float[Tensor, "batch channel height width"] | None = None
    masks: Bool[Tensor, "batch height width"] | None = None
    class_names: tuple[str, ...] | None = None
    source_indices: Int[Tensor, " batch"] | None = None
    data_config: DataConfig | None = None

    def __post_init__(self) -> None:
        check_images(self.images)
        n_images = len(self.images)
        if (not isinstance(self.labels, Tensor) or self.labels.shape != (n_images,)
                or self.labels.is_floating_point() or self.labels.dtype == torch.bool):
            raise ValueError(f"labels must be an integer tensor [{n_images}], got {describe(self.labels)}")
        object.__setattr__(self, "labels", self.labels.long())
        if (self.canvas_images is None) != (self.masks is None):
            raise ValueError("canvas_images and masks must be given together (or neither)")
        if self.canvas_images is not None:
            if (not isinstance(self.canvas_images, Tensor) or self.canvas_images.shape != self.images.shape
                    or not self.canvas_images.is_floating_point()):
                raise ValueError(
                    f"canvas_images must be a float tensor of the images' shape {tuple(self.images.shape)}, "
                    f"got {describe(self.canvas_images)}"
                )
            expected = (n_images, *self.images.shape[-2:])
            if not isinstance(self.masks, Tensor) or self.masks.dtype != torch.bool or self.masks.shape != expected:
                raise ValueError(f"masks must be a bool tensor {list(expected)}, got {describe(self.masks)}")
        if self.source_indices is not None:
            if not isinstance(self.source_indices, Tensor) or self.source_indices.shape != (n_images,):
                raise ValueError(f"source_indices must be a tensor [{n_images}], got {describe(self.source_indices)}")
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
    ) -> Float[Tensor, "batch channel height width"]:
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
        cls,
        model: HookedViT,
        source: LabelledImages | str | os.PathLike,
        n: int,
        *,
        seed: int = 0,
        canvas_size: int | None = None,
    ) -> EvaluationSet:
        """``n`` test images, ``n / n_classes`` per class, as full-frame and canvas model inputs.

        Images are chosen per class at random (``select_per_class(labels, n // n_classes,
        seed=seed)``). Full frame: ``model.preprocess`` (resized to the model's input). Canvas:
        the image at its own resolution pasted at a random position on a smooth-noise canvas of
        ``canvas_size`` pixels (``canvas_test_set(..., seed=seed)``), then resized to the model's
        input like a full frame (``model.preprocess``); its mask is the pasted box, resized with
        the canvas (``model.data_config.resize_boxes``).

        Args:
            model: gives the input size and normalisation (``model.data_config``).
            source: a :class:`LabelledImages` or an ImageFolder path / ``.tar.gz`` archive such as
                ``../shared/data/cifar10/test.tar.gz``; its images must be smaller than the
                model's (square) input, so that the canvas has a background.
            n: total number of images, a multiple of the number of classes.
            seed: seeds the choice of images, the canvas backgrounds and the object positions.
            canvas_size: side of the canvas in pixels, larger than the source images; default the
                model's input side. Give the canvas the model was trained on (the ``canvas_size``
                of its weights' JSON, :func:`vitlens_patch.pretrained.load_metadata`): 64 for
                ``dinov2_small_cifar10``, whose 112-pixel input is a 64-pixel canvas upsampled.
        """
        images = load_image_folder(source) if isinstance(source, (str, os.PathLike)) else source
        if not isinstance(images, LabelledImages):
            raise ValueError(f"source must be LabelledImages or an image folder path, got {type(source).__name__}")
        n_classes = len(images.class_names)
        if isinstance(n, bool) or not isinstance(n, int) or n < n_classes or n % n_classes:
            raise ValueError(f"n must be a positive multiple of the {n_classes} classes, got {n!r}")
        height, width = model.cfg.img_size
        if height != width:
            raise ValueError(f"model input must be square to hold a canvas, got ({height}, {width})")
        source_size = max(images.images.shape[-2:])
        if canvas_size is None:
            if source_size >= height:
                raise ValueError(
                    f"source images ({tuple(images.images.shape[-2:])}) must be smaller than the model's "
                    f"square input ({height}, {width}) to be pasted on a canvas"
                )
            canvas_size = height
        elif isinstance(canvas_size, bool) or not isinstance(canvas_size, int) or canvas_size <= source_size:
            raise ValueError(
                f"canvas_size must be an integer larger than the source images "
                f"({tuple(images.images.shape[-2:])}), got {canvas_size!r}"
            )
        model_names = getattr(model, "class_names", None)
        if model_names is not None and tuple(model_names) != tuple(images.class_names):
            raise ValueError(
                f"source class names {images.class_names} must match model.class_names {tuple(model_names)}"
            )
        indices = torch.tensor(select_per_class(images.labels, n // n_classes, seed=seed))
        chosen = images.subset(indices)
        canvases, boxes = canvas_test_set(chosen, canvas_size=canvas_size, seed=seed)
        return cls(
            images=model.preprocess(chosen.images).cpu(),
            labels=chosen.labels,
            canvas_images=model.preprocess(canvases).cpu(),
            masks=boxes_to_masks(model.data_config.resize_boxes(boxes, (canvas_size, canvas_size)), (height, height)),
            class_names=images.class_names,
            source_indices=indices,
            data_config=model.data_config,
        )
