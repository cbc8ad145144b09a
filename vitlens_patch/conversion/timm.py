"""timm VisionTransformer -> HookedViT: config, state dict and data config.

Supported: ``timm.models.vision_transformer.VisionTransformer`` and DeiT's
``VisionTransformerDistilled``: class / register / distillation tokens, learned position
embeddings (with or without prefix positions), pre-norm, LayerNorm or RMSNorm, token / avg / max /
avgmax pooling with or without fc_norm, attention pooling (``global_pool='map'``), layer scale,
qk-norm, ``scale_attn_norm`` / ``scale_mlp_norm``, Mlp / SwiGLU / packed GluMlp MLPs, a norm inside
the patch embedding (``embed_norm_layer``), ``HybridEmbed`` CNN stems, any image and patch size.
Anything else raises ``NotImplementedError`` naming the feature.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from vitlens_patch.conversion.checks import load_state_dict_strictly
from vitlens_patch.model.config import ViTConfig
from vitlens_patch.model.hooked_vit import HookedViT
from vitlens_patch.model.preprocess import DataConfig


def activation_name(act: nn.Module) -> str:
    """The ViTConfig activation name of a timm MLP activation module."""
    from timm.layers import activations

    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if isinstance(act, activations.GELUTanh):
        return "gelu_tanh"
    if isinstance(act, activations.GELU):
        return "gelu"
    if isinstance(act, activations.QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.SiLU):
        return "silu"
    raise NotImplementedError(f"MLP activation {type(act).__name__} is not supported")


def layer_norm_eps(norm: nn.Module, where: str) -> float:
    """A timm norm layer's eps; ``NotImplementedError`` naming ``where`` unless it is an affine LayerNorm."""
    from timm.layers import LayerNorm as TimmLayerNorm

    if type(norm) not in (nn.LayerNorm, TimmLayerNorm):
        raise NotImplementedError(f"{where}: normalisation {type(norm).__name__} is not supported (LayerNorm only)")
    if not norm.elementwise_affine or norm.bias is None:
        raise NotImplementedError(f"{where}: LayerNorm without affine weight and bias is not supported")
    return norm.eps


def check_norms_agree(norms: list[tuple[str, nn.Module]], norm: str, eps: float) -> None:
    """Refuse any named norm (Identity aside) whose kind or eps differs from the blocks' ``(norm, eps)``."""
    for name, layer in norms:
        if not isinstance(layer, nn.Identity) and norm_kind(layer, name) != (norm, eps):
            raise NotImplementedError(f"{name}: a norm kind or eps different from the blocks' is not supported")


def norm_kind(norm: nn.Module, where: str) -> tuple[str, float]:
    """A timm norm layer's ViTConfig ``norm`` kind and eps: an affine LayerNorm or an affine
    ``RmsNorm``; anything else raises ``NotImplementedError`` naming ``where``."""
    from timm.layers import RmsNorm

    if type(norm) is RmsNorm:
        if not norm.elementwise_affine:
            raise NotImplementedError(f"{where}: RmsNorm without affine weight is not supported")
        return "rms_norm", norm.eps
    return "layer_norm", layer_norm_eps(norm, where)


def timm_blocks(
    model: nn.Module,
    block_types: type | tuple[type, ...],
    what: str = "block type",
    *,
    attention_types: tuple[type, ...] = (),
    mlp_types: tuple[type, ...] = (),
) -> list[nn.Module]:
    """The model's blocks, refusing (``NotImplementedError`` naming the block) one whose type is
    not among ``block_types`` (``what`` names it) or whose ``attn`` / ``mlp`` type is not among
    ``attention_types`` / ``mlp_types`` (when given), and blocks whose types differ from the first's."""
    blocks = list(model.blocks)
    allowed = [
        (what, None, block_types if isinstance(block_types, tuple) else (block_types,)),
        ("attention type", "attn", attention_types),
        ("MLP type", "mlp", mlp_types),
    ]
    for index, block in enumerate(blocks):
        for label, part, types in allowed:
            if not types:
                continue
            layer, first = (block, blocks[0]) if part is None else (getattr(block, part), getattr(blocks[0], part))
            if type(layer) not in types:
                raise NotImplementedError(f"blocks.{index}: {label} {type(layer).__name__} is not supported")
            if type(layer) is not type(first):
                raise NotImplementedError(f"blocks.{index}: blocks with different options are not supported")
    return blocks


def check_timm_norms(model: nn.Module, blocks: list[nn.Module], embed_norm: tuple[str, nn.Module]) -> tuple[str, float]:
    """The blocks' ``(norm kind, eps)`` (of the first block's first norm), refusing any norm of the
    blocks, the model (``norm``, ``fc_norm``, ``norm_pre``, an attention pool's) or ``embed_norm``
    (name, module) of another kind or eps."""
    norms = [norm for index, block in enumerate(blocks) for norm in timm_block_norms(block, f"blocks.{index}")]
    norm, eps = norm_kind(norms[0][1], norms[0][0])
    norms += [("norm", model.norm), ("fc_norm", model.fc_norm), ("norm_pre", model.norm_pre), embed_norm]
    if model.attn_pool is not None:
        norms.append(("attn_pool.norm", model.attn_pool.norm))
    check_norms_agree(norms, norm, eps)
    return norm, eps


# timm model classes other than VisionTransformer, each converted by its own module under
# conversion/, which defines config_from_model(model) -> ViTConfig and
# state_dict_from_model(model, cfg) -> HookedViT state dict.
FAMILY_CONVERTERS = {
    "timm.models.eva.Eva": "vitlens_patch.conversion.eva",
    "timm.models.beit.Beit": "vitlens_patch.conversion.beit",
    "timm.models.vision_transformer_relpos.VisionTransformerRelPos": "vitlens_patch.conversion.relpos",
    "timm.models.naflexvit.NaFlexVit": "vitlens_patch.conversion.naflexvit",
}


