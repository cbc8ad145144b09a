"""timm ``NaFlexVit`` models (``naflexvit_*``: NaFlex SigLIP-style ViTs, C-RADIO) -> HookedViT at a
fixed input size.

On a batch of images (timm's standard mode, not a NaFlex dict of patches) a NaFlexVit is a plain
ViT: patches embedded by a linear layer on flattened pixels (``embed_proj_type='linear'``, the
same map as a stride-``patch_size`` convolution, whose weight it becomes) or a convolution, learned
or factorised position embeddings on the patches only, resampled to the patch grid, then timm
``Block``s, pooling and the classifier. HookedViT converts it at one input size, the size timm's
data config preprocesses to: ``img_size`` when the model was built with one and no
``pos_embed_grid_size``, else ``resolve_model_data_config(model)["input_size"]``. The position
embeddings are resampled once there, by timm's own code, and become ``pos_embed.W_pos``
[n_patches, d_model] (a factorised model's row and column tables are summed into it); a model
converted at one size is exact at that size only. NaFlex features that need another layout are
refused by name: rotary embeddings / EVA blocks, an input norm on the flattened pixels,
dynamic padding.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from vitlens_patch.model import ViTConfig


def naflex_input_size(model: nn.Module) -> tuple[int, int]:
    """The (height, width) a NaFlexVit is converted at (see the module docstring)."""
    from timm.data import resolve_model_data_config

    if model.embeds.default_img_size is not None:
        return tuple(model.embeds.default_img_size)
    return tuple(resolve_model_data_config(model)["input_size"][1:])


def config_from_model(model: nn.Module) -> ViTConfig:
    """Read a ViTConfig off a built timm ``NaFlexVit`` at its input size (``naflex_input_size``).

    Raises:
        NotImplementedError: naming the unsupported layer type or option.
    """
    from timm.models.vision_transformer import Block

    from vitlens_patch.conversion.timm import check_attention_pool, check_timm_norms, shared_block_fields, timm_blocks

    embeds = model.embeds
    if model.rope is not None:
        raise NotImplementedError("NaFlexVit with rotary position embeddings (rope_type) is not supported")
    if embeds.norm_input is not None:
        raise NotImplementedError("NaFlexVit input_norm_layer (a norm on the flattened patch pixels) is not supported")
    if embeds.dynamic_img_pad:
        raise NotImplementedError("NaFlexVit dynamic_img_pad=True is not supported; use an input size divisible by the patch size")
    if isinstance(embeds.proj, nn.Conv2d) and (embeds.proj.stride != embeds.proj.kernel_size or embeds.proj.padding != (0, 0)):
        raise NotImplementedError("NaFlexVit patch embedding without a non-overlapping patch projection is not supported")
    if model.patch_drop is not None and model.training:
        raise NotImplementedError("patch_drop_rate > 0 in training mode is not supported; call model.eval()")
    if model.global_pool == "" and model.num_classes:
        raise NotImplementedError("NaFlexVit global_pool='' with a classifier is not supported; build it with num_classes=0")
    if model.attn_pool is not None:
        check_attention_pool(model.attn_pool, model)
    img_size = naflex_input_size(model)
    if any(size % patch for size, patch in zip(img_size, embeds.patch_size)):
        raise NotImplementedError(
            f"NaFlexVit input size {img_size} not divisible by the patch size {embeds.patch_size} is not supported"
        )
    blocks = timm_blocks(model, Block, "NaFlexVit block type")
    block_fields = shared_block_fields(blocks)
    norm, eps = check_timm_norms(model, blocks, ("embeds.norm", embeds.norm))
    has_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    has_norm = not isinstance(model.norm, nn.Identity)
    return ViTConfig(
        n_layers=len(blocks),
        d_model=model.embed_dim,
        img_size=img_size,
        patch_size=tuple(embeds.patch_size),
        in_chans=embeds.in_chans,
        patch_embed_bias=embeds.proj.bias is not None,
        embed_norm=not isinstance(embeds.norm, nn.Identity),
        n_classes=model.num_classes,
        class_token=embeds.cls_token is not None,
        n_register_tokens=embeds.num_reg_tokens,
        pos_embed_prefix=False,  # NaFlex adds position embeddings to the patches only
        abs_pos_embed=embeds.pos_embed_type != "none",
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm="pooled" if has_fc_norm else ("tokens" if has_norm else "none"),
        pooling=model.global_pool or "none",
        pool_include_prefix=bool(model.pool_include_prefix) and model.global_pool not in ("token", ""),
        norm=norm,
        eps=eps,
        **block_fields,
    )


@torch.no_grad()
def position_embedding(model: nn.Module, cfg: ViTConfig) -> Tensor | None:
    """The position embedding timm adds to the patch tokens at ``cfg.img_size``: [n_patches, d_model],
    computed by the model's own resampling code (on zeros, so the result is exactly what is added);
    None without position embeddings."""
    embeds = model.embeds
    if embeds.pos_embed_type == "none":
        return None
    tokens = torch.zeros(1, cfg.n_patches, cfg.d_model, device=embeds.proj.weight.device, dtype=embeds.proj.weight.dtype)
    if embeds.pos_embed_type == "learned":
        embeds._apply_learned_pos_embed(tokens, grid_size=list(cfg.grid_size))
    elif embeds.pos_embed_type == "factorized":
        embeds._apply_factorized_pos_embed(tokens, grid_size=list(cfg.grid_size))
    else:
        raise NotImplementedError(f"NaFlexVit pos_embed={embeds.pos_embed_type!r} is not supported")
    return tokens[0]


def state_dict_from_model(model: nn.Module, cfg: ViTConfig) -> dict[str, Tensor]:
    """The HookedViT state dict of a built timm ``NaFlexVit`` at ``cfg.img_size``."""
    linear = isinstance(model.embeds.proj, nn.Linear)
    return convert_naflexvit_state_dict(
        model.state_dict(), cfg, position_embedding(model, cfg),
        patch_layout=None if not linear else ("channels_last" if model.embeds.channels_last else "channels_first"),
    )


def convert_naflexvit_state_dict(
    state_dict: dict[str, Tensor], cfg: ViTConfig, pos_embed: Tensor | None, patch_layout: str | None = "channels_last"
) -> dict[str, Tensor]:
    """timm ``NaFlexVit`` state dict -> HookedViT state dict (a pure function).

    The embedding keys (``embeds.*``) are renamed to timm ``VisionTransformer``'s, then converted as
    ``convert_timm_state_dict`` converts those.

    Args:
        state_dict: the timm model's state dict; its position embedding tables are consumed by ``pos_embed``.
        cfg: from :func:`config_from_model`.
        pos_embed: [n_patches, d_model] from :func:`position_embedding` (None without one).
        patch_layout: how the linear patch projection reads a flattened patch, "channels_last"
            ((patch_h, patch_w, channel), NaFlex's default) or "channels_first"; None for a
            convolutional projection.

    Raises:
        ValueError: listing timm keys that were left over or missing.
    """
    from vitlens_patch.conversion.timm import convert_timm_state_dict

    if cfg.abs_pos_embed and pos_embed is None:
        raise ValueError("pos_embed must be given for a model with position embeddings")
    source = dict(state_dict)
    for table in ("embeds.pos_embed", "embeds.pos_embed_y", "embeds.pos_embed_x"):
        source.pop(table, None)
    renamed = {}
    for key, value in source.items():
        if key.startswith("embeds."):
            name = key[len("embeds."):]
            key = name if name in ("cls_token", "reg_token") else f"patch_embed.{name}"
        renamed[key] = value
    weight = renamed.get("patch_embed.proj.weight")
    if patch_layout is not None and weight is not None:  # Linear [d_model, pixels] -> Conv2d [d_model, c, ph, pw]
        pattern = {
            "channels_last": "d_model (patch_h patch_w channel) -> d_model channel patch_h patch_w",
            "channels_first": "d_model (channel patch_h patch_w) -> d_model channel patch_h patch_w",
        }[patch_layout]
        renamed["patch_embed.proj.weight"] = rearrange(weight, pattern, patch_h=cfg.patch_size[0], patch_w=cfg.patch_size[1])
    if pos_embed is not None:
        renamed["pos_embed"] = pos_embed[None]
    return convert_timm_state_dict(renamed, cfg)
