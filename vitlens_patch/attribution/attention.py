"""Attention-based maps: attention rollout and Chefer et al.'s gradient-weighted relevance."""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vitlens_patch.attribution.base import Attributor
from vitlens_patch.model import HookedViT, ViTConfig

# head fusion name -> [batch, head, query_pos, key_pos] -> [batch, query_pos, key_pos]
HEAD_FUSIONS = {
    "mean": lambda pattern: pattern.mean(dim=1),
    "max": lambda pattern: pattern.amax(dim=1),
    "min": lambda pattern: pattern.amin(dim=1),
}


def pattern_hook_names(n_layers: int) -> list[str]:
    return [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]


def read_patch_relevance(
    relevance: Float[Tensor, "batch query_pos key_pos"], cfg: ViTConfig
) -> Float[Tensor, "batch n_patches"]:
    """How much each patch token feeds the tokens the classifier pools.

    Token pooling reads the class token's row (token 0), distilled models the mean of the class
    and distillation rows, average / max pooling the mean of the patch rows. Columns of prefix
    tokens (class, registers) are dropped.
    """
    n_prefix = cfg.n_prefix_tokens
    if cfg.pooling == "token":
        rows = relevance[:, :1]
    elif cfg.pooling == "distilled":
        rows = relevance[:, :2]
    else:
        rows = relevance[:, n_prefix:]
    return rows.mean(dim=1)[:, n_prefix:]


class AttentionRollout(Attributor):
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

    Per block, heads are fused (``head_fusion``), the identity is added for the residual
    connection and rows are renormalised: ``A = norm(fuse_h(A_h) + I)``; the rollout is the
    product ``A_L ... A_1``, read at the pooled tokens' rows over the patch columns.
    Class-agnostic (``uses_target`` is False) and gradient-free.

    Args:
        model, upsample, batch_size, progress: see ``Attributor``.
        head_fusion: "mean" (the paper), "max" or "min" over heads.
    """

    def __init__(
        self, model: HookedViT, *, head_fusion: Literal["mean", "max", "min"] = "mean", **options
    ):
        super().__init__(model, **options)
        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {tuple(HEAD_FUSIONS)}, got {head_fusion!r}")
        self.head_fusion = head_fusion

    uses_target = False

    def _attribute_patches(
        self, images: Float[Tensor, "batch channel height width"], target: Int[Tensor, " batch"] | None
    ) -> Float[Tensor, "batch n_patches"]:
        cfg = self.model.cfg
        identity = torch.eye(cfg.n_pos, device=images.device, dtype=images.dtype)
        rollout = identity.expand(len(images), -1, -1)

        # Multiply layer by layer inside the hook, so no full pattern stack is ever kept.
        def roll(pattern: Float[Tensor, "batch head query_pos key_pos"], hook) -> None:
            nonlocal rollout
            fused = HEAD_FUSIONS[self.head_fusion](pattern) + identity
            rollout = (fused / fused.sum(dim=-1, keepdim=True)) @ rollout

        hooks = [(name, roll) for name in pattern_hook_names(cfg.n_layers)]
        with torch.no_grad(), self.model.hooks(fwd_hooks=hooks):
            self.model(images)
        return read_patch_relevance(rollout, cfg)


class CheferAttention(Attributor):
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf 2021, "Generic
    Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers").

    With ``R = I`` and, block by block, ``A_bar = mean_h((dscore/dA_h * A_h)^+)``,
    ``R = R + A_bar R``; the map is R at the pooled tokens' rows over the patch columns.
    One forward and one backward pass per batch; ``score`` is what is differentiated.

    Args:
        model, score, upsample, batch_size, progress: see ``Attributor``.
    """

    requires_gradients = True

    def _attribute_patches(
        self, images: Float[Tensor, "batch channel height width"], target: Int[Tensor, " batch"] | None
    ) -> Float[Tensor, "batch n_patches"]:
        cfg = self.model.cfg
        patterns, grads = self._score_gradients(images, target, pattern_hook_names(cfg.n_layers))
        relevance = torch.eye(cfg.n_pos, device=images.device, dtype=images.dtype).expand(len(images), -1, -1)
        for pattern, grad in zip(patterns, grads):
            weighted = (grad * pattern).clamp(min=0).mean(dim=1)
            relevance = relevance + weighted @ relevance
        return read_patch_relevance(relevance, cfg)