def family_converter(model: nn.Module):
    """The conversion module for ``model``'s timm class (see ``FAMILY_CONVERTERS``), or None."""
    cls = type(model)
    module = FAMILY_CONVERTERS.get(f"{cls.__module__}.{cls.__qualname__}")
    return None if module is None else importlib.import_module(module)


def config_from_timm(model: nn.Module) -> ViTConfig:
    """Read a ViTConfig off a built timm VisionTransformer, refusing what HookedViT cannot represent.

    Raises:
        NotImplementedError: naming the unsupported model class, layer type or flag.
    """
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    family = family_converter(model)
    if family is not None:
        return family.config_from_model(model)
    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(
            f"model class {type(model).__name__} is not supported; HookedViT converts timm "
            f"VisionTransformer (vit_*, deit_*) and {', '.join(name.rsplit('.', 1)[1] for name in FAMILY_CONVERTERS)} models"
        )
    distilled = isinstance(model, VisionTransformerDistilled)
    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        raise NotImplementedError(f"VisionTransformer subclass {type(model).__name__} is not supported")
    if model.global_pool not in ("token", "avg", "max", "avgmax", "map", ""):
        raise NotImplementedError(f"global_pool={model.global_pool!r} is not supported" + (" (attention pooling AttentionPoolPrr)" if model.global_pool == "prr" else ""))
    if model.attn_pool is not None:
        check_attention_pool(model.attn_pool, model)
    if model.global_pool == "" and model.num_classes:
        raise NotImplementedError(
            "global_pool='' with a classifier (logits for every token) is not supported; build it "
            "with num_classes=0 for the tokens"
        )
    if model.pos_embed is None:
        raise NotImplementedError("pos_embed='none' (no position embedding) is not supported")
    embed_fields = timm_embed_fields(model.patch_embed, model.dynamic_img_size)
    if not isinstance(model.patch_drop, nn.Identity) and model.training:
        raise NotImplementedError("patch_drop_rate > 0 in training mode is not supported; call model.eval()")

    blocks = list(model.blocks)
    block_fields = shared_block_fields(blocks)

    norm, eps = check_timm_norms(model, blocks, ("patch_embed.norm", getattr(model.patch_embed, "norm", nn.Identity())))
    has_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    has_norm = not isinstance(model.norm, nn.Identity)
    pre_norm = not isinstance(model.norm_pre, nn.Identity)

    return ViTConfig(
        n_layers=len(blocks),
        d_model=model.embed_dim,
        n_classes=model.num_classes,
        class_token=model.cls_token is not None,
        n_register_tokens=model.num_reg_tokens,
        distilled=distilled,
        pos_embed_prefix=not model.no_embed_class,
        pre_norm=pre_norm,
        final_norm="pooled" if has_fc_norm else ("tokens" if has_norm else "none"),
        pooling="distilled" if distilled else (model.global_pool or "none"),
        pool_include_prefix=bool(model.pool_include_prefix) and model.global_pool not in ("token", ""),
        pool_n_heads=model.attn_pool.num_heads if model.attn_pool is not None else 0,
        pool_d_mlp=model.attn_pool.mlp.fc1.out_features if model.attn_pool is not None else 0,
        norm=norm,
        eps=eps,
        dynamic_img_size=bool(model.dynamic_img_size),
        **embed_fields,
        **block_fields,
    )


