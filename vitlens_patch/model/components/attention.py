"""Multi-head self-attention with TransformerLens hook points."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from vitlens_patch.model.components.layer_norm import is_hooked, make_norm
from vitlens_patch.model.components.relative_position import RelativePositionBias
from vitlens_patch.model.components.rotary import RotaryEmbedding
from vitlens_patch.model.config import ViTConfig


class Attention(nn.Module):
    """Bidirectional multi-head attention.

    Weights follow TransformerLens: W_Q, W_K, W_V [head, d_model, d_head], W_O [head, d_head, d_model].
    When neither ``hook_attn_scores`` nor ``hook_pattern`` is hooked and ``fused_attn`` is True
    (the default, as in timm), the pattern is never materialised and
    ``F.scaled_dot_product_attention`` is used; otherwise the pattern is computed explicitly.
    Both paths agree within 1e-5.

    Options: ``q_norm`` / ``k_norm`` (qk-norm), ``rotary`` (rotary position embeddings,
    applied after qk-norm: ``hook_q`` and ``hook_k`` see the rotated queries and keys), ``ln``
    (a LayerNorm on the concatenated head outputs before W_O, timm's ``scale_attn_inner``),
    ``rel_pos`` (a learned relative position bias [head, query_pos, key_pos] added to the scaled
    scores: ``hook_attn_scores`` sees it added; the fused kernel takes it as its additive mask).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        shape = (cfg.n_heads, cfg.d_model, cfg.d_head)
        self.W_Q = nn.Parameter(torch.empty(shape))
        self.W_K = nn.Parameter(torch.empty(shape))
        self.W_V = nn.Parameter(torch.empty(shape))
        self.W_O = nn.Parameter(torch.empty(cfg.n_heads, cfg.d_head, cfg.d_model))
        bias = (lambda: nn.Parameter(torch.zeros(cfg.n_heads, cfg.d_head))) if cfg.qkv_bias else (lambda: None)
        self.b_Q, self.b_K, self.b_V = bias(), bias(), bias()
        self.b_O = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.proj_bias else None
        self.q_norm = make_norm(cfg, cfg.d_head) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, cfg.d_head) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(cfg) if cfg.rotary != "none" else None
        self.ln = make_norm(cfg, cfg.n_heads * cfg.d_head) if cfg.attn_norm else None
        self.rel_pos = RelativePositionBias(cfg) if cfg.n_relative_positions else None
        self.use_attn_result = False
        self.fused_attn = True  # False: always materialise the pattern (timm's switch of that name)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]: after qk-norm and rotary
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]: after qk-norm and rotary
        self.hook_v = HookPoint()  # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]: scaled (+ rel-pos bias), pre-softmax
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]: softmax of the scores
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]: pattern-weighted values
        self.hook_result = HookPoint()  # [batch, pos, head, d_model]: per-head output (use_attn_result)

    def _build_fused_qkv(self) -> tuple[Tensor, Tensor | None]:
        """W_Q, W_K, W_V as timm's fused weight [3 * head * d_head, d_model] and bias."""
        weight = rearrange(
            torch.stack([self.W_Q, self.W_K, self.W_V]),
            "three head d_model d_head -> (three head d_head) d_model",
        )
        bias = None if self.b_Q is None else torch.cat([self.b_Q, self.b_K, self.b_V]).flatten()
        return weight, bias

    def _fused_qkv(self) -> tuple[Tensor, Tensor | None]:
        """The fused q / k / v weight and bias. Without gradients to the weights (inference, or
        frozen weights) they are kept between calls and rebuilt when any of W_Q / W_K / W_V / b_*
        changes (its storage, or an in-place edit: the tensor version); with gradients they are
        built each call, so they stay differentiable."""
        params = (self.W_Q, self.W_K, self.W_V, self.b_Q, self.b_K, self.b_V)
        if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
            return self._build_fused_qkv()
        key = tuple(None if p is None else (p.data_ptr(), p._version, p.device, p.dtype, p.shape) for p in params)
        cached = getattr(self, "_qkv_cache", None)
        if cached is None or cached[0] != key:
            # normal tensors even under inference_mode, so frozen-weight runs with gradients can use them
            with torch.inference_mode(False), torch.no_grad():
                cached = self._qkv_cache = (key, self._build_fused_qkv())
        return cached[1]

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # One fused matmul for q, k and v, as timm does.
        weight, bias = self._fused_qkv()
        qkv = F.linear(x, weight, bias)
        qkv = rearrange(
            qkv, "batch pos (three head d_head) -> three batch pos head d_head",
            three=3, head=self.cfg.n_heads,
        )
        return qkv.unbind(0)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        q, k, v = self._qkv(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        # [batch, pos, head, d_head] -> [batch, head, pos, d_head] for the attention kernels
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        bias = None if self.rel_pos is None else self.rel_pos()[None]  # [1, head, query_pos, key_pos]
        if not self.fused_attn or is_hooked(self.hook_attn_scores) or is_hooked(self.hook_pattern):
            scores = (q * self.cfg.d_head**-0.5) @ k.transpose(-2, -1)
            scores = self.hook_attn_scores(scores if bias is None else scores + bias)
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            z = pattern @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        return project_output(z, self.W_O, self.b_O, self.ln, self.hook_result if self.use_attn_result else None)


def project_output(
    z: Float[Tensor, "batch pos head width"],
    W_O: Float[Tensor, "head width d_model"],
    b_O: Float[Tensor, " d_model"] | None,
    ln: nn.Module | None,
    hook_result: HookPoint | None,
) -> Float[Tensor, "batch pos d_model"]:
    """The attention output ``sum_head z W_O + b_O``. With ``ln`` (a norm over all heads' z, EVA-02's
    sub-LN) there are no per-head results; else with ``hook_result`` (``use_attn_result``) the
    per-head results [batch, pos, head, d_model] pass through it before the sum; else one matmul."""
    if ln is None and hook_result is not None:
        result = hook_result(einsum(z, W_O, "batch pos head width, head width d_model -> batch pos head d_model"))
        out = result.sum(dim=2)
        return out if b_O is None else out + b_O
    z_flat = rearrange(z, "batch pos head width -> batch pos (head width)")
    if ln is not None:
        z_flat = ln(z_flat)
    return F.linear(z_flat, rearrange(W_O, "head width d_model -> d_model (head width)"), b_O)
