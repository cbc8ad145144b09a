"""Rotary position embeddings (RoPE) on the patch tokens' queries and keys, as timm's EVA-02,
RoPE-ViT and DINOv3 apply them."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from vitlens_patch.model.config import ViTConfig


class RotaryEmbedding(nn.Module):
    """Rotates each patch token's query or key by position-dependent angles.

    ``x * cos + rotate(x) * sin`` on the patch tokens; prefix tokens pass unchanged. ``rotate``
    pairs channels (0, 1), (2, 3), ... ("interleaved") or (i, i + d_head / 2) ("half"), with
    ``rotate(x)`` = (-x_b, x_a) for each pair (a, b).

    Buffers ``sin`` and ``cos`` [n_patches, head, d_head] (head = 1 when one table serves every
    head) hold the angles; a new model starts with angle 0 (no rotation) and the converters copy
    the original model's tables.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layout = cfg.rotary
        self.n_prefix_tokens = cfg.n_prefix_tokens
        shape = (cfg.n_patches, cfg.n_heads if cfg.rotary_per_head else 1, cfg.d_head)
        self.register_buffer("sin", torch.zeros(shape))
        self.register_buffer("cos", torch.ones(shape))

    def rotate(self, x: Float[Tensor, "batch n_patches head d_head"]) -> Float[Tensor, "batch n_patches head d_head"]:
        if self.layout == "half":
            first, second = x.chunk(2, dim=-1)
            return torch.cat([-second, first], dim=-1)
        # interleaved: (x0, x1, x2, x3) -> (-x1, x0, -x3, x2)
        return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)

    def forward(self, x: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
        prefix, patches = x[:, : self.n_prefix_tokens], x[:, self.n_prefix_tokens :]
        rotated = (patches * self.cos + self.rotate(patches) * self.sin).to(x.dtype)
        return torch.cat([prefix, rotated], dim=1)
