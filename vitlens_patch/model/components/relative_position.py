"""Learned relative position bias on the attention scores, as timm's BEiT and relative-position
ViTs (``VisionTransformerRelPos``) add it."""

from __future__ import annotations

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from vitlens_patch.model.config import ViTConfig


class RelativePositionBias(nn.Module):
    """One bias per head and (query, key) pair, looked up in a learned table by relative position.

    ``bias[head, query_pos, key_pos] = W_rel[index[query_pos, key_pos], head]``, added to the scaled
    scores before the softmax (``attn.hook_attn_scores`` sees it added).

    W_rel [n_relative_positions, head] is the learned table; the buffer ``index`` [pos, pos] (long)
    says which row each pair reads (BEiT: one row per 2-D offset between patches and three rows for
    class-to-patch, patch-to-class and class-to-class). A new model reads row 0 everywhere (a
    constant per query, which the softmax ignores); the converters copy the original model's index.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.W_rel = nn.Parameter(torch.empty(cfg.n_relative_positions, cfg.n_heads))
        self.register_buffer("index", torch.zeros(cfg.n_pos, cfg.n_pos, dtype=torch.long))

    def forward(self) -> Float[Tensor, "head query_pos key_pos"]:
        return rearrange(self.W_rel[self.index], "query_pos key_pos head -> head query_pos key_pos")
