"""timm ``VisionTransformerRelPos`` models (``vit_relpos_*``, ``vit_srelpos_*``) -> HookedViT.

A ViT without absolute position embeddings whose attention adds a relative position bias: a
learned table (``RelPosBias``) or the output of a small MLP on log-spaced relative coordinates
(``RelPosMlp``, the published models). Either becomes each layer's ``attn.rel_pos``: the table
``W_rel`` [n_relative_positions, head] read through ``index`` [pos, pos]. The MLP depends on no
input, so it is evaluated once at conversion (in eval mode, as timm evaluates it at inference)
and its output table, after the MLP bias activation and gain, is ``W_rel``: the MLP's own weights
are not kept. Prefix tokens, which the MLP bias pads with zeros, read an extra zero row. A bias
shared by every layer (``shared_rel_pos=True``) is copied into each layer. Post-norm blocks
(``ResPostRelPosBlock``, the ``*_rpn_*`` models) set ``cfg.post_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlens_patch.model import ViTConfig


def config_from_model(model: nn.Module) -> ViTConfig:
    """Read a ViTConfig off a built timm ``VisionTransformerRelPos``.

    Raises:
        NotImplementedError: naming the unsupported layer type or option.
    """
    from timm.layers import Mlp, PatchEmbed
    from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, ResPostRelPosBlock

    from vitlens_patch.conversion.timm import activation_name, layer_norm_eps, timm_blocks

    if model.global_pool == "" and model.num_classes:
        raise NotImplementedError(
            "VisionTransformerRelPos global_pool='' with a classifier is not supported; build it with num_classes=0"
        )
    embed = model.patch_embed
    if type(embed) is not PatchEmbed or embed.dynamic_img_pad or not embed.flatten or not isinstance(embed.norm, nn.Identity):
        raise NotImplementedError(f"patch embedding {type(embed).__name__} with these options is not supported")
    blocks = timm_blocks(
        model, (RelPosBlock, ResPostRelPosBlock), attention_types=(RelPosAttention,), mlp_types=(Mlp,)
    )
    first = blocks[0]
    for index, block in enumerate(blocks):
        where = f"blocks.{index}"
        if not isinstance(block.mlp.norm, nn.Identity):
            raise NotImplementedError(f"{where}: an MLP norm is not supported")
        if (block.attn.rel_pos is None) != (first.attn.rel_pos is None):
            raise NotImplementedError(f"{where}: blocks with different options are not supported")
        if type(block) is RelPosBlock and type(block.ls1) is not type(first.ls1):
            raise NotImplementedError(f"{where}: blocks with different options are not supported")
        for name in ("norm1", "norm2"):
            layer_norm_eps(getattr(block, name), f"{where}.{name}")
    eps = layer_norm_eps(first.norm1, "blocks.0.norm1")
    attn = first.attn
    qk_norm = not isinstance(attn.q_norm, nn.Identity)
    for name, norm in [("q_norm", attn.q_norm), ("norm", model.norm), ("fc_norm", model.fc_norm)]:
        if not isinstance(norm, nn.Identity) and layer_norm_eps(norm, name) != eps:
            raise NotImplementedError(f"{name}: a LayerNorm eps different from the blocks' is not supported")
    if (attn.proj.bias is not None) != (first.mlp.fc1.bias is not None):
        raise NotImplementedError("attention projection and MLP with different bias settings are not supported")
    rel_pos = attn.rel_pos if attn.rel_pos is not None else model.shared_rel_pos
    n_relative = 0 if rel_pos is None else len(relative_position_table(rel_pos, model.num_prefix_tokens)[0])
    has_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    post_norm = type(first) is ResPostRelPosBlock
    return ViTConfig(
        n_layers=len(blocks),
        d_model=model.embed_dim,
        n_heads=attn.num_heads,
        d_head=attn.head_dim,
        d_mlp=first.mlp.fc1.out_features,
        img_size=tuple(embed.img_size),
        patch_size=tuple(embed.patch_size),
        n_classes=model.num_classes,
        in_chans=embed.proj.in_channels,
        class_token=model.cls_token is not None,
        final_norm="pooled" if has_fc_norm else ("tokens" if not isinstance(model.norm, nn.Identity) else "none"),
        pooling=model.global_pool or "none",
        layer_scale=not post_norm and not isinstance(first.ls1, nn.Identity),
        qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
        patch_embed_bias=embed.proj.bias is not None,
        qk_norm=qk_norm,
        activation=activation_name(first.mlp.act),
        eps=eps,
        abs_pos_embed=False,
        n_relative_positions=n_relative,
        post_norm=post_norm,
    )


@torch.no_grad()
def relative_position_table(rel_pos: nn.Module, n_prefix_tokens: int) -> tuple[Tensor, Tensor]:
    """A timm ``RelPosBias`` or ``RelPosMlp`` as HookedViT's (W_rel [n_relative_positions, head],
    index [pos, pos]): ``W_rel[index]`` is the module's ``get_bias()`` [head, pos, pos], permuted.

    Raises:
        NotImplementedError: for any other relative position module (e.g. ``RelPosBiasTf``).
    """
    from timm.layers import RelPosBias, RelPosMlp

    if type(rel_pos) is RelPosBias:
        n_pos = rel_pos.window_area + rel_pos.prefix_tokens
        return rel_pos.relative_position_bias_table.detach(), rel_pos.relative_position_index.view(n_pos, n_pos)
    if type(rel_pos) is not RelPosMlp:
        raise NotImplementedError(f"relative position module {type(rel_pos).__name__} is not supported")
    training = rel_pos.training
    rel_pos.eval()  # the MLP's dropout is off at inference, where timm evaluates it too
    try:
        # the same MLP call on the same [2 * grid_h - 1, 2 * grid_w - 1, 2] coordinates as get_bias
        table = rel_pos.mlp(rel_pos.rel_coords_log).reshape(-1, rel_pos.num_heads)
    finally:
        rel_pos.train(training)
    table = rel_pos.bias_act(table)  # elementwise, so applying it before the lookup changes nothing
    if rel_pos.bias_gain is not None:
        table = rel_pos.bias_gain * table
    index = rel_pos.relative_position_index.view(rel_pos.window_area, rel_pos.window_area)
    if rel_pos.prefix_tokens:  # timm pads the bias with zeros for prefix tokens: an extra zero row
        table = torch.cat([table, table.new_zeros(1, rel_pos.num_heads)])
        prefix = rel_pos.prefix_tokens
        index = F.pad(index, (prefix, 0, prefix, 0), value=len(table) - 1)
    if n_prefix_tokens != rel_pos.prefix_tokens:
        raise NotImplementedError("a relative position bias that does not cover the prefix tokens is not supported")
    return table, index


def state_dict_from_model(model: nn.Module, cfg: ViTConfig) -> dict[str, Tensor]:
    """The HookedViT state dict of a built timm ``VisionTransformerRelPos``."""
    tables = None
    if cfg.n_relative_positions:
        tables = [
            relative_position_table(block.attn.rel_pos if block.attn.rel_pos is not None else model.shared_rel_pos,
                                    model.num_prefix_tokens)
            for block in model.blocks
        ]
    return convert_relpos_state_dict(model.state_dict(), cfg, tables)


def convert_relpos_state_dict(
    state_dict: dict[str, Tensor], cfg: ViTConfig, rel_pos_tables: list[tuple[Tensor, Tensor]] | None = None
) -> dict[str, Tensor]:
    """timm ``VisionTransformerRelPos`` state dict -> HookedViT state dict (a pure function).

    Args:
        state_dict: the timm model's state dict; its relative position entries (``*rel_pos.*``)
            are consumed by ``rel_pos_tables``.
        cfg: from :func:`config_from_model`.
        rel_pos_tables: per layer (W_rel, index) from :func:`relative_position_table`, required
            when ``cfg.n_relative_positions``.

    Raises:
        ValueError: listing timm keys that were left over or missing.
    """
    from vitlens_patch.conversion.timm import (
        StateDictTaker, convert_timm_attention, convert_timm_embeddings, convert_timm_head, convert_timm_mlp,
    )

    if cfg.n_relative_positions and (rel_pos_tables is None or len(rel_pos_tables) != cfg.n_layers):
        raise ValueError(f"rel_pos_tables must give one (W_rel, index) pair per layer ({cfg.n_layers})")
    rel_pos_keys = {key for key in state_dict if key.startswith("shared_rel_pos.") or ".attn.rel_pos." in key}
    keys = StateDictTaker(state_dict, "timm VisionTransformerRelPos", taken=rel_pos_keys)
    out = convert_timm_embeddings(keys, cfg)
    for i in range(cfg.n_layers):
        src = dst = f"blocks.{i}"
        out |= convert_timm_attention(keys, cfg, i) | convert_timm_mlp(keys, cfg, f"{src}.mlp", f"{dst}.mlp")
        if cfg.n_relative_positions:
            out[f"{dst}.attn.rel_pos.W_rel"], out[f"{dst}.attn.rel_pos.index"] = rel_pos_tables[i]
        if cfg.layer_scale:
            out[f"{dst}.gamma_attn"] = keys.take(f"{src}.ls1.gamma")
            out[f"{dst}.gamma_mlp"] = keys.take(f"{src}.ls2.gamma")
    return keys.finish(out | convert_timm_head(keys, cfg))
