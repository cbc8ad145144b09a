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
    from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

    from vitlens_patch.conversion.timm import (
        activation_name, check_attention_pool, check_timm_norms, timm_blocks, timm_mlp_fields,
    )

    if model.global_pool not in ("token", "avg", "max", "avgmax", "map", ""):
        raise NotImplementedError(f"Eva global_pool={model.global_pool!r} is not supported")
    if model.attn_pool is not None:
        check_attention_pool(model.attn_pool, model)
    if model.global_pool == "" and model.num_classes:
        raise NotImplementedError("Eva global_pool='' with a classifier is not supported; build it with num_classes=0")
    if model.patch_drop is not None and model.training:
        raise NotImplementedError("patch_drop_rate > 0 in training mode is not supported; call model.eval()")
    embed = model.patch_embed
    if type(embed) is not PatchEmbed or embed.dynamic_img_pad or not isinstance(embed.norm, nn.Identity):
        raise NotImplementedError(f"Eva patch embedding {type(embed).__name__} with these options is not supported")
    blocks = timm_blocks(
        model, (EvaBlock, EvaBlockPostNorm), "Eva block type",
        attention_types=(EvaAttention, AttentionRope), mlp_types=(Mlp, GluMlp, SwiGLU),
    )
    first = blocks[0]
    for index, block in enumerate(blocks):
        where = f"blocks.{index}"
        if block.attn.gate is not None:
            raise NotImplementedError(f"{where}: gated attention is not supported")
        if type(block.mlp) is GluMlp and (block.mlp.gate_last or block.mlp.chunk_dim != -1):
            raise NotImplementedError(f"{where}: GluMlp with gate_last=True is not supported")
        if (getattr(block, "gamma_1", None) is None) != (getattr(first, "gamma_1", None) is None) or (
            getattr(block, "gamma_2", None) is None) != (getattr(first, "gamma_2", None) is None):
            raise NotImplementedError(f"{where}: blocks with different options are not supported")
        if getattr(block, "gamma_1", None) is None and getattr(block, "gamma_2", None) is not None:
            raise NotImplementedError(f"{where}: layer scale on the MLP branch only is not supported")
        if (block.attn.qkv is None) != (first.attn.qkv is None):
            raise NotImplementedError(f"{where}: blocks with different options are not supported")
    attn, mlp = first.attn, first.mlp
    norm, eps = check_timm_norms(model, blocks, ("patch_embed.norm", embed.norm))
    if model.rope is not None and type(model.rope).__name__ not in ("RotaryEmbeddingCat", "RotaryEmbeddingDinoV3", "RotaryEmbeddingMixed"):
        raise NotImplementedError(f"rotary embedding {type(model.rope).__name__} is not supported")
    mlp_fields = timm_mlp_fields(mlp, "blocks.0.mlp")
    if (attn.proj.bias is not None) != mlp_fields["proj_bias"]:
        raise NotImplementedError("attention projection and MLP with different bias settings are not supported")
    if model.attn_pool is not None and activation_name(model.attn_pool.mlp.act) != mlp_fields["activation"]:
        raise NotImplementedError("attn_pool: a pooling MLP of another activation than the blocks' is not supported")
    if attn.qkv is not None:
        qkv_bias = (attn.q_bias is not None) if type(attn) is EvaAttention else (attn.qkv.bias is not None)
    else:
        qkv_bias = attn.q_proj.bias is not None
    has_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    has_norm = not isinstance(model.norm, nn.Identity)
    gamma_1, gamma_2 = getattr(first, "gamma_1", None), getattr(first, "gamma_2", None)
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
        pool_include_prefix=model.attn_pool is not None,  # Eva's attention pooling reads every token
        pool_n_heads=model.attn_pool.num_heads if model.attn_pool is not None else 0,  # PE core: 8
        pool_d_mlp=model.attn_pool.mlp.fc1.out_features if model.attn_pool is not None else 0,  # PE core G: 4x
        layer_scale=gamma_1 is not None,
        attn_only_layer_scale=gamma_1 is not None and gamma_2 is None,
        post_norm=type(first) is EvaBlockPostNorm,
        qkv_bias=qkv_bias,
        patch_embed_bias=embed.proj.bias is not None,
        qk_norm=not isinstance(attn.q_norm, nn.Identity),
        norm=norm,
        eps=eps,
        abs_pos_embed=model.pos_embed is not None,
        rotary="none" if model.rope is None else ("half" if attn.rotate_half else "interleaved"),
        rotary_per_head=model.rope_mixed,
        attn_norm=not isinstance(attn.norm, nn.Identity),
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