def timm_embed_fields(embed: nn.Module, dynamic_img_size: bool = False) -> dict:
    """ViTConfig fields of a timm ``PatchEmbed`` (with or without a norm inside) or ``HybridEmbed``
    (a CNN stem, then the patch projection); with ``dynamic_img_size`` the embedding's NHWC output
    (flattened after the position embedding) is expected."""
    from timm.layers import Format, HybridEmbed, PatchEmbed

    flat = embed.output_fmt == Format.NHWC if dynamic_img_size else embed.flatten
    if type(embed) not in (PatchEmbed, HybridEmbed) or not flat or embed.dynamic_img_pad:
        raise NotImplementedError(f"patch embedding {type(embed).__name__} with these options is not supported")
    projected = not (type(embed) is HybridEmbed and isinstance(embed.proj, nn.Identity))
    if projected and (not isinstance(embed.proj, nn.Conv2d) or embed.proj.stride != embed.proj.kernel_size
                      or embed.proj.padding != (0, 0)):
        raise NotImplementedError(f"patch embedding {type(embed).__name__} without a non-overlapping patch projection is not supported")
    # a HybridEmbed without projection (proj=False: the stem's channels are the tokens) gets the identity as W_E
    fields = dict(img_size=tuple(embed.img_size), patch_embed_bias=projected and embed.proj.bias is not None,
                  in_chans=embed.proj.in_channels if projected else embed.in_chans)
    if type(embed) is PatchEmbed:
        return fields | dict(patch_size=tuple(embed.patch_size), embed_norm=not isinstance(embed.norm, nn.Identity))
    stride = tuple(embed.feature_ratio)
    patch_size = tuple(r * p for r, p in zip(stride, embed.patch_size))
    grid = tuple(i // p for i, p in zip(embed.img_size, patch_size))
    if grid != tuple(embed.grid_size) or any(i % r for i, r in zip(embed.img_size, stride)):
        raise NotImplementedError(
            f"HybridEmbed whose feature map {tuple(embed.feature_size)} is not img_size {tuple(embed.img_size)} "
            f"/ feature_ratio {stride} is not supported"
        )
    return fields | dict(patch_size=patch_size, in_chans=embed.in_chans, stem_channels=embed.feature_dim,
                         stem_stride=stride)


def timm_mlp_fields(mlp: nn.Module, where: str) -> dict:
    """ViTConfig fields of a timm ``Mlp``, packed ``GluMlp`` (gate first, SwiGLUPacked) or ``SwiGLU``,
    with or without the hidden norm (``scale_mlp_norm``)."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    if type(mlp) not in (Mlp, GluMlp, SwiGLU) or not isinstance(mlp.fc2, nn.Linear):
        raise NotImplementedError(f"{where}: MLP type {type(mlp).__name__} is not supported")
    if type(mlp) is GluMlp and (mlp.gate_last or mlp.chunk_dim != -1):
        raise NotImplementedError(f"{where}: GluMlp with gate_last=True is not supported")
    fc1 = mlp.fc1_g if type(mlp) is SwiGLU else mlp.fc1
    return dict(
        d_mlp=fc1.out_features // (2 if type(mlp) is GluMlp else 1),
        gated_mlp=type(mlp) is not Mlp,
        mlp_norm=not isinstance(mlp.norm, nn.Identity),
        activation=activation_name(mlp.act),
        proj_bias=mlp.fc2.bias is not None,
    )


def shared_block_fields(blocks: list[nn.Module]) -> dict:
    """The ViTConfig fields every block shares (``timm_block_fields``); ``NotImplementedError`` for
    blocks with different options."""
    block_fields = [timm_block_fields(block, f"blocks.{index}") for index, block in enumerate(blocks)]
    for index, fields in enumerate(block_fields):
        if fields != block_fields[0]:
            raise NotImplementedError(f"blocks.{index}: blocks with different options are not supported")
    return block_fields[0]


def timm_block_fields(block: nn.Module, where: str) -> dict:
    """ViTConfig fields of one timm block: ``Block``, post-norm ``ResPostBlock`` or
    ``ParallelScalingBlock``; any other block type raises ``NotImplementedError`` naming it."""
    from timm.layers import DiffAttention
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import (
        Block, DiffParallelScalingBlock, ParallelScalingBlock, ParallelThingsBlock, ResPostBlock,
    )

    if type(block) in (ParallelScalingBlock, DiffParallelScalingBlock):
        return parallel_scaling_block_fields(block, where)
    if type(block) is ParallelThingsBlock:
        return parallel_things_block_fields(block, where)
    if type(block) not in (Block, ResPostBlock, _ParallelBranch):
        raise NotImplementedError(f"{where}: block type {type(block).__name__} is not supported")
    attn = block.attn
    diff = type(attn) is DiffAttention
    if not diff and (type(attn) is not Attention or attn.gate is not None):
        raise NotImplementedError(f"{where}: attention type {type(attn).__name__} is not supported")
    if diff:
        check_diff_attention(attn, f"{where}.attn")
    mlp = timm_mlp_fields(block.mlp, f"{where}.mlp")
    if (attn.proj.bias is not None) != mlp["proj_bias"]:
        raise NotImplementedError(f"{where}: an attention projection bias without MLP biases (or back) is not supported")
    return mlp | dict(
        n_heads=attn.num_heads,
        d_head=attn.head_dim,
        qkv_bias=attn.qkv.bias is not None,
        qk_norm=not isinstance(attn.q_norm, nn.Identity),
        attn_norm=not isinstance(attn.norm, nn.Identity),
        layer_scale=type(block) is Block and not isinstance(block.ls1, nn.Identity),
        post_norm=type(block) is ResPostBlock,
        diff_attention=diff,
    )


def check_diff_attention(attn: nn.Module, where: str) -> None:
    """Refuse a timm differential attention (``DiffAttention``, ``DiffParallelScalingBlock``) that
    ``components.DiffAttention`` does not represent: its sub-norm must be timm's RmsNorm, eps 1e-5,
    and ``lambda_init`` the depth formula's value (which the state-dict conversion recomputes)."""
    from timm.layers import RmsNorm

    if type(attn.sub_norm) is not RmsNorm or attn.sub_norm.eps != 1e-5:
        raise NotImplementedError(f"{where}: differential attention sub_norm other than RmsNorm(eps=1e-5) is not supported")
    depths = [d for d in range(64) if abs(attn.lambda_init - (0.8 - 0.6 * math.exp(-0.3 * d))) < 1e-12]
    if not depths:
        raise NotImplementedError(f"{where}: differential attention lambda_init {attn.lambda_init} not from timm's depth formula")


def parallel_scaling_block_fields(block: nn.Module, where: str) -> dict:
    """ViTConfig fields of a timm ``ParallelScalingBlock`` (one norm, one fused in-projection for
    the MLP and q / k / v, attention and MLP added together; ViT-22B)."""
    from timm.models.vision_transformer import DiffParallelScalingBlock

    diff = type(block) is DiffParallelScalingBlock
    if diff:
        check_diff_attention(block, where)
    out_proj = block.out_proj if getattr(block, "out_proj", None) is not None else block.attn_out_proj
    if out_proj.bias is None:
        # the MLP's input bias always exists (in in_proj.bias or mlp_bias); HookedViT ties it to proj_bias
        raise NotImplementedError(f"{where}: ParallelScalingBlock with proj_bias=False is not supported")
    return dict(
        n_heads=block.num_heads,
        d_head=block.head_dim,
        d_mlp=block.in_split[0],
        gated_mlp=False,
        mlp_norm=False,
        activation=activation_name(block.mlp_act),
        proj_bias=True,
        qkv_bias=block.in_proj.bias is not None,
        qk_norm=not isinstance(block.q_norm, nn.Identity),
        attn_norm=False,
        layer_scale=not isinstance(block.ls, nn.Identity),
        parallel_attn_mlp=True,
        diff_attention=diff,
    )


def parallel_things_block_fields(block: nn.Module, where: str) -> dict:
    """ViTConfig fields of a timm ``ParallelThingsBlock`` ("Three things everyone should know",
    ``*_18x2_*``): ``n`` attention branches, each with its own norm and layer scale, summed into
    the residual stream, then ``n`` MLP branches likewise. It converts exactly into one standard
    block: the branches' attention heads side by side (``n * heads`` heads) and their MLP hidden
    units side by side (``n * d_mlp``), each branch's norm weight / bias folded into its input
    projections (so ``ln1`` / ``ln2`` only normalise) and its layer scale into its output projection."""
    fields = []
    for index, (attn, ffn) in enumerate(zip(block.attns, block.ffns)):
        branch = timm_block_fields(_ParallelBranch(attn, ffn), f"{where}.attns.{index}")
        if branch["qk_norm"] or branch["attn_norm"] or branch["mlp_norm"] or branch["gated_mlp"] or branch["diff_attention"]:
            raise NotImplementedError(
                f"{where}: ParallelThingsBlock with qk-norm, scale norms, gated MLPs or differential attention is not supported"
            )
        fields.append(branch)
    if any(branch != fields[0] for branch in fields):
        raise NotImplementedError(f"{where}: ParallelThingsBlock branches with different options are not supported")
    n = len(fields)
    return fields[0] | dict(n_heads=n * fields[0]["n_heads"], d_mlp=n * fields[0]["d_mlp"], qkv_bias=True,
                            proj_bias=True, layer_scale=False)


class _ParallelBranch(nn.Module):
    """One attention / MLP branch pair of a ``ParallelThingsBlock`` seen as a timm ``Block``."""

    def __init__(self, attn: nn.Module, ffn: nn.Module):
        super().__init__()
        self.norm1, self.attn, self.ls1 = attn.norm, attn.attn, attn.ls
        self.norm2, self.mlp, self.ls2 = ffn.norm, ffn.mlp, ffn.ls


def timm_block_norms(block: nn.Module, where: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of every norm layer in a timm block (Identity where absent)."""
    from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock, ParallelThingsBlock

    if type(block) is ParallelThingsBlock:
        return [(f"{where}.{kind}.{index}.norm", branch.norm) for kind in ("attns", "ffns")
                for index, branch in enumerate(getattr(block, kind))]
    if type(block) in (ParallelScalingBlock, DiffParallelScalingBlock):
        return [(f"{where}.{name}", getattr(block, name)) for name in ("in_norm", "q_norm", "k_norm")]
    return ([(f"{where}.{name}", getattr(block, name)) for name in ("norm1", "norm2")]
            + [(f"{where}.attn.{name}", getattr(block.attn, name)) for name in ("q_norm", "k_norm", "norm")]
            + [(f"{where}.mlp.norm", block.mlp.norm)])


def check_attention_pool(pool: nn.Module, model: nn.Module) -> None:
    """Refuse a timm ``AttentionPoolLatent`` that ``AttentionPool`` does not represent exactly."""
    from timm.layers import AttentionPoolLatent, Mlp

    if type(pool) is not AttentionPoolLatent:
        raise NotImplementedError(f"attention pooling {type(pool).__name__} (global_pool={model.global_pool!r}) is not supported")
    where = "attn_pool"
    if pool.latent_len != 1 or pool.pos_embed is not None or pool.pool != "token":
        raise NotImplementedError(f"{where}: latent_len != 1, a pooling position embedding or pool_type != 'token' is not supported")
    if not isinstance(pool.q, nn.Linear) or not isinstance(pool.q_norm, nn.Identity) or pool.mlp is None:
        raise NotImplementedError(f"{where}: q_proj=False, qk_norm or out_features=0 is not supported")
    if pool.q.bias is None or pool.kv.bias is None or pool.proj.bias is None:
        raise NotImplementedError(f"{where}: projections without bias are not supported")
    if pool.num_heads * pool.head_dim != model.embed_dim:
        raise NotImplementedError(f"{where}: heads different from the blocks' are not supported")
    if type(pool.mlp) is not Mlp or not isinstance(pool.mlp.norm, nn.Identity) or pool.mlp.fc1.bias is None:
        raise NotImplementedError(f"{where}: MLP type {type(pool.mlp).__name__} is not supported")


class StateDictTaker:
    """A source state dict whose keys are each taken at most once; ``finish`` refuses leftovers.

    Args:
        state_dict: the source (timm) state dict.
        name: how error messages name the source ("timm", "timm Eva").
        taken: keys consumed elsewhere (Eva's rotary tables).
    """

    def __init__(self, state_dict: dict[str, Tensor], name: str = "timm", taken: set[str] = frozenset()):
        self.source = dict(state_dict)
        self.name = name
        self.taken = set(taken)

    def __contains__(self, key: str) -> bool:
        return key in self.source

    def take(self, key: str) -> Tensor:
        """The tensor at ``key``, marked as consumed; ``ValueError`` when it is missing."""
        if key not in self.source:
            raise ValueError(f"{self.name} state dict is missing {key!r}")
        self.taken.add(key)
        return self.source[key]

    def norm(self, prefix: str, target: str) -> dict[str, Tensor]:
        """A norm's weight and bias under HookedViT's names ``{target}.w`` / ``{target}.b`` (an
        RMSNorm has no bias: then only the weight; a strict load catches any mismatch)."""
        out = {f"{target}.w": self.take(f"{prefix}.weight")}
        if f"{prefix}.bias" in self.source:
            out[f"{target}.b"] = self.take(f"{prefix}.bias")
        return out

    def finish(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """``out`` made contiguous, or ``ValueError`` listing the source keys nobody took."""
        leftover = sorted(set(self.source) - self.taken)
        if leftover:
            raise ValueError(f"{self.name} state dict has keys HookedViT cannot place: {leftover}")
        return {key: value.contiguous() for key, value in out.items()}


def convert_timm_embeddings(keys: StateDictTaker, cfg: ViTConfig) -> dict[str, Tensor]:
    """Patch embedding, prefix tokens (class, distillation, registers), position embedding, pre-norm."""
    prefix_tokens = [keys.take("cls_token")[0]] if cfg.class_token else []
    if cfg.distilled:
        prefix_tokens.append(keys.take("dist_token")[0])
    if cfg.n_register_tokens:
        prefix_tokens.append(keys.take("reg_token")[0])
    if cfg.stem_channels and "patch_embed.proj.weight" not in keys:
        # HybridEmbed(proj=False): the stem's feature map is the tokens; W_E is the identity (1 x 1)
        reference = next(iter(keys.source.values()))
        patch_weight = torch.eye(cfg.d_model, cfg.stem_channels, dtype=reference.dtype, device=reference.device)
        patch_weight = patch_weight[:, :, None, None]
    else:
        patch_weight = keys.take("patch_embed.proj.weight")
    out = {
        "embed.W_E": patch_weight,
        "prefix_tokens.W_prefix": torch.cat(prefix_tokens) if prefix_tokens else torch.zeros(0, cfg.d_model),
    }
    if cfg.abs_pos_embed:
        out["pos_embed.W_pos"] = keys.take("pos_embed")[0]
    if cfg.patch_embed_bias:
        out["embed.b_E"] = keys.take("patch_embed.proj.bias")
    if cfg.embed_norm:
        out |= keys.norm("patch_embed.norm", "embed.ln")
    if cfg.stem_channels:  # the CNN stem's parameters and buffers, as they are
        stem = "patch_embed.backbone."
        out |= {f"embed.stem.{key[len(stem):]}": keys.take(key) for key in list(keys.source) if key.startswith(stem)}
    if cfg.pre_norm:
        out |= keys.norm("norm_pre", "ln_pre")
    return out


def convert_timm_attention(
    keys: StateDictTaker, cfg: ViTConfig, layer: int, qkv_bias: Tensor | None = None
) -> dict[str, Tensor]:
    """Block ``layer``'s two norms and attention: the fused qkv split per head (W_Q [head, d_model,
    d_head]), its bias (``qkv_bias`` [3, d_model] when given, else the fused ``qkv.bias``), qk-norm, W_O."""
    src = dst = f"blocks.{layer}"
    out = keys.norm(f"{src}.norm1", f"{dst}.ln1") | keys.norm(f"{src}.norm2", f"{dst}.ln2")
    if cfg.diff_attention:
        bias = keys.take(f"{src}.attn.qkv.bias").chunk(3) if cfg.qkv_bias else None
        out |= split_attention_heads(cfg, f"{dst}.attn", keys.take(f"{src}.attn.qkv.weight").chunk(3), bias)
        out |= convert_timm_diff_attention_extras(keys, cfg, f"{src}.attn", f"{dst}.attn", layer)
    else:
        qkv = rearrange(
            keys.take(f"{src}.attn.qkv.weight"),
            "(three head d_head) d_model -> three head d_model d_head", three=3, head=cfg.n_heads,
        )
        out[f"{dst}.attn.W_Q"], out[f"{dst}.attn.W_K"], out[f"{dst}.attn.W_V"] = qkv
    if cfg.qkv_bias and not cfg.diff_attention:
        if qkv_bias is None:
            qkv_bias = rearrange(keys.take(f"{src}.attn.qkv.bias"), "(three d_model) -> three d_model", three=3)
        bias = rearrange(qkv_bias, "three (head d_head) -> three head d_head", head=cfg.n_heads)
        out[f"{dst}.attn.b_Q"], out[f"{dst}.attn.b_K"], out[f"{dst}.attn.b_V"] = bias
    if cfg.qk_norm:
        out |= keys.norm(f"{src}.attn.q_norm", f"{dst}.attn.q_norm")
        out |= keys.norm(f"{src}.attn.k_norm", f"{dst}.attn.k_norm")
    out[f"{dst}.attn.W_O"] = rearrange(
        keys.take(f"{src}.attn.proj.weight"), "d_model (head d_head) -> head d_head d_model", head=cfg.n_heads
    )
    if cfg.proj_bias:
        out[f"{dst}.attn.b_O"] = keys.take(f"{src}.attn.proj.bias")
    return out


def split_attention_heads(
    cfg: ViTConfig, dst: str, weights: Sequence[Tensor], biases: Sequence[Tensor] | None
) -> dict[str, Tensor]:
    """q, k, v Linear weights [d_model, d_model] (and biases) -> W_Q, W_K, W_V [group, d_model,
    width] at ``dst``: ``head`` groups of ``d_head``, or for differential attention ``2 * head``
    query / key groups of ``d_head`` and ``head`` value groups of ``2 * d_head``."""
    groups = (2 * cfg.n_heads,) * 2 + (cfg.n_heads,) if cfg.diff_attention else (cfg.n_heads,) * 3
    out = {}
    for name, weight, group in zip("QKV", weights, groups):
        out[f"{dst}.W_{name}"] = rearrange(weight, "(group width) d_model -> group d_model width", group=group)
    for name, bias, group in zip("QKV", biases or (), groups):
        out[f"{dst}.b_{name}"] = rearrange(bias, "(group width) -> group width", group=group)
    return out


def convert_timm_diff_attention_extras(
    keys: StateDictTaker, cfg: ViTConfig, src: str, dst: str, layer: int
) -> dict[str, Tensor]:
    """A timm differential attention's per-head RMSNorm (``sub_norm``), lambda vectors and
    ``lambda_init``. timm sets ``lambda_init = 0.8 - 0.6 exp(-0.3 depth)`` from the block index (not
    stored in the state dict); the dual-scalar form (``lambda_a``, ``lambda_b``) becomes vectors
    with the same dot products: ``lambda_q1 = (a, 0, ...)``, ``lambda_k1 = (1, 0, ...)``."""
    out = {f"{dst}.sub_ln.w": keys.take(f"{src}.sub_norm.weight")}
    if f"{src}.lambda_a" in keys:
        for index, name in ((1, "a"), (2, "b")):
            scalar = keys.take(f"{src}.lambda_{name}")
            query, key = (torch.zeros(cfg.d_head, dtype=scalar.dtype, device=scalar.device) for _ in range(2))
            query[0], key[0] = scalar, 1.0
            out[f"{dst}.lambda_q{index}"], out[f"{dst}.lambda_k{index}"] = query, key
    else:
        out |= {f"{dst}.lambda_{name}": keys.take(f"{src}.lambda_{name}") for name in ("q1", "k1", "q2", "k2")}
    reference = out[f"{dst}.sub_ln.w"]
    out[f"{dst}.lambda_init"] = torch.tensor(0.8 - 0.6 * math.exp(-0.3 * layer), dtype=reference.dtype,
                                             device=reference.device)
    return out


def convert_timm_attention_pool(keys: StateDictTaker, cfg: ViTConfig, prefix: str = "attn_pool") -> dict[str, Tensor]:
    """timm ``AttentionPoolLatent`` -> ``AttentionPool``: the latent, q and the fused kv split per
    head, the output projection, the norm and the MLP."""
    heads = cfg.pool_n_heads or cfg.n_heads

    def per_head(weight: Tensor) -> Tensor:
        return rearrange(weight, "(head d_head) d_model -> head d_model d_head", head=heads)

    def per_head_bias(bias: Tensor) -> Tensor:
        return rearrange(bias, "(head d_head) -> head d_head", head=heads)

    dst = "attn_pool"
    k_weight, v_weight = keys.take(f"{prefix}.kv.weight").chunk(2, dim=0)
    k_bias, v_bias = keys.take(f"{prefix}.kv.bias").chunk(2, dim=0)
    out = {
        f"{dst}.W_latent": keys.take(f"{prefix}.latent")[0],
        f"{dst}.W_Q": per_head(keys.take(f"{prefix}.q.weight")),
        f"{dst}.b_Q": per_head_bias(keys.take(f"{prefix}.q.bias")),
        f"{dst}.W_K": per_head(k_weight), f"{dst}.b_K": per_head_bias(k_bias),
        f"{dst}.W_V": per_head(v_weight), f"{dst}.b_V": per_head_bias(v_bias),
        f"{dst}.W_O": rearrange(
            keys.take(f"{prefix}.proj.weight"), "d_model (head d_head) -> head d_head d_model", head=heads
        ),
        f"{dst}.b_O": keys.take(f"{prefix}.proj.bias"),
        f"{dst}.mlp.W_in": keys.take(f"{prefix}.mlp.fc1.weight").T,
        f"{dst}.mlp.b_in": keys.take(f"{prefix}.mlp.fc1.bias"),
        f"{dst}.mlp.W_out": keys.take(f"{prefix}.mlp.fc2.weight").T,
        f"{dst}.mlp.b_out": keys.take(f"{prefix}.mlp.fc2.bias"),
    }
    return out | keys.norm(f"{prefix}.norm", f"{dst}.ln")


def convert_timm_parallel_block(keys: StateDictTaker, cfg: ViTConfig, layer: int) -> dict[str, Tensor]:
    """A timm ``ParallelScalingBlock``: ``in_proj`` stacks [mlp fc1; q; k; v] (its bias, or the
    separate ``mlp_bias``), the output projections are separate or fused (``out_proj`` reads
    [attention; MLP] and its one bias goes to b_O, b_out being zero), one layer scale serves both."""
    src = dst = f"blocks.{layer}"
    d_model, d_mlp = cfg.d_model, cfg.d_mlp
    split = [d_mlp, d_model, d_model, d_model]
    w_mlp, *w_qkv = keys.take(f"{src}.in_proj.weight").split(split, dim=0)
    out = keys.norm(f"{src}.in_norm", f"{dst}.ln1") | {f"{dst}.mlp.W_in": w_mlp.T}
    if cfg.qkv_bias:
        b_mlp, *b_qkv = keys.take(f"{src}.in_proj.bias").split(split)
    else:
        b_mlp, b_qkv = keys.take(f"{src}.mlp_bias"), None
    out |= split_attention_heads(cfg, f"{dst}.attn", w_qkv, b_qkv)
    if cfg.diff_attention:  # DiffParallelScalingBlock: the lambdas and sub-norm sit on the block
        out |= convert_timm_diff_attention_extras(keys, cfg, src, f"{dst}.attn", layer)
    out[f"{dst}.mlp.b_in"] = b_mlp
    if cfg.qk_norm:
        out |= keys.norm(f"{src}.q_norm", f"{dst}.attn.q_norm") | keys.norm(f"{src}.k_norm", f"{dst}.attn.k_norm")
    if f"{src}.out_proj.weight" in keys:
        w_attn_out, w_mlp_out = keys.take(f"{src}.out_proj.weight").split([d_model, d_mlp], dim=1)
        b_attn_out = keys.take(f"{src}.out_proj.bias")
        b_mlp_out = torch.zeros_like(b_attn_out)
    else:
        w_attn_out, b_attn_out = keys.take(f"{src}.attn_out_proj.weight"), keys.take(f"{src}.attn_out_proj.bias")
        w_mlp_out, b_mlp_out = keys.take(f"{src}.mlp_out_proj.weight"), keys.take(f"{src}.mlp_out_proj.bias")
    out[f"{dst}.attn.W_O"] = rearrange(w_attn_out, "d_model (head d_head) -> head d_head d_model", head=cfg.n_heads)
    out |= {f"{dst}.attn.b_O": b_attn_out, f"{dst}.mlp.W_out": w_mlp_out.T, f"{dst}.mlp.b_out": b_mlp_out}
    if cfg.layer_scale:
        gamma = keys.take(f"{src}.ls.gamma")
        out[f"{dst}.gamma_attn"], out[f"{dst}.gamma_mlp"] = gamma, gamma.clone()
    return out


def convert_timm_parallel_things_block(keys: StateDictTaker, cfg: ViTConfig, layer: int) -> dict[str, Tensor]:
    """A timm ``ParallelThingsBlock`` as one block (see ``parallel_things_block_fields``): per branch
    ``j`` with norm (w_j, b_j) and layer scale g_j, ``W_Q_j' = diag(w_j) W_Q_j``, ``b_Q_j' = b_j W_Q_j
    + b_Q_j`` (likewise K, V and the MLP's W_in), ``W_O_j' = W_O_j diag(g_j)``; the branches'
    heads and hidden units are concatenated and their output biases summed."""
    src = dst = f"blocks.{layer}"
    n_branches = sum(1 for key in keys.source if key.startswith(f"{src}.attns.") and key.endswith(".attn.qkv.weight"))
    heads = cfg.n_heads // n_branches
    attn = {name: [] for name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O")}
    mlp = {name: [] for name in ("W_in", "b_in", "W_out")}
    b_O, b_out = 0, 0
    for j in range(n_branches):
        for kind, parts in (("attns", attn), ("ffns", mlp)):
            norm = f"{src}.{kind}.{j}"
            w = keys.take(f"{norm}.norm.weight")
            b = keys.take(f"{norm}.norm.bias") if f"{norm}.norm.bias" in keys else torch.zeros_like(w)
            gamma = keys.take(f"{norm}.ls.gamma") if f"{norm}.ls.gamma" in keys else torch.ones_like(w)
            if kind == "attns":
                weight = rearrange(keys.take(f"{norm}.attn.qkv.weight"), "(three d_out) d_model -> three d_model d_out", three=3)
                bias = (rearrange(keys.take(f"{norm}.attn.qkv.bias"), "(three d_out) -> three d_out", three=3)
                        if f"{norm}.attn.qkv.bias" in keys else torch.zeros(3, weight.shape[-1], dtype=w.dtype))
                folded_bias = b @ weight + bias  # [three, d_out]
                for index, name in enumerate("QKV"):
                    parts[f"W_{name}"].append(rearrange(w[:, None] * weight[index], "d_model (head d_head) -> head d_model d_head", head=heads))
                    parts[f"b_{name}"].append(rearrange(folded_bias[index], "(head d_head) -> head d_head", head=heads))
                proj = keys.take(f"{norm}.attn.proj.weight") * gamma[:, None]  # [d_model, head * d_head]
                parts["W_O"].append(rearrange(proj, "d_model (head d_head) -> head d_head d_model", head=heads))
                if f"{norm}.attn.proj.bias" in keys:
                    b_O = b_O + gamma * keys.take(f"{norm}.attn.proj.bias")
            else:
                fc1 = keys.take(f"{norm}.mlp.fc1.weight").T  # [d_model, d_mlp]
                fc1_bias = keys.take(f"{norm}.mlp.fc1.bias") if f"{norm}.mlp.fc1.bias" in keys else 0
                parts["W_in"].append(w[:, None] * fc1)
                parts["b_in"].append(b @ fc1 + fc1_bias)
                parts["W_out"].append(keys.take(f"{norm}.mlp.fc2.weight").T * gamma)
                if f"{norm}.mlp.fc2.bias" in keys:
                    b_out = b_out + gamma * keys.take(f"{norm}.mlp.fc2.bias")
    ones = torch.ones(cfg.d_model, dtype=attn["W_O"][0].dtype)
    out = {f"{dst}.ln1.w": ones, f"{dst}.ln2.w": ones.clone()}
    if cfg.norm == "layer_norm":
        out |= {f"{dst}.ln1.b": torch.zeros_like(ones), f"{dst}.ln2.b": torch.zeros_like(ones)}
    out |= {f"{dst}.attn.{name}": torch.cat(parts) for name, parts in attn.items()}
    out |= {f"{dst}.mlp.W_in": torch.cat(mlp["W_in"], dim=1), f"{dst}.mlp.b_in": torch.cat(mlp["b_in"]),
            f"{dst}.mlp.W_out": torch.cat(mlp["W_out"], dim=0)}
    out[f"{dst}.attn.b_O"] = b_O + torch.zeros_like(ones)
    out[f"{dst}.mlp.b_out"] = b_out + torch.zeros_like(ones)
    return out


def convert_timm_mlp(keys: StateDictTaker, cfg: ViTConfig, src: str, dst: str) -> dict[str, Tensor]:
    """A timm ``Mlp``, packed ``GluMlp`` (one fc1, gate half first) or ``SwiGLU`` (fc1_g, fc1_x)
    at ``src`` -> HookedViT's MLP / GatedMLP at ``dst`` (weights transposed to [d_in, d_out])."""
    out = {}
    if f"{src}.fc1_g.weight" in keys:  # SwiGLU: separate gate and linear branches
        fc1 = {"W_gate": f"{src}.fc1_g", "W_in": f"{src}.fc1_x"}
        out |= {f"{dst}.{name}": keys.take(f"{key}.weight").T for name, key in fc1.items()}
        if cfg.proj_bias:
            out |= {f"{dst}.b{name[1:]}": keys.take(f"{key}.bias") for name, key in fc1.items()}
    elif cfg.gated_mlp:  # GluMlp: one packed projection, gate first
        out[f"{dst}.W_gate"], out[f"{dst}.W_in"] = keys.take(f"{src}.fc1.weight").T.chunk(2, dim=-1)
        if cfg.proj_bias:
            out[f"{dst}.b_gate"], out[f"{dst}.b_in"] = keys.take(f"{src}.fc1.bias").chunk(2)
    else:
        out[f"{dst}.W_in"] = keys.take(f"{src}.fc1.weight").T
        if cfg.proj_bias:
            out[f"{dst}.b_in"] = keys.take(f"{src}.fc1.bias")
    out[f"{dst}.W_out"] = keys.take(f"{src}.fc2.weight").T
    if cfg.proj_bias:
        out[f"{dst}.b_out"] = keys.take(f"{src}.fc2.bias")
    if cfg.mlp_norm:
        out |= keys.norm(f"{src}.norm", f"{dst}.ln")
    return out


def convert_timm_head(keys: StateDictTaker, cfg: ViTConfig) -> dict[str, Tensor]:
    """Final norm, attention pooling and classifier (and DeiT's distillation classifier)."""
    out = convert_timm_attention_pool(keys, cfg) if cfg.pooling == "map" else {}
    if cfg.final_norm != "none":
        out |= keys.norm("fc_norm" if cfg.final_norm == "pooled" else "norm", "ln_final")
    heads = [("head", "")] + ([("head_dist", "_dist")] if cfg.pooling == "distilled" else [])
    for source, suffix in heads if cfg.n_classes else []:
        out[f"head.W_U{suffix}"] = keys.take(f"{source}.weight").T
        if cfg.head_bias:
            out[f"head.b_U{suffix}"] = keys.take(f"{source}.bias")
    return out


def convert_timm_state_dict(state_dict: dict[str, Tensor], cfg: ViTConfig) -> dict[str, Tensor]:
    """timm VisionTransformer state dict -> HookedViT state dict (a pure function).

    Linear weights are transposed to TransformerLens's [d_in, d_out] layout and the fused qkv
    weight is split per head: W_Q [head, d_model, d_head]. Every timm key is consumed exactly once.

    Raises:
        ValueError: listing timm keys that were left over or missing.
    """
    keys = StateDictTaker(state_dict)
    out = convert_timm_embeddings(keys, cfg)
    for i in range(cfg.n_layers):
        src = dst = f"blocks.{i}"
        if cfg.parallel_attn_mlp:
            out |= convert_timm_parallel_block(keys, cfg, i)
            continue
        if f"{src}.attns.0.attn.qkv.weight" in keys:
            out |= convert_timm_parallel_things_block(keys, cfg, i)
            continue
        out |= convert_timm_attention(keys, cfg, i)
        if cfg.attn_norm:
            out |= keys.norm(f"{src}.attn.norm", f"{dst}.attn.ln")
        out |= convert_timm_mlp(keys, cfg, f"{src}.mlp", f"{dst}.mlp")
        if cfg.layer_scale:
            out[f"{dst}.gamma_attn"] = keys.take(f"{src}.ls1.gamma")
            out[f"{dst}.gamma_mlp"] = keys.take(f"{src}.ls2.gamma")
    return keys.finish(out | convert_timm_head(keys, cfg))


def data_config_from_timm(model: nn.Module, cfg: ViTConfig) -> DataConfig:
    """The preprocessing timm would use for this model (``resolve_model_data_config``), at the
    input size the model was built for."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model) | {"input_size": (cfg.in_chans, *cfg.img_size)}
    return DataConfig.from_dict(config)


def from_timm(model_or_name: Any, pretrained: bool = False, **timm_kwargs) -> HookedViT:
    """Build a HookedViT equal to a timm VisionTransformer.

    Args:
        model_or_name: a built timm model (the offline path), or a model name passed to
            ``timm.create_model(name, pretrained=pretrained, **timm_kwargs)``; with
            ``pretrained=True`` timm downloads the weights from its hub.
        pretrained, timm_kwargs: only with a name.

    Returns:
        HookedViT in eval mode on the timm model's device and dtype, with timm's data config
        (mean, std, input size, interpolation) and, when timm knows them, class names.
    """
    import timm

    if isinstance(model_or_name, str):
        model = timm.create_model(model_or_name, pretrained=pretrained, **timm_kwargs)
    elif isinstance(model_or_name, nn.Module):
        if pretrained or timm_kwargs:
            raise ValueError("pretrained and timm_kwargs apply only when model_or_name is a model name")
        model = model_or_name
    else:
        raise ValueError(
            f"model_or_name must be a timm model or a timm model name, got {type(model_or_name).__name__}"
        )
    cfg = config_from_timm(model)
    # a hybrid's CNN stem is copied as a module (its weights are assigned again from the state dict)
    stem = copy.deepcopy(model.patch_embed.backbone) if cfg.stem_channels else None
    with torch.device("meta"):  # no memory and no random initialisation: the weights come next
        hooked = HookedViT(cfg, data_config=data_config_from_timm(model, cfg), class_names=_class_names(model),
                           stem=stem)
    load_state_dict_strictly(hooked, _convert_state_dict(model, cfg), assign=True)
    return hooked.eval()


def _convert_state_dict(model: nn.Module, cfg: ViTConfig) -> dict[str, Tensor]:
    """The HookedViT state dict of a timm model, as fresh tensors (never views of the model's own:
    the converted model is assigned them and shares no memory with its original)."""
    family = family_converter(model)
    if family is not None:
        state = family.state_dict_from_model(model, cfg)
    else:
        state = convert_timm_state_dict(model.state_dict(), cfg)
    return {key: value.clone(memory_format=torch.contiguous_format) for key, value in state.items()}


def _class_names(model: nn.Module) -> tuple[str, ...] | None:
    """ImageNet label descriptions when timm can tell the model's label set, else None."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    if not model.num_classes:
        return None
    subset = infer_imagenet_subset(model) if getattr(model, "pretrained_cfg", None) else None
    return tuple(ImageNetInfo(subset).label_descriptions()) if subset else None
