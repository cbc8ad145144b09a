"""Load Hugging Face ``transformers`` ViTs (``ViTForImageClassification``) into HookedViT.

One conversion path: the HF config and weights become the equivalent timm ``VisionTransformer``
(pure functions ``timm_kwargs_from_hf_config`` and ``convert_hf_state_dict``, like timm's
``checkpoint_filter_fn``), and ``conversion.timm.from_timm`` builds the HookedViT from that.

HF ViT and timm's token-pooled ViT compute the same function: class token and position embeddings
on all tokens, pre-norm blocks, final LayerNorm on every token, then the class token goes through the
classifier (HF's ``ViTForImageClassification`` builds ``ViTModel(add_pooling_layer=False)``, so its
tanh pooler never runs). Models run at the config's ``image_size``: HF's
``interpolate_pos_encoding`` has no counterpart.
"""

from __future__ import annotations

import functools
import os
import re

import timm.layers
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

try:
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        PretrainedConfig,
        PreTrainedModel,
        ViTForImageClassification,
    )
except ImportError as error:  # transformers is an optional dependency (the "hf" extra)
    raise ImportError(
        "loading Hugging Face ViTs needs transformers: pip install 'vitlens_patch[hf]'"
    ) from error

from vitlens_patch.conversion.checks import load_state_dict_strictly
from vitlens_patch.conversion.timm import from_timm
from vitlens_patch.model import HookedViT

# HF ``hidden_act`` -> timm ``act_layer`` name. HF "gelu" is the exact erf GELU; "gelu_new",
# "gelu_fast" and the "*_tanh" variants are the tanh approximation (different formulas, same function).
HF_TO_TIMM_ACTIVATION = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
}

# The pooler (dense + tanh) belongs to ViTModel(add_pooling_layer=True) checkpoints; the classifier
# reads the normed class token directly, so these weights never affect the logits.
UNUSED_HF_KEYS = ("vit.pooler.dense.weight", "vit.pooler.dense.bias")

# transformers < 5 module names (still how hub checkpoints and save_pretrained files spell them)
# -> transformers 5 names, as in transformers' own "ViTModel" checkpoint conversion mapping.
_LEGACY_RENAMES = (
    (r"^vit\.encoder\.layer\.(\d+)\.", r"vit.layers.\1."),
    (r"^(vit\.layers\.\d+\.attention\.)attention\.query\.", r"\1q_proj."),
    (r"^(vit\.layers\.\d+\.attention\.)attention\.key\.", r"\1k_proj."),
    (r"^(vit\.layers\.\d+\.attention\.)attention\.value\.", r"\1v_proj."),
    (r"^(vit\.layers\.\d+\.attention\.)output\.dense\.", r"\1o_proj."),
    (r"^(vit\.layers\.\d+\.)intermediate\.dense\.", r"\1mlp.fc1."),
    (r"^(vit\.layers\.\d+\.)output\.dense\.", r"\1mlp.fc2."),
)

# ViTImageProcessor defaults, used when no image processor config is available.
HF_VIT_MEAN = (0.5, 0.5, 0.5)
HF_VIT_STD = (0.5, 0.5, 0.5)
_PIL_BILINEAR = 2
# PIL resampling codes -> the interpolation modes DataConfig knows; LANCZOS (1) maps to its
# closest, bicubic, BOX (4) and HAMMING (5) to bilinear.
_PIL_RESAMPLE_TO_INTERPOLATION = {
    0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear",
}


def pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An HF image or patch size (an int or a pair) as a pair of ints."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def check_hf_encoder_config(hf_config: PretrainedConfig) -> None:
    """``NotImplementedError`` for an HF encoder config with an activation timm lacks, or a
    ``head_dim`` other than ``hidden_size / num_attention_heads``."""
    hidden_act = hf_config.hidden_act
    if hidden_act not in HF_TO_TIMM_ACTIVATION:
        raise NotImplementedError(
            f"hidden_act={hidden_act!r} is not supported; supported: {sorted(HF_TO_TIMM_ACTIVATION)}"
        )
    hidden_size, n_heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    if hidden_size % n_heads or (head_dim is not None and head_dim * n_heads != hidden_size):
        raise NotImplementedError(
            f"head_dim must equal hidden_size / num_attention_heads, got hidden_size={hidden_size}, "
            f"num_attention_heads={n_heads}, head_dim={head_dim}"
        )


