"""A pre-norm transformer block with TransformerLens residual hook points."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from vitlens_patch.model.components.attention import Attention
from vitlens_patch.model.components.diff_attention import DiffAttention
from vitlens_patch.model.components.layer_norm import make_norm
from vitlens_patch.model.components.mlp import MLP, GatedMLP
from vitlens_patch.model.config import ViTConfig


class TransformerBlock(nn.Module):
    """``resid_mid = resid_pre + attn_out``; ``resid_post = resid_mid + mlp_out``.

    Pre-norm (the default): ``attn_out = attn(ln1(resid_pre))``, ``mlp_out = mlp(ln2(resid_mid))``.
    Post-norm (``cfg.post_norm``, timm's ``ResPostBlock``): ``attn_out = ln1(attn(resid_pre))``,
    ``mlp_out = ln2(mlp(resid_mid))``. ``attn_out`` and ``mlp_out`` are what is added to the
    residual stream: with layer scale they include the per-channel scales ``gamma_attn`` /
    ``gamma_mlp`` [d_model] (``gamma_mlp`` is None with ``cfg.attn_only_layer_scale``).
    Parallel (``cfg.parallel_attn_mlp``, timm's ``ParallelScalingBlock``): ``resid_post =
    resid_pre + attn_out + mlp_out`` with both branches reading ``ln1(resid_pre)``; ``ln2`` and
    ``hook_resid_mid`` are None.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln1 = make_norm(cfg, cfg.d_model)
        self.attn = DiffAttention(cfg) if cfg.diff_attention else Attention(cfg)
        self.parallel = cfg.parallel_attn_mlp
        self.ln2 = None if self.parallel else make_norm(cfg, cfg.d_model)
        self.mlp = GatedMLP(cfg) if cfg.gated_mlp else MLP(cfg)
        self.gamma_attn = nn.Parameter(torch.ones(cfg.d_model)) if cfg.layer_scale else None
        self.gamma_mlp = (
            nn.Parameter(torch.ones(cfg.d_model)) if cfg.layer_scale and not cfg.attn_only_layer_scale else None
        )
        self.post_norm = cfg.post_norm
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = None if self.parallel else HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        if self.parallel:
            normed = self.ln1(resid_pre)
            attn_out, mlp_out = self.attn(normed), self.mlp(normed)
            if self.gamma_attn is not None:
                attn_out, mlp_out = attn_out * self.gamma_attn, mlp_out * self.gamma_mlp
            return self.hook_resid_post(resid_pre + self.hook_attn_out(attn_out) + self.hook_mlp_out(mlp_out))
        if self.post_norm:
            attn_out = self.ln1(self.attn(resid_pre))
        else:
            attn_out = self.attn(self.ln1(resid_pre))
        if self.gamma_attn is not None:
            attn_out = attn_out * self.gamma_attn
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        mlp_out = self.ln2(self.mlp(resid_mid)) if self.post_norm else self.mlp(self.ln2(resid_mid))
        if self.gamma_mlp is not None:
            mlp_out = mlp_out * self.gamma_mlp
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(mlp_out))
