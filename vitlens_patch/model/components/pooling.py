"""Attention pooling ("MAP", multihead attention pooling: SigLIP, timm's ``global_pool='map'``)
with TransformerLens-style hook points."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from vitlens_patch.model.components.layer_norm import is_hooked, make_norm
from vitlens_patch.model.components.mlp import MLP
from vitlens_patch.model.config import ViTConfig


class AttentionPool(nn.Module):
    """A learned query attends over the final tokens; an MLP with its own norm is added on top.

    ``attn_out = softmax(q k^T / sqrt(d_head)) v @ W_O + b_O`` with the query from the latent
    W_latent [1, d_model] and keys / values from the tokens; ``pooled = attn_out +
    mlp(ln(attn_out))`` [batch, d_model], as timm's ``AttentionPoolLatent`` (latent length 1) and
    HF's ``SiglipMultiheadAttentionPoolingHead``. The keys are the patch tokens, or every token
    when ``cfg.pool_include_prefix``. Weights follow ``Attention``: W_Q, W_K, W_V
    [head, d_model, d_head], W_O [head, d_head, d_model], with ``cfg.pool_n_heads`` heads (default
    ``n_heads``) of width ``d_model / head``; every projection has a bias and the MLP
    is a plain (ungated) one with biases, whatever the blocks use, ``cfg.pool_d_mlp`` wide (default
    ``d_mlp``).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.pool_n_heads or cfg.n_heads
        self.d_head = cfg.d_model // self.n_heads
        shape = (self.n_heads, cfg.d_model, self.d_head)
        self.W_latent = nn.Parameter(torch.empty(1, cfg.d_model))
        self.W_Q = nn.Parameter(torch.empty(shape))
        self.W_K = nn.Parameter(torch.empty(shape))
        self.W_V = nn.Parameter(torch.empty(shape))
        self.W_O = nn.Parameter(torch.empty(self.n_heads, self.d_head, cfg.d_model))
        self.b_Q = nn.Parameter(torch.zeros(self.n_heads, self.d_head))
        self.b_K = nn.Parameter(torch.zeros(self.n_heads, self.d_head))
        self.b_V = nn.Parameter(torch.zeros(self.n_heads, self.d_head))
        self.b_O = nn.Parameter(torch.zeros(cfg.d_model))
        self.ln = make_norm(cfg, cfg.d_model)
        self.fused_attn = True  # False: always materialise the pattern (timm's switch of that name)
        self.mlp = MLP(dataclasses.replace(cfg, proj_bias=True, gated_mlp=False, mlp_norm=False,
                                           d_mlp=cfg.pool_d_mlp or cfg.d_mlp))
        self.hook_q = HookPoint()  # [batch, 1, head, d_head]: the latent's query
        self.hook_k = HookPoint()  # [batch, key_pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, key_pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, 1, key_pos]: scaled, pre-softmax
        self.hook_pattern = HookPoint()  # [batch, head, 1, key_pos]
        self.hook_z = HookPoint()  # [batch, 1, head, d_head]
        self.hook_attn_out = HookPoint()  # [batch, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, d_model]

    @staticmethod
    def _project(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
        # x [..., d_model] @ W [head, d_model, d_head] + b -> [..., head, d_head]
        out = F.linear(x, rearrange(W, "head d_model d_head -> (head d_head) d_model"), b.flatten())
        return rearrange(out, "... (head d_head) -> ... head d_head", head=W.shape[0])

    def forward(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch d_model"]:
        tokens = resid if self.cfg.pool_include_prefix else resid[:, self.cfg.n_prefix_tokens :]
        latent = self.W_latent.to(tokens.dtype).expand(len(tokens), -1, -1)  # [batch, 1, d_model]
        q = self.hook_q(self._project(latent, self.W_Q, self.b_Q))
        k = self.hook_k(self._project(tokens, self.W_K, self.b_K))
        v = self.hook_v(self._project(tokens, self.W_V, self.b_V))
        # [batch, pos, head, d_head] -> [batch, head, pos, d_head] for the attention kernels
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if not self.fused_attn or is_hooked(self.hook_attn_scores) or is_hooked(self.hook_pattern):
            scores = self.hook_attn_scores((q * self.d_head**-0.5) @ k.transpose(-2, -1))
            z = self.hook_pattern(scores.softmax(dim=-1)) @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v)
        z = self.hook_z(z.transpose(1, 2))  # [batch, 1, head, d_head]
        attn_out = F.linear(
            rearrange(z[:, 0], "batch head d_head -> batch (head d_head)"),
            rearrange(self.W_O, "head d_head d_model -> d_model (head d_head)"),
            self.b_O,
        )
        attn_out = self.hook_attn_out(attn_out)
        return attn_out + self.hook_mlp_out(self.mlp(self.ln(attn_out)))
