"""timm ``Eva`` models (EVA, EVA-02, RoPE-ViT, DINOv3) -> HookedViT.

The same pieces as ``conversion/timm.py`` for ``VisionTransformer``, plus rotary position embeddings
(their sin / cos tables are read off the timm model's ``rope`` module at the built input size),
SwiGLU MLPs (packed ``GluMlp`` or split ``SwiGLU``), EVA-02's sub-LNs inside the attention and MLP,
and EVA's zero key bias.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from vitlens_patch.model import ViTConfig


def config_from_eva(model: nn.Module) -> ViTConfig:
    """Read a ViTConfig off a built timm ``Eva``, refusing what HookedViT cannot represent.

    Raises:
        NotImplementedError: naming the unsupported layer type or option.
    """
    from timm.layers import GluMlp, Mlp, PatchEmbed, SwiGLU
    from timm.layers.attention import AttentionRope
    from timm.models.eva import EvaAttention, EvaBlock

    from vitlens_patch.conversion.timm import layer_norm_eps, timm_blocks, timm_mlp_fields

    if model.attn_pool is not None:
        raise NotImplementedError(f"Eva global_pool={model.global_pool!r} (attention pooling) is not supported")
    if model.global_pool not in ("token", "avg", "max", "avgmax", ""):
        raise NotImplementedError(f"Eva global_pool={model.global_pool!r} is not supported")
    if model.global_pool == "" and model.num_classes:
        raise NotImplementedError("Eva global_pool='' with a classifier is not supported; build it with num_classes=0")
    if model.patch_drop is not None and model.training:
        raise NotImplementedError("patch_drop_rate > 0 in training mode is not supported; call model.eval()")
    embed = model.patch_embed
    if type(embed) is not PatchEmbed or embed.dynamic_img_pad or not isinstance(embed.norm, nn.Identity):
        raise NotImplementedError(f"Eva patch embedding {type(embed).__name__} with these options is not supported")
    blocks = timm_blocks(model, EvaBlock, "Eva block type (post-norm)")
    first = blocks[0]
    for index, block in enumerate(blocks):
        where = f"blocks.{index}"
        attn = block.attn
        if type(attn) not in (EvaAttention, AttentionRope) or attn.gate is not None:
            raise NotImplementedError(f"{where}: attention type {type(attn).__name__} (or gated attention) is not supported")
        if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
            raise NotImplementedError(f"{where}: grouped-query attention (num_kv_heads) is not supported")
        if type(attn) is EvaAttention and attn.qkv is None:
            raise NotImplementedError(f"{where}: unfused q/k/v projections (qkv_fused=False) are not supported")
        if type(block.mlp) not in (Mlp, GluMlp, SwiGLU):
            raise NotImplementedError(f"{where}: MLP type {type(block.mlp).__name__} is not supported")
        if type(block.mlp) is GluMlp and (block.mlp.gate_last or block.mlp.chunk_dim != -1):
            raise NotImplementedError(f"{where}: GluMlp with gate_last=True is not supported")
        if (block.gamma_1 is None) != (block.gamma_2 is None):
            raise NotImplementedError(f"{where}: layer scale on the attention branch only is not supported")
        if type(block.mlp) is not type(first.mlp) or type(attn) is not type(first.attn):
            raise NotImplementedError(f"{where}: blocks with different options are not supported")
        for name in ("norm1", "norm2"):
            layer_norm_eps(getattr(block, name), f"{where}.{name}")
    eps = layer_norm_eps(first.norm1, "blocks.0.norm1")
    attn, mlp = first.attn, first.mlp
    qk_norm = not isinstance(attn.q_norm, nn.Identity)
    attn_norm = not isinstance(attn.norm, nn.Identity)
    mlp_norm = not isinstance(mlp.norm, nn.Identity)
    for name, norm in [("q_norm", attn.q_norm if qk_norm else None), ("attn.norm", attn.norm if attn_norm else None),
                       ("mlp.norm", mlp.norm if mlp_norm else None), ("norm", model.norm), ("fc_norm", model.fc_norm),
                       ("norm_pre", model.norm_pre)]:
        if norm is not None and not isinstance(norm, nn.Identity) and layer_norm_eps(norm, name) != eps:
            raise NotImplementedError(f"{name}: a LayerNorm eps different from the blocks' is not supported")
    if model.rope is not None and type(model.rope).__name__ not in ("RotaryEmbeddingCat", "RotaryEmbeddingDinoV3", "RotaryEmbeddingMixed"):
        raise NotImplementedError(f"rotary embedding {type(model.rope).__name__} is not supported")
    mlp_fields = timm_mlp_fields(mlp, "blocks.0.mlp")
    if (attn.proj.bias is not None) != mlp_fields["proj_bias"]:
        raise NotImplementedError("attention projection and MLP with different bias settings are not supported")
    has_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    has_norm = not isinstance(model.norm, nn.Identity)
    return ViTConfig(
        n_layers=len(blocks),
        d_model=model.embed_dim,
        n_heads=attn.num_heads,
        d_head=attn.head_dim,
        img_size=tuple(embed.img_size),
        patch_size=tuple(embed.patch_size),
        n_classes=model.num_classes,
        in_chans=embed.proj.in_channels,
        class_token=model.cls_token is not None,
        n_register_tokens=model.num_prefix_tokens - int(model.cls_token is not None),
        pos_embed_prefix=not model.no_embed_class,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm="pooled" if has_fc_norm else ("tokens" if has_norm else "none"),
        pooling=model.global_pool or "none",
        layer_scale=first.gamma_1 is not None,
        qkv_bias=(attn.q_bias is not None) if type(attn) is EvaAttention else (attn.qkv.bias is not None),
        patch_embed_bias=embed.proj.bias is not None,
        qk_norm=qk_norm,
        eps=eps,
        abs_pos_embed=model.pos_embed is not None,
        rotary="none" if model.rope is None else ("half" if attn.rotate_half else "interleaved"),
        rotary_per_head=model.rope_mixed,
        attn_norm=attn_norm,
        **mlp_fields,
    )


def rotary_tables(model: nn.Module, cfg: ViTConfig) -> Tensor:
    """The timm model's rotary sin / cos table at its built grid: [layer, n_patches, head, 2 * d_head]."""
    rope = model.rope
    if getattr(rope, "feat_shape", None) is not None:
        table = rope.get_embed()
    else:
        table = rope.get_embed(shape=cfg.grid_size)
    if cfg.rotary_per_head:  # [layer, head, n_patches, 2 d_head]
        return rearrange(table, "layer head patch d -> layer patch head d")
    return rearrange(table, "patch d -> 1 patch 1 d").expand(cfg.n_layers, -1, -1, -1)