def fuse_separate_qkv(state_dict: dict[str, Tensor], cfg: ViTConfig) -> dict[str, Tensor]:
    """Separate q / k / v projections (``qkv_fused=False``: EVA-02 B/L, Sapiens2) as the fused
    layout: ``attn.qkv.weight`` [3 * head * d_head, d_model] and biases ``attn.q_bias`` /
    ``k_bias`` / ``v_bias`` (a missing key bias, EVA's, is zero). Grouped-query attention (fewer
    key / value heads) is expanded to one key / value per query head, as timm's
    ``repeat_interleave`` does after the per-head qk-norm and rotation (head h reads key / value
    head h // (head / kv_head)), so every head's q, k and v are exact. Other keys pass unchanged."""
    out = dict(state_dict)
    for i in range(cfg.n_layers):
        src = f"blocks.{i}.attn"
        if f"{src}.q_proj.weight" not in out:
            continue
        weights, biases = [], []
        for name in ("q", "k", "v"):
            weight, bias = out.pop(f"{src}.{name}_proj.weight"), out.pop(f"{src}.{name}_proj.bias", None)
            groups = cfg.n_heads * cfg.d_head // weight.shape[0]
            if groups > 1:  # [kv_head * d_head, d_model] -> [head * d_head, d_model]
                weight = rearrange(weight, "(kv_head d_head) d_model -> kv_head d_head d_model", d_head=cfg.d_head)
                weight = rearrange(weight.repeat_interleave(groups, dim=0), "head d_head d_model -> (head d_head) d_model")
                if bias is not None:
                    bias = rearrange(bias, "(kv_head d_head) -> kv_head d_head", d_head=cfg.d_head)
                    bias = bias.repeat_interleave(groups, dim=0).flatten()
            weights.append(weight)
            biases.append(bias)
        out[f"{src}.qkv.weight"] = torch.cat(weights)
        for name, bias in zip("qkv", biases):
            if bias is not None:
                out[f"{src}.{name}_bias"] = bias
    return out


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
        StateDictTaker, convert_timm_attention, convert_timm_attention_pool, convert_timm_embeddings, convert_timm_head,
        convert_timm_mlp,
    )

    if cfg.rotary != "none" and rotary is None:
        raise ValueError("rotary tables must be given for a model with rotary position embeddings")
    keys = StateDictTaker(
        fuse_separate_qkv(state_dict, cfg), "timm Eva", taken={key for key in state_dict if key.startswith("rope.")}
    )
    out = convert_timm_embeddings(keys, cfg)
    if cfg.pooling == "map":
        out |= convert_timm_attention_pool(keys, cfg)
    for i in range(cfg.n_layers):
        src = dst = f"blocks.{i}"
        qkv_bias = None
        if cfg.qkv_bias and f"{src}.attn.q_bias" in keys:  # EVA: q and v biases, the key bias is zero
            q_bias = keys.take(f"{src}.attn.q_bias")
            k_bias = keys.take(f"{src}.attn.k_bias") if f"{src}.attn.k_bias" in keys else torch.zeros_like(q_bias)
            qkv_bias = torch.stack([q_bias, k_bias, keys.take(f"{src}.attn.v_bias")])
        out |= convert_timm_attention(keys, cfg, i, qkv_bias)
        if cfg.attn_norm:
            out |= keys.norm(f"{src}.attn.norm", f"{dst}.attn.ln")
        if cfg.rotary != "none":
            sin, cos = rotary[i].chunk(2, dim=-1)
            out[f"{dst}.attn.rotary.sin"], out[f"{dst}.attn.rotary.cos"] = sin, cos
        out |= convert_timm_mlp(keys, cfg, f"{src}.mlp", f"{dst}.mlp")
        if cfg.layer_scale:
            out[f"{dst}.gamma_attn"] = keys.take(f"{src}.gamma_1")
            if not cfg.attn_only_layer_scale:
                out[f"{dst}.gamma_mlp"] = keys.take(f"{src}.gamma_2")
    return keys.finish(out | convert_timm_head(keys, cfg))
