"""Pooling of the final tokens and the linear classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from vitlens_patch.model.config import ViTConfig


def pool_tokens(resid: Float[Tensor, "batch pos d_model"], cfg: ViTConfig) -> Tensor:
    """Final tokens -> pooled features.

    Returns [batch, d_model], or [batch, 2, d_model] (class and distillation token) when
    ``cfg.pooling == "distilled"``. Average and max pooling read the patch tokens only.
    """
    if cfg.pooling == "token":
        return resid[:, 0]
    if cfg.pooling == "distilled":
        return resid[:, :2]
    patches = resid[:, cfg.n_prefix_tokens :]
    if cfg.pooling == "avg":
        return patches.mean(dim=1)
    if cfg.pooling == "max":
        return patches.amax(dim=1)
    return 0.5 * (patches.amax(dim=1) + patches.mean(dim=1))


class ClassifierHead(nn.Module):
    """``pooled @ W_U + b_U`` with W_U [d_model, n_classes].

    A distilled model has a second head (W_U_dist, b_U_dist) on the distillation token; the
    logits are the mean of both heads, as in timm's DeiT at inference.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.n_classes))
        self.b_U = nn.Parameter(torch.zeros(cfg.n_classes))
        self.distilled = cfg.distilled
        if cfg.distilled:
            self.W_U_dist = nn.Parameter(torch.empty(cfg.d_model, cfg.n_classes))
            self.b_U_dist = nn.Parameter(torch.zeros(cfg.n_classes))

    def forward(self, pooled: Tensor) -> Float[Tensor, "batch n_classes"]:
        if self.distilled:
            logits = F.linear(pooled[:, 0], self.W_U.T, self.b_U)
            return (logits + F.linear(pooled[:, 1], self.W_U_dist.T, self.b_U_dist)) / 2
        return F.linear(pooled, self.W_U.T, self.b_U)