def config_from_model(model: nn.Module) -> ViTConfig:
    """``config_from_eva`` (the name ``conversion.timm.FAMILY_CONVERTERS`` calls)."""
    return config_from_eva(model)


def state_dict_from_model(model: nn.Module, cfg: ViTConfig) -> dict[str, Tensor]:
    """The HookedViT state dict of a built timm Eva (its rotary tables read at the built grid)."""
    rotary = rotary_tables(model, cfg) if cfg.rotary != "none" else None
    return convert_eva_state_dict(model.state_dict(), cfg, rotary)


def convert_eva_state_dict(state_dict: dict[str, Tensor], cfg: ViTConfig, rotary: Tensor | None = None) -> dict[str, Tensor]:
    """timm Eva state dict -> HookedViT state dict (a pure function).

    Args:
        state_dict: the timm model's state dict; its ``rope.*`` entries are consumed by ``rotary``.
        cfg: from :func:`config_from_eva`.
        rotary: [layer, n_patches, head, 2 * d_head] sin / cos tables (:func:`rotary_tables`),
            required when ``cfg.rotary`` is not "none".

    Raises:
        ValueError: listing timm keys that were left over or missing.
    """
    from vitlens_patch.conversion.timm import (
        StateDictTaker, convert_timm_attention, convert_timm_embeddings, convert_timm_head, convert_timm_mlp,
    )

    if cfg.rotary != "none" and rotary is None:
        raise ValueError("rotary tables must be given for a model with rotary position embeddings")
    keys = StateDictTaker(state_dict, "timm Eva", taken={key for key in state_dict if key.startswith("rope.")})
    out = convert_timm_embeddings(keys, cfg)
    for i in range(cfg.n_layers):
        src = dst = f"blocks.{i}"
        qkv_bias = None
        if cfg.qkv_bias and f"{src}.attn.q_bias" in keys:  # EVA: q and v biases, the key bias is zero
            q_bias = keys.take(f"{src}.attn.q_bias")
            qkv_bias = torch.stack([q_bias, torch.zeros_like(q_bias), keys.take(f"{src}.attn.v_bias")])
        out |= convert_timm_attention(keys, cfg, i, qkv_bias)
        if cfg.attn_norm:
            out |= keys.norm(f"{src}.attn.norm", f"{dst}.attn.ln")
        if cfg.rotary != "none":
            sin, cos = rotary[i].chunk(2, dim=-1)
            out[f"{dst}.attn.rotary.sin"], out[f"{dst}.attn.rotary.cos"] = sin, cos
        out |= convert_timm_mlp(keys, cfg, f"{src}.mlp", f"{dst}.mlp")
        if cfg.layer_scale:
            out[f"{dst}.gamma_attn"] = keys.take(f"{src}.gamma_1")
            out[f"{dst}.gamma_mlp"] = keys.take(f"{src}.gamma_2")
    return keys.finish(out | convert_timm_head(keys, cfg))
