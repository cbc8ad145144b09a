"""timm ``Beit`` models (BEiT, BEiT v2) -> HookedViT.

The pieces of ``conversion/eva.py`` (q and v biases with a zero key bias, ``Mlp`` or ``SwiGLU``
MLPs with their sub-LN, layer scale) plus BEiT's relative position bias: each layer's table
(``relative_position_bias_table`` [n_relative_positions, head]) becomes its attention's
``rel_pos.W_rel`` and timm's ``relative_position_index`` its ``rel_pos.index``. A bias shared by
every layer (``use_shared_rel_pos_bias``) is read by the same index, so it is added into each
layer's table (``W_rel = own + shared``: the same sums timm forms, in the table instead of the bias).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitlens_patch.model import ViTConfig


def config_from_model(model: nn.Module) -> ViTConfig:
    """Read a ViTConfig off a built timm ``Beit``, refusing what HookedViT cannot represent.

    Raises:
        NotImplementedError: naming the unsupported layer type or option.
    """
    from timm.layers import Mlp, PatchEmbed, SwiGLU
    from timm.models.beit import Attention, Block

    from vitlens_patch.conversion.timm import layer_norm_eps, timm_blocks, timm_mlp_fields

    if model.global_pool == "" and model.num_classes:
        raise NotImplementedError("Beit global_pool='' with a classifier is not supported; build it with num_classes=0")
    embed = model.patch_embed
    if type(embed) is not PatchEmbed or embed.dynamic_img_pad or not embed.flatten or not isinstance(embed.norm, nn.Identity):
        raise NotImplementedError(f"Beit patch embedding {type(embed).__name__} with these options is not supported")
    blocks = timm_blocks(model, Block, "Beit block type", attention_types=(Attention,), mlp_types=(Mlp, SwiGLU))
    first = blocks[0]
    for index, block in enumerate(blocks):
        where = f"blocks.{index}"
        if (block.attn.relative_position_bias_table is None) != (first.attn.relative_position_bias_table is None):
            raise NotImplementedError(f"{where}: blocks with different options are not supported")
        for name in ("norm1", "norm2"):
            layer_norm_eps(getattr(block, name), f"{where}.{name}")
    eps = layer_norm_eps(first.norm1, "blocks.0.norm1")
    attn, mlp = first.attn, first.mlp
    for name, norm in [("mlp.norm", mlp.norm), ("norm", model.norm), ("fc_norm", model.fc_norm)]:
        if not isinstance(norm, nn.Identity) and layer_norm_eps(norm, name) != eps:
            raise NotImplementedError(f"{name}: a LayerNorm eps different from the blocks' is not supported")
    mlp_fields = timm_mlp_fields(mlp, "blocks.0.mlp")
    if (attn.proj.bias is not None) != mlp_fields["proj_bias"]:
        raise NotImplementedError("attention projection and MLP with different bias settings are not supported")
    table = attn.relative_position_bias_table
    if table is None and model.rel_pos_bias is not None:
        table = model.rel_pos_bias.relative_position_bias_table
    has_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    return ViTConfig(
        n_layers=len(blocks),
        d_model=model.embed_dim,
        n_heads=attn.num_heads,
        d_head=attn.qkv.out_features // (3 * attn.num_heads),
        img_size=tuple(embed.img_size),
        patch_size=tuple(embed.patch_size),
        n_classes=model.num_classes,
        in_chans=embed.proj.in_channels,
        final_norm="pooled" if has_fc_norm else ("tokens" if not isinstance(model.norm, nn.Identity) else "none"),
        pooling=model.global_pool or "none",
        layer_scale=first.gamma_1 is not None,
        qkv_bias=attn.q_bias is not None,
        patch_embed_bias=embed.proj.bias is not None,
        eps=eps,
        abs_pos_embed=model.pos_embed is not None,
        n_relative_positions=0 if table is None else table.shape[0],
        **mlp_fields,
    )


def relative_position_indices(model: nn.Module, cfg: ViTConfig) -> Tensor | None:
    """timm's ``relative_position_index`` [pos, pos] (non-persistent, so not in the state dict), or
    None without a relative position bias."""
    if not cfg.n_relative_positions:
        return None
    source = model.rel_pos_bias if model.rel_pos_bias is not None else model.blocks[0].attn
    for block in model.blocks:  # every layer's index is built from the same grid
        if block.attn.relative_position_index is not None and not torch.equal(
            block.attn.relative_position_index, source.relative_position_index
        ):
            raise NotImplementedError("Beit layers with different relative position indices are not supported")
    return source.relative_position_index.reshape(cfg.n_pos, cfg.n_pos)


def state_dict_from_model(model: nn.Module, cfg: ViTConfig) -> dict[str, Tensor]:
    """The HookedViT state dict of a built timm Beit."""
    return convert_beit_state_dict(model.state_dict(), cfg, relative_position_indices(model, cfg))


def convert_beit_state_dict(
    state_dict: dict[str, Tensor], cfg: ViTConfig, rel_pos_index: Tensor | None = None
) -> dict[str, Tensor]:
    """timm Beit state dict -> HookedViT state dict (a pure function).

    Args:
        state_dict: the timm model's state dict.
        cfg: from :func:`config_from_model`.
        rel_pos_index: [pos, pos] row of the bias table each (query, key) pair reads
            (:func:`relative_position_indices`), required when ``cfg.n_relative_positions``.

    Raises:
        ValueError: listing timm keys that were left over or missing.
    """
    from vitlens_patch.conversion.timm import (
        StateDictTaker, convert_timm_attention, convert_timm_embeddings, convert_timm_head, convert_timm_mlp,
    )

    if cfg.n_relative_positions and rel_pos_index is None:
        raise ValueError("rel_pos_index must be given for a model with a relative position bias")
    keys = StateDictTaker(state_dict, "timm Beit")
    out = convert_timm_embeddings(keys, cfg)
    shared_key = "rel_pos_bias.relative_position_bias_table"
    shared = keys.take(shared_key) if shared_key in keys else None
    for i in range(cfg.n_layers):
        src = dst = f"blocks.{i}"
        qkv_bias = None
        if cfg.qkv_bias:  # q and v biases; the key bias is zero
            q_bias = keys.take(f"{src}.attn.q_bias")
            qkv_bias = torch.stack([q_bias, torch.zeros_like(q_bias), keys.take(f"{src}.attn.v_bias")])
        out |= convert_timm_attention(keys, cfg, i, qkv_bias)
        if cfg.n_relative_positions:
            own_key = f"{src}.attn.relative_position_bias_table"
            if shared is None or own_key in keys:  # the layer's own table (a missing one is an error)
                own = keys.take(own_key)
                out[f"{dst}.attn.rel_pos.W_rel"] = own if shared is None else own + shared
            else:
                out[f"{dst}.attn.rel_pos.W_rel"] = shared
            out[f"{dst}.attn.rel_pos.index"] = rel_pos_index
        out |= convert_timm_mlp(keys, cfg, f"{src}.mlp", f"{dst}.mlp")
        if cfg.layer_scale:
            out[f"{dst}.gamma_attn"] = keys.take(f"{src}.gamma_1")
            out[f"{dst}.gamma_mlp"] = keys.take(f"{src}.gamma_2")
    return keys.finish(out | convert_timm_head(keys, cfg))
