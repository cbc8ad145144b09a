"""Pooling of the final tokens, the linear classifier and the zero-shot (text-embedding) head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from vitlens_patch.model.config import ViTConfig


def pool_tokens(resid: Float[Tensor, "batch pos d_model"], cfg: ViTConfig) -> Tensor:
    """Final tokens -> pooled features.

    Returns [batch, d_model]; [batch, 2, d_model] (class and distillation token) when
    ``cfg.pooling == "distilled"``; [batch, 2 * d_model] (class token, then the patch-token mean)
    for "token_avg"; every token [batch, pos, d_model] for "none". Average and max pooling read
    the patch tokens only, or every token with ``cfg.pool_include_prefix``. Attention pooling
    ("map") is a module, ``AttentionPool``.
    """
    if cfg.pooling == "none":
        return resid
    if cfg.pooling == "token":
        return resid[:, 0]
    if cfg.pooling == "distilled":
        return resid[:, :2]
    if cfg.pooling == "token_avg":
        return torch.cat([resid[:, 0], resid[:, cfg.n_prefix_tokens :].mean(dim=1)], dim=-1)
    patches = resid if cfg.pool_include_prefix else resid[:, cfg.n_prefix_tokens :]
    if cfg.pooling == "map":
        raise ValueError("pooling='map' needs the model's AttentionPool module (HookedViT.attn_pool)")
    if cfg.pooling == "avg":
        return patches.mean(dim=1)
    if cfg.pooling == "max":
        return patches.amax(dim=1)
    return 0.5 * (patches.amax(dim=1) + patches.mean(dim=1))


def pooled_features(pooled: Tensor, cfg: ViTConfig) -> Tensor:
    """What a backbone without a classifier returns: the pooled vector, or for a distilled model
    the mean of its class and distillation tokens (as timm's DeiT with ``num_classes=0``)."""
    return pooled.mean(dim=1) if cfg.pooling == "distilled" else pooled


class ClassifierHead(nn.Module):
    """``pooled @ W_U + b_U`` with W_U [d_pooled, n_classes] (b_U absent when not
    ``cfg.head_bias``, as in CLIP's image projection).

    A distilled model has a second head (W_U_dist, b_U_dist) on the distillation token; the
    logits are the mean of both heads, as in timm's DeiT at inference.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.pooling == "none":
            raise ValueError("a linear classifier needs a pooled vector, got pooling='none' (every token)")
        self.W_U = nn.Parameter(torch.empty(cfg.d_pooled, cfg.n_classes))
        self.b_U = nn.Parameter(torch.zeros(cfg.n_classes)) if cfg.head_bias else None
        self.distilled = cfg.pooling == "distilled"
        if self.distilled:
            self.W_U_dist = nn.Parameter(torch.empty(cfg.d_model, cfg.n_classes))
            self.b_U_dist = nn.Parameter(torch.zeros(cfg.n_classes)) if cfg.head_bias else None

    def forward(self, pooled: Tensor) -> Float[Tensor, "batch n_classes"]:
        if self.distilled:
            logits = F.linear(pooled[:, 0], self.W_U.T, self.b_U)
            return (logits + F.linear(pooled[:, 1], self.W_U_dist.T, self.b_U_dist)) / 2
        return F.linear(pooled, self.W_U.T, self.b_U)


class ZeroShotHead(nn.Module):
    """CLIP / SigLIP zero-shot classifier: image embedding against one text embedding per class.

    ``logits = exp(logit_scale) * cos(projection(features), text_embeddings) + logit_bias``, with
    ``logit_scale`` and ``logit_bias`` as CLIP (no bias) and SigLIP store them (the scale as its
    logarithm). ``projection`` maps the backbone's features to the joint embedding space (CLIP's
    ``visual_projection``); None when the features are already there (SigLIP).

    Args:
        text_embeddings: [n_classes, d_embed], normalised here.
        logit_scale: the log of the logit multiplier (a float or 0-dim tensor).
        logit_bias: added to every logit (SigLIP), or None.
        projection: features -> [batch, d_embed], or None.
    """

    def __init__(
        self,
        text_embeddings: Float[Tensor, "n_classes d_embed"],
        logit_scale: float | Tensor,
        logit_bias: float | Tensor | None = None,
        projection: nn.Module | None = None,
    ):
        super().__init__()
        if not isinstance(text_embeddings, Tensor) or text_embeddings.ndim != 2 or not len(text_embeddings):
            got = tuple(text_embeddings.shape) if isinstance(text_embeddings, Tensor) else type(text_embeddings).__name__
            raise ValueError(f"text_embeddings must be a tensor [n_classes, d_embed] with n_classes >= 1, got {got}")
        self.projection = projection
        self.register_buffer("text_embeddings", F.normalize(text_embeddings.detach().float(), dim=-1))
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale, dtype=torch.float).detach().reshape(()))
        bias = torch.as_tensor(0.0 if logit_bias is None else logit_bias, dtype=torch.float)
        self.register_buffer("logit_bias", bias.detach().reshape(()))

    def forward(self, features: Tensor) -> Float[Tensor, "batch n_classes"]:
        embeds = features if self.projection is None else self.projection(features)
        if embeds.ndim != 2 or embeds.shape[-1] != self.text_embeddings.shape[-1]:
            raise ValueError(
                f"image embeddings must be [batch, {self.text_embeddings.shape[-1]}] to match "
                f"text_embeddings, got {tuple(embeds.shape)}"
            )
        cosine = F.normalize(embeds, dim=-1) @ self.text_embeddings.to(embeds.dtype).T
        return cosine * self.logit_scale.exp().to(embeds.dtype) + self.logit_bias.to(embeds.dtype)
