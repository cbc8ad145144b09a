"""The hooked model: architecture config, components and HookedViT."""

from vitlens_patch.model.config import ViTConfig
from vitlens_patch.model.hooked_vit import HookedViT
from vitlens_patch.model.preprocess import DataConfig

__all__ = ["DataConfig", "HookedViT", "ViTConfig"]
