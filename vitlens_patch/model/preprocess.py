"""Input preprocessing: what a model expects of its pixels (timm's pretrained data config)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Real
from PIL import Image
from torch import Tensor


@dataclass(frozen=True)
class DataConfig:
    """How images are turned into model input, as in timm's ``resolve_model_data_config``.

    Attributes:
        input_size: (channel, height, width) the model takes.
        mean, std: per-channel normalisation applied to [0, 1] pixels.
        interpolation: resize mode ("bilinear", "bicubic", "nearest").
        crop_pct: centre-crop fraction used by timm's eval transform (1.0 = no crop).
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    @classmethod
    def from_dict(cls, config: dict) -> "DataConfig":
        return cls(
            input_size=tuple(config.get("input_size", cls.input_size)),
            mean=tuple(config.get("mean", cls.mean)),
            std=tuple(config.get("std", cls.std)),
            interpolation=config.get("interpolation", cls.interpolation) or cls.interpolation,
            crop_pct=float(config.get("crop_pct", cls.crop_pct) or cls.crop_pct),
        )

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self.mean, device=like.device, dtype=like.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, device=like.device, dtype=like.dtype).view(-1, 1, 1)
        return mean, std

    def normalize(self, pixels: Float[Tensor, "batch channel height width"]) -> Tensor:
        """[0, 1] pixels -> model input."""
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def denormalize(self, inputs: Float[Tensor, "batch channel height width"]) -> Tensor:
        """Model input -> [0, 1] pixels (unclamped)."""
        mean, std = self._stats(inputs)
        return inputs * std + mean

    def to_pixels(self, images) -> Float[Tensor, "batch channel height width"]:
        """Image paths, PIL image(s), uint8 arrays/tensors or [0, 1] float tensors -> float
        [batch, C, H, W] in [0, 1].

        Resized (``interpolation``) and centre-cropped (``crop_pct``) to ``input_size``.
        """
        if isinstance(images, (list, tuple)):
            return torch.cat([self.to_pixels(image) for image in images])
        if isinstance(images, (str, Path)):
            images = Image.open(images)
        if isinstance(images, Image.Image):
            images = np.asarray(images.convert("RGB" if self.input_size[0] == 3 else "L"))
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.array(images))  # a writable copy
            if images.ndim == 2:
                images = images[..., None]
            if images.ndim == 3:
                images = images.permute(2, 0, 1)  # height width channel -> channel height width
            elif images.ndim == 4:
                images = images.permute(0, 3, 1, 2)
        if not isinstance(images, Tensor):
            raise ValueError(
                f"images must be PIL images, numpy arrays or tensors, got {type(images).__name__}"
            )
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4:
            raise ValueError(f"images must have 3 or 4 dimensions, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 255
        elif images.is_floating_point():
            if images.numel() and (images.min() < 0 or images.max() > 1):
                raise ValueError("float images must hold pixels in [0, 1]; normalise with preprocess()")
            images = images.float()
        else:
            raise ValueError(f"images must be uint8 or float, got dtype {images.dtype}")
        channels, height, width = self.input_size
        if images.shape[1] != channels:
            raise ValueError(f"images must have {channels} channels, got shape {tuple(images.shape)}")
        if images.shape[-2:] != (height, width):
            resized, top, left = self._resize_and_crop()
            images = F.interpolate(
                images, size=resized, mode=self.interpolation,
                **({} if self.interpolation == "nearest" else {"align_corners": False}),
            ).clamp(0, 1)
            images = images[..., top : top + height, left : left + width]
        return images

    def _resize_and_crop(self) -> tuple[tuple[int, int], int, int]:
        """(height, width) images are resized to before the centre crop, and the crop's top, left."""
        _, height, width = self.input_size
        resized = (round(height / self.crop_pct), round(width / self.crop_pct))
        return resized, (resized[0] - height) // 2, (resized[1] - width) // 2

    def resize_boxes(
        self, boxes: Real[Tensor, "batch 4"], image_size: tuple[int, int]
    ) -> Float[Tensor, "batch 4"]:
        """Boxes ``(x_min, y_min, x_max, y_max)`` in pixels of ``image_size`` (height, width) images
        -> the same boxes in pixels of the model input :meth:`to_pixels` makes of those images
        (resized, centre-cropped, and clipped to the input), as float."""
        _, height, width = self.input_size
        boxes = boxes.float()
        if tuple(image_size) == (height, width):
            return boxes  # to_pixels leaves images of the input size alone
        (resized_h, resized_w), top, left = self._resize_and_crop()
        scale = boxes.new_tensor([resized_w / image_size[1], resized_h / image_size[0]]).repeat(2)
        shift = boxes.new_tensor([left, top]).repeat(2)
        bounds = boxes.new_tensor([width, height]).repeat(2)
        return torch.minimum((boxes * scale - shift).clamp(min=0), bounds)

    def preprocess(self, images) -> Float[Tensor, "batch channel height width"]:
        """PIL images, uint8 arrays or [0, 1] float tensors -> normalised model input."""
        return self.normalize(self.to_pixels(images))
