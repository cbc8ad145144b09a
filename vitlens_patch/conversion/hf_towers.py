"""Hugging Face vision towers and backbones -> HookedViT: CLIP, SigLIP, DINOv2, DeiT, headless ViT.

One converter per HF class (``HF_CONVERTERS``): each reads a ``ViTConfig`` off the HF config,
refusing with ``NotImplementedError`` what HookedViT cannot represent, and maps the HF state dict
key by key to timm ``VisionTransformer`` names (a pure function, like timm's
``checkpoint_filter_fn``); ``conversion.timm.convert_timm_state_dict`` then makes the HookedViT
state dict, which is loaded strictly. Every HF key is consumed exactly once or listed as unused
(with the reason) in the converter; anything left over or missing raises ``ValueError``.

What each HookedViT returns (``model(images)``), equal to the HF output named:

| HF class | output |
| --- | --- |
| ``CLIPVisionModel`` | ``pooler_output`` (post-LayerNorm class token) |
| ``CLIPVisionModelWithProjection`` | ``image_embeds`` (the projection is the bias-free classifier) |
| ``Dinov2Model``, ``Dinov2WithRegistersModel`` | ``pooler_output`` (normed class token) |
| ``Dinov2ForImageClassification`` (also with registers) | ``logits`` (class token + patch mean) |
| ``DeiTForImageClassification`` | ``logits`` (class token; the distillation token is a prefix token) |
| ``DeiTForImageClassificationWithTeacher`` | ``logits`` (mean of the two heads) |
| ``ViTModel`` | ``last_hidden_state[:, 0]`` (normed class token; the tanh pooler is not converted) |
| ``SiglipVisionModel`` | ``pooler_output`` (attention pooling; ``last_hidden_state`` without the head) |

Key names are transformers 5's (the state dict of a built model; ``from_pretrained`` renames
older checkpoints itself). Models run at the config's ``image_size``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vitlens_patch.conversion.checks import load_state_dict_strictly
from vitlens_patch.conversion.timm import convert_timm_state_dict
from vitlens_patch.model import DataConfig, HookedViT, ViTConfig

# Per-layer HF module names (relative to the layer) -> timm names, one table per encoder family.
_CLIP_LAYER = {
    "norm1": "layer_norm1", "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_DINOV2_LAYER = {
    "norm1": "norm1", "attn.q": "attention.q_proj", "attn.k": "attention.k_proj",
    "attn.v": "attention.v_proj", "attn.proj": "attention.o_proj", "norm2": "norm2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_VIT_LAYER = {
    "norm1": "layernorm_before", "attn.q": "attention.q_proj", "attn.k": "attention.k_proj",
    "attn.v": "attention.v_proj", "attn.proj": "attention.o_proj", "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def _weight_and_bias(timm_name: str, hf_name: str) -> dict[str, tuple[str]]:
    """Key sources of a layer with a weight and a bias: ``{timm_name}.weight <- {hf_name}.weight``, likewise bias."""
    return {f"{timm_name}.{param}": (f"{hf_name}.{param}",) for param in ("weight", "bias")}


@dataclass(frozen=True)
class HFConverter:
    """How one HF class maps to HookedViT.

    Attributes:
        config: HF config -> ``ViTConfig`` (raises ``NotImplementedError`` naming a feature).
        key_sources: (HF config, ViTConfig) -> {timm key: HF keys concatenated along dim 0}.
        unused: HF keys the output never reads, each with the reason it is dropped.
    """

    config: Callable[[object], ViTConfig]
    key_sources: Callable[[object, ViTConfig], dict[str, tuple[str, ...]]]
    unused: Callable[[object], dict[str, str]] = lambda hf_config: {}


def _fold_class_position(state: dict[str, Tensor], cfg: ViTConfig) -> dict[str, Tensor]:
    """timm layout for a class token with a position and prefix tokens without (DINOv2 with
    registers, as timm's own conversion): ``cls_token + pos_embed[:, 0]`` is the class token and
    ``pos_embed[:, 1:]`` covers the patches (``no_embed_class``); the sum entering block 0 is HF's."""
    if cfg.pos_embed_prefix:
        return state
    pos = state["pos_embed"]
    return state | {"cls_token": state["cls_token"] + pos[:, :1], "pos_embed": pos[:, 1:]}


def _split_pool_in_proj(state: dict[str, Tensor], cfg: ViTConfig) -> dict[str, Tensor]:
    """``nn.MultiheadAttention``'s fused in-projection (q, k, v stacked) -> timm
    ``AttentionPoolLatent``'s ``q`` and fused ``kv`` (SigLIP's pooling head)."""
    if "attn_pool.in_proj.weight" not in state:
        return state
    state = dict(state)
    for param in ("weight", "bias"):
        fused = state.pop(f"attn_pool.in_proj.{param}")
        state[f"attn_pool.q.{param}"], state[f"attn_pool.kv.{param}"] = fused[: cfg.d_model], fused[cfg.d_model :]
    return state


def _encoder_config(hf_config, d_mlp: int, **fields) -> ViTConfig:
    """The fields every family shares, checked; ``fields`` add the family's own."""
    from vitlens_patch.conversion.hf import HF_TO_TIMM_ACTIVATION, check_hf_encoder_config, pair

    check_hf_encoder_config(hf_config)
    hidden_size, n_heads = hf_config.hidden_size, hf_config.num_attention_heads
    return ViTConfig(
        n_layers=hf_config.num_hidden_layers,
        d_model=hidden_size,
        n_heads=n_heads,
        d_mlp=d_mlp,
        img_size=pair(hf_config.image_size),
        patch_size=pair(hf_config.patch_size),
        in_chans=hf_config.num_channels,
        activation=HF_TO_TIMM_ACTIVATION[hf_config.hidden_act],
        eps=hf_config.layer_norm_eps,
        **fields,
    )


def _layer_sources(prefix: str, table: dict[str, str], cfg: ViTConfig, qkv_bias: bool = True,
                   layer_scale: tuple[str, str] | None = None) -> dict[str, tuple[str, ...]]:
    sources: dict[str, tuple[str, ...]] = {}
    for layer in range(cfg.n_layers):
        hf, block = f"{prefix}{layer}.", f"blocks.{layer}."
        for param in ("weight", "bias"):
            if param == "weight" or qkv_bias:
                # timm's fused qkv Linear stacks the q, k, v output features in that order
                sources[f"{block}attn.qkv.{param}"] = tuple(f"{hf}{table[f'attn.{n}']}.{param}" for n in "qkv")
            for name in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                sources[f"{block}{name}.{param}"] = (f"{hf}{table[name]}.{param}",)
        if layer_scale is not None:
            sources[f"{block}ls1.gamma"] = (f"{hf}{layer_scale[0]}",)
            sources[f"{block}ls2.gamma"] = (f"{hf}{layer_scale[1]}",)
    return sources


# ----------------------------------------------------------------------------------- CLIP
def _clip_config(hf_config, with_projection: bool) -> ViTConfig:
    return _encoder_config(
        hf_config, hf_config.intermediate_size, pre_norm=True, final_norm="pooled", pooling="token",
        patch_embed_bias=False, n_classes=hf_config.projection_dim if with_projection else 0,
        head_bias=False,
    )


def _clip_sources(prefix: str) -> Callable:
    return lambda hf_config, cfg: _clip_key_sources(prefix, cfg)


def _clip_key_sources(p: str, cfg: ViTConfig) -> dict[str, tuple[str, ...]]:
    sources = {
        "cls_token": (f"{p}embeddings.class_embedding",),
        "pos_embed": (f"{p}embeddings.position_embedding.weight",),
        "patch_embed.proj.weight": (f"{p}embeddings.patch_embedding.weight",),
        **_weight_and_bias("norm_pre", f"{p}pre_layrnorm"),
        **_weight_and_bias("fc_norm", f"{p}post_layernorm"),
    }
    sources |= _layer_sources(f"{p}encoder.layers.", _CLIP_LAYER, cfg)
    if cfg.n_classes:
        sources["head.weight"] = ("visual_projection.weight",)
    return sources


# --------------------------------------------------------------------------------- SigLIP
def _siglip_config(hf_config) -> ViTConfig:
    # no class token; the attention-pooling head reads every token (there are no prefix tokens)
    return _encoder_config(
        hf_config, hf_config.intermediate_size, class_token=False, final_norm="tokens", n_classes=0,
        pooling="map" if hf_config.vision_use_head else "none",
    )


def _siglip_sources(hf_config, cfg: ViTConfig) -> dict[str, tuple[str, ...]]:
    sources = {
        "pos_embed": ("embeddings.position_embedding.weight",),
        **_weight_and_bias("patch_embed.proj", "embeddings.patch_embedding"),
        **_weight_and_bias("norm", "post_layernorm"),
    }
    sources |= _layer_sources("encoder.layers.", _CLIP_LAYER, cfg)
    if cfg.pooling == "map":
        sources |= {
            "attn_pool.latent": ("head.probe",),
            "attn_pool.in_proj.weight": ("head.attention.in_proj_weight",),  # split by _split_pool_in_proj
            "attn_pool.in_proj.bias": ("head.attention.in_proj_bias",),
            **_weight_and_bias("attn_pool.proj", "head.attention.out_proj"),
            **_weight_and_bias("attn_pool.norm", "head.layernorm"),
            **_weight_and_bias("attn_pool.mlp.fc1", "head.mlp.fc1"),
            **_weight_and_bias("attn_pool.mlp.fc2", "head.mlp.fc2"),
        }
    return sources


# --------------------------------------------------------------------------------- DINOv2
def _dinov2_config(hf_config, classifier: bool) -> ViTConfig:
    if hf_config.use_swiglu_ffn:
        raise NotImplementedError("use_swiglu_ffn=True (DINOv2 giant's SwiGLU MLP) is not supported")
    n_registers = getattr(hf_config, "num_register_tokens", 0)
    return _encoder_config(
        hf_config, int(hf_config.hidden_size * hf_config.mlp_ratio), layer_scale=True,
        qkv_bias=hf_config.qkv_bias, n_register_tokens=n_registers,
        # HF adds the class token's position before inserting the (unpositioned) registers; its
        # position embedding is folded into the class token (see _fold_class_position)
        pos_embed_prefix=not n_registers,
        pooling="token_avg" if classifier else "token", n_classes=hf_config.num_labels if classifier else 0,
    )


def _vit_embedding_sources(prefix: str) -> dict[str, tuple[str, ...]]:
    """Class token, position and patch embeddings and the final norm, as HF ViT and DINOv2 name them."""
    return {
        "cls_token": (f"{prefix}embeddings.cls_token",),
        "pos_embed": (f"{prefix}embeddings.position_embeddings",),
        **_weight_and_bias("patch_embed.proj", f"{prefix}embeddings.patch_embeddings.projection"),
        **_weight_and_bias("norm", f"{prefix}layernorm"),
    }


def _dinov2_sources(prefix: str) -> Callable:
    def sources(hf_config, cfg: ViTConfig) -> dict[str, tuple[str, ...]]:
        out = _vit_embedding_sources(prefix)
        if cfg.n_register_tokens:
            out["reg_token"] = (f"{prefix}embeddings.register_tokens",)
        out |= _layer_sources(f"{prefix}encoder.layer.", _DINOV2_LAYER, cfg, hf_config.qkv_bias,
                              ("layer_scale1.lambda1", "layer_scale2.lambda1"))
        if cfg.n_classes:
            out |= _weight_and_bias("head", "classifier")
        return out

    return sources


def _dinov2_unused(prefix: str) -> Callable:
    return lambda hf_config: {f"{prefix}embeddings.mask_token": "read only with bool_masked_pos (masked training)"}


# ---------------------------------------------------------------------------- DeiT and ViT
def _vit_config(hf_config, *, distilled: bool, pooling: str, n_classes: int) -> ViTConfig:
    return _encoder_config(
        hf_config, hf_config.intermediate_size, qkv_bias=hf_config.qkv_bias, distilled=distilled,
        pooling=pooling, n_classes=n_classes,
    )


def _vit_sources(prefix: str, heads: dict[str, str]) -> Callable:
    def sources(hf_config, cfg: ViTConfig) -> dict[str, tuple[str, ...]]:
        out = _vit_embedding_sources(prefix)
        if cfg.distilled:
            out["dist_token"] = (f"{prefix}embeddings.distillation_token",)
        out |= _layer_sources(f"{prefix}layers.", _VIT_LAYER, cfg, hf_config.qkv_bias)
        for timm_name, hf_name in heads.items():
            out |= _weight_and_bias(timm_name, hf_name)
        return out

    return sources


_POOLER_UNUSED = {"pooler.dense.weight": "the tanh pooler is not converted (output: normed class token)",
                  "pooler.dense.bias": "the tanh pooler is not converted (output: normed class token)"}

HF_CONVERTERS: dict[str, HFConverter] = {
    "CLIPVisionModel": HFConverter(lambda c: _clip_config(c, False), _clip_sources("")),
    "CLIPVisionModelWithProjection": HFConverter(lambda c: _clip_config(c, True), _clip_sources("vision_model.")),
    "Dinov2Model": HFConverter(lambda c: _dinov2_config(c, False), _dinov2_sources(""), _dinov2_unused("")),
    "Dinov2WithRegistersModel": HFConverter(
        lambda c: _dinov2_config(c, False), _dinov2_sources(""), _dinov2_unused("")
    ),
    "Dinov2ForImageClassification": HFConverter(
        lambda c: _dinov2_config(c, True), _dinov2_sources("dinov2."), _dinov2_unused("dinov2.")
    ),
    "Dinov2WithRegistersForImageClassification": HFConverter(
        lambda c: _dinov2_config(c, True), _dinov2_sources("dinov2_with_registers."),
        _dinov2_unused("dinov2_with_registers."),
    ),
    "DeiTForImageClassification": HFConverter(
        lambda c: _vit_config(c, distilled=True, pooling="token", n_classes=c.num_labels),
        _vit_sources("deit.", {"head": "classifier"}),
    ),
    "DeiTForImageClassificationWithTeacher": HFConverter(
        lambda c: _vit_config(c, distilled=True, pooling="distilled", n_classes=c.num_labels),
        _vit_sources("deit.", {"head": "cls_classifier", "head_dist": "distillation_classifier"}),
    ),
    "ViTModel": HFConverter(
        lambda c: _vit_config(c, distilled=False, pooling="token", n_classes=0),
        _vit_sources("", {}), lambda c: _POOLER_UNUSED,
    ),
    "SiglipVisionModel": HFConverter(_siglip_config, _siglip_sources),
}

# Token-shaped parameters HF stores without timm's leading batch axis.
_TIMM_TOKEN_KEYS = ("cls_token", "dist_token", "reg_token", "pos_embed")


def convert_hf_tower_state_dict(
    state_dict: dict[str, Tensor], hf_config, class_name: str
) -> tuple[ViTConfig, dict[str, Tensor]]:
    """An HF tower's state dict -> (ViTConfig, timm ``VisionTransformer`` state dict).

    Args:
        state_dict: the HF model's ``state_dict()`` (transformers 5 key names).
        hf_config: its config.
        class_name: the HF class, a key of ``HF_CONVERTERS``.

    Raises:
        NotImplementedError: an HF class or config feature HookedViT does not support.
        ValueError: listing missing and unexpected keys.
    """
    if class_name not in HF_CONVERTERS:
        raise NotImplementedError(
            f"HF class {class_name} is not supported; supported: "
            f"{sorted([*HF_CONVERTERS, 'ViTForImageClassification'])}"
        )
    converter = HF_CONVERTERS[class_name]
    cfg = converter.config(hf_config)
    remaining = dict(state_dict)
    for key in converter.unused(hf_config):
        remaining.pop(key, None)
    converted, missing = {}, []
    for timm_key, hf_keys in converter.key_sources(hf_config, cfg).items():
        absent = [key for key in hf_keys if key not in remaining]
        if absent:
            missing.extend(absent)
            continue
        tensors = [remaining.pop(key) for key in hf_keys]
        value = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        if timm_key in _TIMM_TOKEN_KEYS:
            value = value.reshape(1, -1, cfg.d_model)
        converted[timm_key] = value
    if missing or remaining:
        raise ValueError(
            f"HF {class_name} state_dict does not match its config: missing keys {missing}, "
            f"unexpected keys {sorted(remaining)}"
        )
    return cfg, _split_pool_in_proj(_fold_class_position(converted, cfg), cfg)


def hooked_vit_from_hf_tower(hf_model, image_processor=None) -> HookedViT:
    """HookedViT equal to a built HF tower (a class of ``HF_CONVERTERS``), on its device and dtype.

    ``data_config`` comes from ``image_processor`` (or HF ViT defaults), ``class_names`` from
    ``config.id2label`` for classifiers.
    """
    from vitlens_patch.conversion.hf import pretrained_cfg_from_hf

    hf_config = hf_model.config
    cfg, timm_state = convert_hf_tower_state_dict(hf_model.state_dict(), hf_config, type(hf_model).__name__)
    pretrained = pretrained_cfg_from_hf(hf_config, image_processor, with_labels=cfg.n_classes > 0
                                        and not hasattr(hf_config, "projection_dim"))
    reference = next(hf_model.parameters())
    with torch.device("meta"):
        model = HookedViT(cfg, data_config=DataConfig.from_dict(pretrained),
                          class_names=pretrained.get("label_names"))
    model.to_empty(device=reference.device).to(reference.dtype)
    load_state_dict_strictly(model, convert_timm_state_dict(timm_state, cfg))
    return model.eval()
