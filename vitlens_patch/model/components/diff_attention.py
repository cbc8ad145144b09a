"""Differential attention (Ye et al. 2024, timm's ``DiffAttention``) with TransformerLens-style
hook points."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from vitlens_patch.model.components.attention import project_output
from vitlens_patch.model.components.layer_norm import RMSNorm, is_hooked, make_norm
from vitlens_patch.model.config import ViTConfig


class DiffAttention(nn.Module):
    """Each head's pattern is the difference of two softmax maps:
    ``pattern_h = softmax(q_2h k_2h^T / sqrt(d_head)) - lambda * softmax(q_2h+1 k_2h+1^T / sqrt(d_head))``.

    Queries and keys have ``2 * head`` groups of width ``d_head`` (``cfg.d_head`` is this half
    width), values ``head`` groups of width ``2 * d_head``. ``z = pattern @ v`` is normalised per
    head by ``sub_ln`` (an RMSNorm, eps 1e-5), scaled by ``1 - lambda_init`` and projected by
    W_O [head, 2 * d_head, d_model]. ``lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 .
    lambda_k2) + lambda_init`` (the ``lambda_*`` vectors [d_head], ``lambda_init`` a buffer set from
    the layer's depth by the converter). Weights: W_Q, W_K [2 * head, d_model, d_head], W_V
    [head, d_model, 2 * d_head].

    When neither ``hook_attn_scores`` nor ``hook_pattern`` is hooked the two maps are applied with
    ``F.scaled_dot_product_attention`` (as timm's fused path); otherwise explicitly.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        heads, d_head = cfg.n_heads, cfg.d_head
        self.W_Q = nn.Parameter(torch.empty(2 * heads, cfg.d_model, d_head))
        self.W_K = nn.Parameter(torch.empty(2 * heads, cfg.d_model, d_head))
        self.W_V = nn.Parameter(torch.empty(heads, cfg.d_model, 2 * d_head))
        self.W_O = nn.Parameter(torch.empty(heads, 2 * d_head, cfg.d_model))
        if cfg.qkv_bias:
            self.b_Q = nn.Parameter(torch.zeros(2 * heads, d_head))
            self.b_K = nn.Parameter(torch.zeros(2 * heads, d_head))
            self.b_V = nn.Parameter(torch.zeros(heads, 2 * d_head))
        else:
            self.b_Q = self.b_K = self.b_V = None
        self.b_O = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.proj_bias else None
        self.q_norm = make_norm(cfg, d_head) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, d_head) if cfg.qk_norm else None
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.empty(d_head)) for _ in range(4)
        )
        self.register_buffer("lambda_init", torch.tensor(0.8))
        self.sub_ln = RMSNorm(2 * d_head, 1e-5)
        self.ln = make_norm(cfg, cfg.d_model) if cfg.attn_norm else None
        self.use_attn_result = False
        self.fused_attn = True
        self.hook_q = HookPoint()  # [batch, pos, 2 * head, d_head]: after qk-norm
        self.hook_k = HookPoint()  # [batch, pos, 2 * head, d_head]: after qk-norm
        self.hook_v = HookPoint()  # [batch, pos, head, 2 * d_head]
        self.hook_attn_scores = HookPoint()  # [batch, 2 * head, query_pos, key_pos]: both maps' scores
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]: the differential pattern
        self.hook_z = HookPoint()  # [batch, pos, head, 2 * d_head]: pattern @ v, before sub_ln
        self.hook_result = HookPoint()  # [batch, pos, head, d_model]: per-head output (use_attn_result)

    def lambda_full(self) -> Tensor:
        """The scalar lambda weighting the second map."""
        return (
            torch.exp((self.lambda_q1 * self.lambda_k1).sum(-1)) - torch.exp((self.lambda_q2 * self.lambda_k2).sum(-1))
            + self.lambda_init
        )

    @staticmethod
    def _project(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        # x [batch, pos, d_model] @ W [group, d_model, width] (+ b) -> [batch, pos, group, width]
        out = F.linear(x, rearrange(W, "group d_model width -> (group width) d_model"),
                       None if b is None else b.flatten())
        return rearrange(out, "batch pos (group width) -> batch pos group width", group=W.shape[0])

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        q, k = self._project(x, self.W_Q, self.b_Q), self._project(x, self.W_K, self.b_K)
        v = self._project(x, self.W_V, self.b_V)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        lambda_full = self.lambda_full().to(q.dtype)
        # [batch, pos, group, width] -> [batch, group, pos, width] for the attention kernels
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.fused_attn and not (is_hooked(self.hook_attn_scores) or is_hooked(self.hook_pattern)):
            q1, q2 = rearrange(q, "batch (head two) pos d_head -> two batch head pos d_head", two=2)
            k1, k2 = rearrange(k, "batch (head two) pos d_head -> two batch head pos d_head", two=2)
            z = F.scaled_dot_product_attention(q1, k1, v) - lambda_full * F.scaled_dot_product_attention(q2, k2, v)
        else:
            scores = self.hook_attn_scores((q * self.cfg.d_head**-0.5) @ k.transpose(-2, -1))
            maps = rearrange(scores.softmax(dim=-1), "batch (head two) query key -> two batch head query key", two=2)
            pattern = self.hook_pattern(maps[0] - lambda_full * maps[1])
            z = pattern @ v
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, 2 * d_head]
        z = self.sub_ln(z) * (1 - self.lambda_init).to(z.dtype)
        return project_output(z, self.W_O, self.b_O, self.ln, self.hook_result if self.use_attn_result else None)
