"""The embedded CIFAR-10 ViT and sample images: everything runs offline from the package itself.

    model = cifar10_vit()                   # HookedViT, eval mode, preprocessing + class names attached
    sample = sample_images()                # 100 CIFAR-10 test images (10 per class), uint8
    logits = model(model.preprocess(sample.images))
    model = dinov2_small_cifar10()          # DINOv2-small fine-tuned for CIFAR-10 (needs the [dinov2] extra)

The weights are a plain timm ``VisionTransformer`` trained by
:mod:`vitlens_patch.pretrained.train_cifar10` (64x64 input, patch 8, 12 layers, d_model 128): full-frame
CIFAR-10 images are 32x32 and are upsampled by ``model.preprocess``. They ship as
``weights/cifar10_vit.safetensors`` (float16) beside ``weights/cifar10_vit.json`` (timm architecture
kwargs, data config, class names, canvas size).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from vitlens_patch.conversion.checks import load_state_dict_strictly
from vitlens_patch.conversion.timm import from_timm
from vitlens_patch.data.folder import LabelledImages
from vitlens_patch.data.sample import load_sample
from vitlens_patch.model import DataConfig, HookedViT

WEIGHTS_DIR = Path(__file__).with_name("weights")
CIFAR10_VIT_WEIGHTS = WEIGHTS_DIR / "cifar10_vit.safetensors"

__all__ = [
    "CIFAR10_VIT_WEIGHTS", "DINOV2_GRAYSCALE_CURVES", "DINOV2_SMALL_CIFAR10_WEIGHTS", "PRETRAINED_MODELS", "PRETRAINED_WEIGHTS", "WEIGHTS_DIR",
    "cifar10_vit", "dinov2_small_cifar10", "load_metadata", "metadata_file", "sample_images",
]


def _weights_path(weights: str | Path | None, model: str = "cifar10_vit") -> Path:
    if model not in PRETRAINED_WEIGHTS:
        raise ValueError(f"model must be one of {sorted(PRETRAINED_WEIGHTS)}, got {model!r}")
    default = PRETRAINED_WEIGHTS[model]
    path = default if weights is None else Path(weights)
    if path.is_dir():
        path = path / default.name
    if path.suffix != ".safetensors" or not path.is_file() or not path.with_suffix(".json").is_file():
        raise ValueError(
            "weights must be a .safetensors file with its .json beside it (or a folder holding "
            f"{default.name} and its .json), got {str(weights)!r}"
        )
    return path


def metadata_file(weights: str | Path | None = None, model: str = "cifar10_vit") -> Path:
    """Path of the JSON beside the weights (default: the shipped weights of ``model``)."""
    return _weights_path(weights, model).with_suffix(".json")


def load_metadata(weights: str | Path | None = None, model: str = "cifar10_vit") -> dict:
    """The JSON beside the weights: ``data_config``, ``class_names``, ``canvas_size``, the
    architecture (``timm_class`` and ``architecture`` for ``cifar10_vit``; ``timm_name``, ``img_size``,
    ``first_trained_block`` for ``dinov2_small_cifar10``), and ``accuracy`` once recorded by
    ``python -m vitlens_patch.pretrained.evaluate_accuracy --record``.

    Args:
        weights: a ``.safetensors`` file or a folder holding the model's default file name;
            default the shipped weights.
        model: a key of :data:`PRETRAINED_WEIGHTS`.
    """
    return json.loads(metadata_file(weights, model).read_text())


def cifar10_vit(
    weights: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedViT:
    """The embedded CIFAR-10 ViT as a HookedViT, built offline from the package's files.

    Args:
        weights: a ``.safetensors`` file with its ``.json`` beside it, or a folder holding
            ``cifar10_vit.safetensors`` (e.g. a fresh export of ``train_cifar10``); default the
            embedded weights.
        device, dtype: where and in which precision the model lives (the file stores float16; the
            default computes in float32).

    Returns:
        HookedViT in eval mode, with ``data_config`` (64x64 input, CIFAR-10 mean/std, bilinear
        resize: ``model.preprocess`` takes 32x32 CIFAR-10 images) and ``class_names``.
    """
    import timm

    path = _weights_path(weights)
    metadata = load_metadata(path)
    if metadata.get("timm_class") != "VisionTransformer":
        raise ValueError(
            f"weights must describe a timm VisionTransformer, got timm_class {metadata.get('timm_class')!r}"
        )
    # built on the meta device (no memory, no random initialisation), then given the file's weights
    timm_model = timm.models.vision_transformer.VisionTransformer(**metadata["architecture"], device="meta")
    # float16 on disk; converted while still on the CPU so no precision is lost before the cast
    state = {key: value.float() for key, value in load_file(str(path)).items()}
    load_state_dict_strictly(timm_model, state, assign=True)
    model = from_timm(timm_model.eval())
    model.data_config = DataConfig.from_dict(metadata["data_config"])
    model.class_names = tuple(metadata["class_names"])
    return model.to(device=device, dtype=dtype).eval()


def sample_images(n_per_class: int | None = None) -> LabelledImages:
    """The embedded CIFAR-10 test images, 10 per class (see :func:`vitlens_patch.data.sample.load_sample`).

    Returns:
        LabelledImages, uint8 [image, 3, 32, 32]; feed them to ``cifar10_vit().preprocess``.
    """
    return load_sample(n_per_class)


from vitlens_patch.pretrained.dinov2 import (  # noqa: E402
    DINOV2_GRAYSCALE_CURVES,
    DINOV2_SMALL_CIFAR10_WEIGHTS,
    dinov2_small_cifar10,
)

PRETRAINED_WEIGHTS = {"cifar10_vit": CIFAR10_VIT_WEIGHTS, "dinov2_small_cifar10": DINOV2_SMALL_CIFAR10_WEIGHTS}
PRETRAINED_MODELS = {"cifar10_vit": cifar10_vit, "dinov2_small_cifar10": dinov2_small_cifar10}
