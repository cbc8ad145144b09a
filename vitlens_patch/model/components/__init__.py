"""HookedViT's building blocks, one per file."""

from vitlens_patch.model.components.attention import Attention
from vitlens_patch.model.components.block import TransformerBlock
from vitlens_patch.model.components.diff_attention import DiffAttention
from vitlens_patch.model.components.embed import PatchEmbed, PosEmbed, PrefixTokens
from vitlens_patch.model.components.head import ClassifierHead, ZeroShotHead, pool_tokens, pooled_features
from vitlens_patch.model.components.layer_norm import LayerNorm, RMSNorm, make_norm
from vitlens_patch.model.components.mlp import MLP
from vitlens_patch.model.components.pooling import AttentionPool

__all__ = [
    "Attention", "AttentionPool", "ClassifierHead", "DiffAttention", "LayerNorm", "MLP", "RMSNorm", "PatchEmbed", "PosEmbed", "PrefixTokens",
    "TransformerBlock", "ZeroShotHead", "make_norm", "pool_tokens", "pooled_features",
]