def timm_kwargs_from_hf_config(hf_config: PretrainedConfig) -> dict:
    """HF ``ViTConfig`` -> keyword arguments of the equivalent timm ``VisionTransformer``.

    Raises:
        NotImplementedError: for a non-ViT ``model_type`` (DeiT, BEiT, Swin, ...), an unsupported
            ``hidden_act``, a ``head_dim`` other than ``hidden_size / num_attention_heads``, an
            ``intermediate_size`` timm's ``mlp_ratio`` cannot express, or ``num_labels=0``.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "vit":
        raise NotImplementedError(
            f"HF model_type {model_type!r} is not supported: only 'vit' "
            f"(ViTForImageClassification) converts, not DeiT, BEiT, Swin or other families"
        )
    check_hf_encoder_config(hf_config)
    hidden_size, n_heads, hidden_act = hf_config.hidden_size, hf_config.num_attention_heads, hf_config.hidden_act
    mlp_ratio = hf_config.intermediate_size / hidden_size
    # timm rebuilds the MLP width as int(embed_dim * mlp_ratio); float rounding can lose one unit
    if int(hidden_size * mlp_ratio) != hf_config.intermediate_size:
        raise NotImplementedError(
            f"intermediate_size={hf_config.intermediate_size} cannot be expressed as timm's "
            f"int(hidden_size * mlp_ratio) with hidden_size={hidden_size}"
        )
    if hf_config.num_labels < 1:
        raise NotImplementedError("num_labels=0 (no classifier head) is not supported")
    return dict(
        img_size=pair(hf_config.image_size),
        patch_size=pair(hf_config.patch_size),
        in_chans=hf_config.num_channels,
        num_classes=hf_config.num_labels,
        global_pool="token",
        class_token=True,
        reg_tokens=0,
        no_embed_class=False,  # HF adds position embeddings to the class token too
        pre_norm=False,
        final_norm=True,
        fc_norm=False,  # final norm on all tokens, then the class token is pooled
        embed_dim=hidden_size,
        depth=hf_config.num_hidden_layers,
        num_heads=n_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=hf_config.qkv_bias,
        proj_bias=True,
        qk_norm=False,
        init_values=None,
        act_layer=HF_TO_TIMM_ACTIVATION[hidden_act],
        # HF's eps (1e-12 by default) differs from timm's 1e-6 and must be kept exactly
        norm_layer=functools.partial(timm.layers.LayerNorm, eps=hf_config.layer_norm_eps),
    )


def _hf_key_sources(hf_config: PretrainedConfig) -> dict[str, tuple[str, ...]]:
    """timm key -> the HF keys (transformers 5 names) concatenated along dim 0 to make it."""
    sources = {
        "cls_token": ("vit.embeddings.cls_token",),
        "pos_embed": ("vit.embeddings.position_embeddings",),
        "patch_embed.proj.weight": ("vit.embeddings.patch_embeddings.projection.weight",),
        "patch_embed.proj.bias": ("vit.embeddings.patch_embeddings.projection.bias",),
    }
    for layer in range(hf_config.num_hidden_layers):
        hf, block = f"vit.layers.{layer}.", f"blocks.{layer}."
        for param in ("weight", "bias"):
            if param == "weight" or hf_config.qkv_bias:
                # timm's fused qkv Linear stacks the q, k, v output features in that order
                sources[f"{block}attn.qkv.{param}"] = tuple(
                    f"{hf}attention.{name}_proj.{param}" for name in ("q", "k", "v")
                )
            for timm_name, hf_name in [("norm1", "layernorm_before"), ("attn.proj", "attention.o_proj"),
                                       ("norm2", "layernorm_after"), ("mlp.fc1", "mlp.fc1"),
                                       ("mlp.fc2", "mlp.fc2")]:
                sources[f"{block}{timm_name}.{param}"] = (f"{hf}{hf_name}.{param}",)
    for param in ("weight", "bias"):
        sources[f"norm.{param}"] = (f"vit.layernorm.{param}",)
        sources[f"head.{param}"] = (f"classifier.{param}",)
    return sources


def _rename_legacy_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    renamed: dict[str, Tensor] = {}
    origins: dict[str, str] = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, replacement in _LEGACY_RENAMES:
            new_key = re.sub(pattern, replacement, new_key)
        if new_key in renamed:
            raise ValueError(
                f"state_dict holds both {origins[new_key]!r} and {key!r}, which name the same weight "
                f"{new_key!r} (mixed transformers 4 and 5 key names)"
            )
        renamed[new_key], origins[new_key] = value, key
    return renamed


def convert_hf_state_dict(state_dict: dict[str, Tensor], hf_config: PretrainedConfig) -> dict[str, Tensor]:
    """HF ``ViTForImageClassification`` state dict -> timm ``VisionTransformer`` state dict.

    Accepts transformers 5 key names (``vit.layers.{i}.attention.q_proj``) and the transformers 4
    names that hub checkpoints and ``save_pretrained`` files use
    (``vit.encoder.layer.{i}.attention.attention.query``). Every key is consumed exactly once;
    only the pooler (``UNUSED_HF_KEYS``) is dropped. q, k, v weights ``[d_model, d_model]`` are
    concatenated into timm's ``attn.qkv.weight [3 * d_model, d_model]`` (biases likewise).
    The input is not modified.

    Raises:
        NotImplementedError: if the state dict holds a mask token (masked image modelling).
        ValueError: listing missing and unexpected keys.
    """
    remaining = _rename_legacy_keys(state_dict)
    if "vit.embeddings.mask_token" in remaining:
        raise NotImplementedError(
            "use_mask_token (vit.embeddings.mask_token, masked image modelling) is not supported"
        )
    for key in UNUSED_HF_KEYS:
        remaining.pop(key, None)
    converted, missing = {}, []
    for timm_key, hf_keys in _hf_key_sources(hf_config).items():
        absent = [key for key in hf_keys if key not in remaining]
        if absent:
            missing.extend(absent)
            continue
        tensors = [remaining.pop(key) for key in hf_keys]
        converted[timm_key] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    if missing or remaining:
        raise ValueError(
            f"HF ViT state_dict does not match its config: missing keys {missing}, "
            f"unexpected keys {sorted(remaining)}"
        )
    return converted


def pretrained_cfg_from_hf(hf_config: PretrainedConfig, image_processor=None, with_labels: bool = True) -> dict:
    """timm-style pretrained cfg (data config + label names) from an HF config and image processor.

    Args:
        hf_config: the model's ``ViTConfig``; gives ``input_size`` (channels, height, width) and
            ``label_names`` (from ``id2label``).
        image_processor: an HF image processor or its ``to_dict()``; None means ViTImageProcessor
            defaults (mean = std = 0.5, bilinear).
        with_labels: False for a model without a classifier: ``num_classes`` 0, no label names.

    Returns:
        dict with ``input_size``, ``mean``, ``std`` (for [0, 1] pixels), ``interpolation``,
        ``crop_pct``, ``crop_mode``, ``num_classes`` and ``label_names`` (None without labels).
    """
    if image_processor is None:
        settings = {}
    elif isinstance(image_processor, dict):
        settings = image_processor
    else:
        settings = image_processor.to_dict()
    channels = hf_config.num_channels
    mean, std = tuple(settings.get("image_mean", HF_VIT_MEAN)), tuple(settings.get("image_std", HF_VIT_STD))
    if not settings.get("do_normalize", True):
        mean, std = (0.0,) * channels, (1.0,) * channels
    # The processor feeds the model (pixels * 255 * rescale_factor - mean) / std; folding the scale
    # into mean and std lets [0, 1] pixels be normalised the same way.
    scale = 255 * settings.get("rescale_factor", 1 / 255) if settings.get("do_rescale", True) else 255
    crop_pct = 1.0
    if settings.get("do_center_crop"):
        size, crop = settings.get("size") or {}, settings.get("crop_size") or {}
        resized = size.get("shortest_edge") or size.get("height")
        if resized and crop.get("height"):
            crop_pct = crop["height"] / resized
    resample = int(settings.get("resample", _PIL_BILINEAR))
    return {
        "input_size": (channels, *pair(hf_config.image_size)),
        "mean": tuple(value / scale for value in mean),
        "std": tuple(value / scale for value in std),
        "interpolation": _PIL_RESAMPLE_TO_INTERPOLATION.get(resample, "bilinear"),
        "crop_pct": crop_pct,
        "crop_mode": "center",
        "num_classes": hf_config.num_labels if with_labels else 0,
        "label_names": (
            tuple(hf_config.id2label[index] for index in range(hf_config.num_labels)) if with_labels else None
        ),
    }


def _load_image_processor(name: str):
    try:
        return AutoImageProcessor.from_pretrained(name)
    except OSError:  # no preprocessor_config.json: fall back to ViTImageProcessor defaults
        return None


def _load_hf_model(name: str) -> ViTForImageClassification:
    timm_kwargs_from_hf_config(AutoConfig.from_pretrained(name))  # fail on unsupported models before fetching weights
    # from_pretrained silently initialises absent weights (e.g. the classifier of a ViTModel
    # checkpoint); a random head would make every logit meaningless.
    return _load_complete(name, "ViTForImageClassification")


def timm_model_from_hf(
    model_or_name: ViTForImageClassification | str | os.PathLike, image_processor=None
) -> VisionTransformer:
    """Equivalent timm ``VisionTransformer`` (eval mode, float32, on the HF model's device) of an
    HF ViT classifier.

    Args:
        model_or_name: a built ``ViTForImageClassification``, or a hub name / local directory
            loaded with ``ViTForImageClassification.from_pretrained``.
        image_processor: HF image processor (or its ``to_dict()``) whose mean, std, size and
            resampling go into ``pretrained_cfg``. None: loaded with ``AutoImageProcessor`` when
            ``model_or_name`` is a name, else (or if there is none) HF ViT defaults mean = std = 0.5.

    Returns:
        the timm model, with ``pretrained_cfg`` (see ``pretrained_cfg_from_hf``) so that
        ``timm.data.resolve_model_data_config`` works on it.
    """
    if isinstance(model_or_name, (str, os.PathLike)):
        name = os.fspath(model_or_name)
        hf_model = _load_hf_model(name)
        if image_processor is None:
            image_processor = _load_image_processor(name)
    elif isinstance(model_or_name, ViTForImageClassification):
        hf_model = model_or_name
    elif isinstance(model_or_name, PreTrainedModel):
        raise NotImplementedError(
            f"{type(model_or_name).__name__} is not supported; only ViTForImageClassification converts"
        )
    else:
        raise ValueError(
            f"model_or_name must be a ViTForImageClassification, a hub name or a local path, "
            f"got {type(model_or_name).__name__}"
        )
    hf_config = hf_model.config
    device = next(hf_model.parameters()).device
    # every parameter is overwritten by the strict load below, so skip timm's initialisation
    timm_model = VisionTransformer(**timm_kwargs_from_hf_config(hf_config), weight_init="skip", device=device)
    load_state_dict_strictly(timm_model, convert_hf_state_dict(hf_model.state_dict(), hf_config))
    timm_model.pretrained_cfg = pretrained_cfg_from_hf(hf_config, image_processor)
    return timm_model.eval()


def from_hf(model_or_name: PreTrainedModel | str | os.PathLike, image_processor=None) -> HookedViT:
    """HookedViT of an HF vision model (built model, hub name or local path).

    ``ViTForImageClassification`` converts through timm (``timm_model_from_hf``, same arguments)
    and ``from_timm``, which reads ``data_config`` off the timm model's ``pretrained_cfg`` (the
    image processor's mean, std, resampling); ``class_names`` come from ``config.id2label``. The
    towers and backbones of ``hf_towers.HF_CONVERTERS`` (CLIP, SigLIP, DINOv2, DeiT, ``ViTModel``)
    convert key by key with ``hf_towers.hooked_vit_from_hf_tower``; a name is loaded with the
    class its config's ``architectures`` names.

    Raises:
        NotImplementedError: for any other HF class, naming the supported ones.
    """
    from vitlens_patch.conversion.hf_towers import HF_CONVERTERS, hooked_vit_from_hf_tower

    if isinstance(model_or_name, (str, os.PathLike)):
        name = os.fspath(model_or_name)
        architecture = (AutoConfig.from_pretrained(name).architectures or [None])[0]
        if architecture in HF_CONVERTERS:
            if image_processor is None:
                image_processor = _load_image_processor(name)
            return hooked_vit_from_hf_tower(_load_complete(name, architecture), image_processor)
    elif isinstance(model_or_name, PreTrainedModel) and not isinstance(model_or_name, ViTForImageClassification):
        return hooked_vit_from_hf_tower(model_or_name, image_processor)
    timm_model = timm_model_from_hf(model_or_name, image_processor)
    model = from_timm(timm_model)
    model.class_names = timm_model.pretrained_cfg["label_names"]
    return model


def _load_complete(name: str, architecture: str) -> PreTrainedModel:
    """``architecture.from_pretrained(name)``, refusing checkpoints with absent weights (which
    ``from_pretrained`` would fill with random values)."""
    import transformers

    hf_model, loading_info = getattr(transformers, architecture).from_pretrained(name, output_loading_info=True)
    if loading_info["missing_keys"] or loading_info["mismatched_keys"]:
        raise ValueError(
            f"{name!r} is not a complete {architecture} checkpoint: missing keys "
            f"{sorted(loading_info['missing_keys'])}, mismatched keys {sorted(loading_info['mismatched_keys'])}"
        )
    return hf_model.eval()
