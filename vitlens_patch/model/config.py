"""ViTConfig: the architecture of a HookedViT, and nothing else (no training or run settings)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from vitlens_patch.checks import check_positive_int

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu")
ROTARY_LAYOUTS = ("none", "interleaved", "half")
POOLINGS = ("token", "avg", "max", "avgmax", "distilled", "token_avg", "map", "none")
NORMS = ("layer_norm", "rms_norm")
FINAL_NORMS = ("tokens", "pooled", "none")


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a Vision Transformer.

    Attributes:
        n_layers: number of transformer blocks.
        d_model: residual stream width.
        n_heads, d_head: attention heads and their width.
        d_mlp: MLP hidden width.
        img_size: input (height, width) in pixels (an int means square). When it is not a
            multiple of the patch size the last ``img_size % patch_size`` rows / columns are
            not read (as timm's strided convolution: SigLIP so400m/14 at 384 has a 27 x 27 grid).
        patch_size: patch (height, width) in pixels (an int means square).
        in_chans: input channels.
        n_classes: classifier outputs; 0 for a backbone without a classifier, whose output is
            its features (see ``pooling``).
        class_token: whether a class token is prepended.
        n_register_tokens: register tokens after the class token (Darcet et al. 2023).
        distilled: DeiT distillation token after the class token; with pooling "distilled" a
            second head reads it and is averaged in (HF's ``DeiTForImageClassification`` reads
            the class token only: pooling "token").
        pos_embed_prefix: whether position embeddings cover the prefix tokens (timm's
            ``not no_embed_class``).
        pre_norm: LayerNorm on the tokens before block 0 (CLIP's ``ln_pre``).
        final_norm: where the final LayerNorm sits: on all "tokens" before pooling, on the
            "pooled" vector (timm's ``fc_norm``), or "none".
        pooling: "token" (class token), "avg" / "max" / "avgmax" over patch tokens,
            "distilled" (class and distillation tokens through two heads, averaged), "token_avg"
            (class token concatenated with the patch-token mean, HF's
            ``Dinov2ForImageClassification``), or "none" (every token, timm's ``global_pool=''``;
            no linear classifier, ``with_head`` heads read the tokens), or "map" (attention
            pooling: a learned query attends over the tokens, then an MLP; SigLIP).
        pool_n_heads: attention pooling's heads (of width d_model / pool_n_heads); 0 (the default)
            means ``n_heads`` (Perception Encoder pools with 8 heads whatever its blocks use).
        pool_d_mlp: attention pooling's MLP width; 0 (the default) means ``d_mlp``.
        pool_include_prefix: whether avg / max / avgmax / map pooling reads the prefix tokens too
            (timm's ``pool_include_prefix``; default: patch tokens only).
        norm: every normalisation layer's kind, "layer_norm" or "rms_norm" (timm's ``RmsNorm``:
            no mean subtraction, no bias; AIMv2).
        layer_scale: per-channel scales on the attention and MLP outputs (CaiT / DeiT-3).
        qkv_bias, proj_bias, patch_embed_bias: presence of those biases (proj_bias also covers
            the MLP's linear layers, as in timm).
        qk_norm: LayerNorm on each head's queries and keys.
        activation: MLP activation, one of ``ACTIVATIONS``.
        eps: LayerNorm epsilon.
        head_bias: whether the classifier has a bias (False for CLIP's image projection).
        abs_pos_embed: whether learned absolute position embeddings are added (False for some
            rotary-embedding models, timm's ``use_abs_pos_emb=False``).
        rotary: rotary position embedding on the patch tokens' queries and keys (EVA-02, RoPE-ViT,
            DINOv3): "none", or the rotation layout, "interleaved" (pairs (0, 1), (2, 3), ...) or
            "half" (pairs (i, i + d_head / 2)). The sin / cos tables are buffers of each attention
            layer, filled by the converter; prefix tokens are not rotated.
        rotary_per_head: one rotary table per layer and head (timm's rope_type "mixed") instead of
            one shared by every head.
        gated_mlp: SwiGLU-style MLP, ``(act(x @ W_gate + b_gate) * (x @ W_in + b_in)) @ W_out``.
        mlp_norm: LayerNorm on the MLP hidden activations before W_out (EVA-02's sub-LN).
        attn_norm: LayerNorm on the concatenated head outputs before W_O (timm's
            ``scale_attn_inner``); per-head results (``hook_result``) are then not defined.
        n_relative_positions: rows of each attention layer's learned relative position bias table
            (BEiT, timm's ``VisionTransformerRelPos``); 0: no relative position bias.
        post_norm: blocks normalise their branch outputs instead of their inputs (timm's
            ``ResPostBlock``, ``EvaBlockPostNorm``): ``resid_mid = resid_pre + ln1(attn(resid_pre))``.
        attn_only_layer_scale: with ``layer_scale``, only the attention branch is scaled (timm's
            ``attn_only_layer_scale``, Sapiens2).
        parallel_attn_mlp: attention and MLP read the same normed input and both add to the
            residual stream at once (TransformerLens's name; timm's ``ParallelScalingBlock``, ViT-22B):
            ``resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln1(resid_pre))``; there is no
            ``ln2`` and no ``hook_resid_mid``.
        diff_attention: differential attention (timm's ``DiffAttention``, ``DiffParallelScalingBlock``):
            each head's pattern is the difference of two softmax maps (see
            ``components.diff_attention``); ``d_head`` is then the width of each of the ``2 *
            n_heads`` query / key groups, and values are ``2 * d_head`` wide.
        dynamic_img_size: inputs of any size (at least one patch) run: the patch grid follows the
            image and the position embeddings are resampled to it (bicubic, antialiased, as
            timm's ``dynamic_img_size=True``); at ``img_size`` they are used as they are. The
            patching tools still work at ``img_size`` (their grids are ``grid_size``).
        embed_norm: a norm on the patch embeddings inside the patch embedding (timm's
            ``embed_norm_layer``, AIMv2): ``hook_embed`` is after it.
        stem_channels, stem_stride: a CNN stem (timm's ``HybridEmbed``: R50+ViT and friends)
            when ``stem_channels`` > 0: the stem maps the image to a feature map [batch,
            stem_channels, height / stem_stride, width / stem_stride], then the patch
            projection (kernel ``patch_size / stem_stride``) makes the tokens. ``patch_size`` is
            the pixels per token. The stem is an opaque module passed to ``HookedViT`` (it has no
            config of its own); it runs as one unit.
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    img_size: tuple[int, int] | int = (224, 224)  # a tuple once built
    patch_size: tuple[int, int] | int = (16, 16)
    n_classes: int = 1000
    d_head: int | None = None
    in_chans: int = 3
    class_token: bool = True
    n_register_tokens: int = 0
    distilled: bool = False
    pos_embed_prefix: bool = True
    pre_norm: bool = False
    final_norm: Literal["tokens", "pooled", "none"] = "tokens"
    pooling: Literal["token", "avg", "max", "avgmax", "distilled", "token_avg", "map", "none"] = "token"
    pool_include_prefix: bool = False
    pool_n_heads: int = 0
    pool_d_mlp: int = 0
    norm: Literal["layer_norm", "rms_norm"] = "layer_norm"
    layer_scale: bool = False
    qkv_bias: bool = True
    proj_bias: bool = True
    patch_embed_bias: bool = True
    qk_norm: bool = False
    activation: Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "silu"] = "gelu"
    eps: float = 1e-6
    head_bias: bool = True
    abs_pos_embed: bool = True
    rotary: Literal["none", "interleaved", "half"] = "none"
    rotary_per_head: bool = False
    gated_mlp: bool = False
    mlp_norm: bool = False
    attn_norm: bool = False
    n_relative_positions: int = 0
    post_norm: bool = False
    attn_only_layer_scale: bool = False
    parallel_attn_mlp: bool = False
    diff_attention: bool = False
    dynamic_img_size: bool = False
    embed_norm: bool = False
    stem_channels: int = 0
    stem_stride: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", _pair(self.img_size))
        object.__setattr__(self, "patch_size", _pair(self.patch_size))
        object.__setattr__(self, "stem_stride", _pair(self.stem_stride))
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model must be divisible by n_heads when d_head is not given, "
                    f"got d_model={self.d_model}, n_heads={self.n_heads}"
                )
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        for name, value in [("n_layers", self.n_layers), ("d_model", self.d_model),
                            ("n_heads", self.n_heads), ("d_mlp", self.d_mlp),
                            ("in_chans", self.in_chans)]:
            check_positive_int(value, name)
        if self.n_classes < 0:
            raise ValueError(f"n_classes must be >= 0 (0: no classifier), got {self.n_classes}")
        for axis in range(2):
            if self.img_size[axis] < self.patch_size[axis]:
                raise ValueError(
                    f"img_size {self.img_size} must be at least patch_size {self.patch_size}"
                )
        for name, value, allowed in [("activation", self.activation, ACTIVATIONS),
                                     ("pooling", self.pooling, POOLINGS),
                                     ("final_norm", self.final_norm, FINAL_NORMS),
                                     ("rotary", self.rotary, ROTARY_LAYOUTS),
                                     ("norm", self.norm, NORMS)]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if (self.pooling == "token") and not self.class_token:
            raise ValueError("pooling='token' needs class_token=True")
        if self.pooling == "distilled" and not self.distilled:
            raise ValueError("pooling='distilled' needs distilled=True")
        if self.rotary_per_head and self.rotary == "none":
            raise ValueError("rotary_per_head=True needs a rotary layout, got rotary='none'")
        if self.rotary != "none" and self.d_head % 2:
            raise ValueError(f"rotary position embeddings need an even d_head, got {self.d_head}")
        if self.n_relative_positions < 0:
            raise ValueError(f"n_relative_positions must be >= 0 (0: no relative position bias), got {self.n_relative_positions}")
        if self.attn_only_layer_scale and not self.layer_scale:
            raise ValueError("attn_only_layer_scale=True needs layer_scale=True")
        if self.dynamic_img_size and (self.rotary != "none" or self.stem_channels):
            feature = "rotary position embeddings" if self.rotary != "none" else "a CNN stem (HybridEmbed)"
            raise NotImplementedError(f"dynamic_img_size=True with {feature} is not supported yet")
        if self.pool_d_mlp < 0:
            raise ValueError(f"pool_d_mlp must be 0 (d_mlp) or positive, got {self.pool_d_mlp}")
        if self.pool_n_heads < 0 or (self.pool_n_heads and self.d_model % self.pool_n_heads):
            raise ValueError(f"pool_n_heads must be 0 (n_heads) or divide d_model {self.d_model}, got {self.pool_n_heads}")
        if self.parallel_attn_mlp and self.post_norm:
            raise ValueError("parallel_attn_mlp=True and post_norm=True cannot be combined")
        if self.stem_channels < 0 or any(s < 1 or p % s for s, p in zip(self.stem_stride, self.patch_size)):
            raise ValueError(
                f"stem_channels must be >= 0 and stem_stride divide patch_size, got stem_channels="
                f"{self.stem_channels}, stem_stride={self.stem_stride}, patch_size={self.patch_size}"
            )
        if self.pooling == "token_avg" and not self.class_token:
            raise ValueError("pooling='token_avg' needs class_token=True")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols), ``img_size // patch_size``; patch p sits at ``divmod(p, cols)``."""
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def n_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def n_prefix_tokens(self) -> int:
        """Class, distillation and register tokens, which come before the patch tokens."""
        return int(self.class_token) + int(self.distilled) + self.n_register_tokens

    @property
    def d_pooled(self) -> int:
        """Width of the pooled vector the classifier reads: 2 * d_model for "token_avg"."""
        return 2 * self.d_model if self.pooling == "token_avg" else self.d_model

    @property
    def n_pos(self) -> int:
        """Sequence length: prefix tokens + patch tokens."""
        return self.n_prefix_tokens + self.n_patches

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> "ViTConfig":
        return cls(**config)
