"""HookedViT's building blocks, one per file."""

from vitlens_patch.model.components.attention import Attention
from vitlens_patch.model.components.block import TransformerBlock
from vitlens_patch.model.components.embed import PatchEmbed, PosEmbed, PrefixTokens
from vitlens_patch.model.components.head import ClassifierHead, ZeroShotHead, pool_tokens, pooled_features
from vitlens_patch.model.components.layer_norm import LayerNorm
from vitlens_patch.model.components.mlp import MLP

__all__ = [
    "Attention", "ClassifierHead", "LayerNorm", "MLP", "PatchEmbed", "PosEmbed", "PrefixTokens",
    "TransformerBlock", "ZeroShotHead", "pool_tokens", "pooled_features",
]
