"""Patch, prefix-token and position embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from vitlens_patch.model.components.layer_norm import make_norm
from vitlens_patch.model.config import ViTConfig


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: a stride-``patch_size`` convolution.

    W_E [d_model, in_chans, patch_h, patch_w]; tokens come out row-major over the patch grid.
    With a CNN stem (``cfg.stem_channels`` > 0, timm's ``HybridEmbed``) the stem module
    ``stem`` runs first as one unit (``hook_stem`` [batch, stem_channels, feature_h, feature_w]
    is its output) and W_E [d_model, stem_channels, patch_h / stride_h, patch_w / stride_w]
    projects its feature map. With ``cfg.embed_norm`` a norm ``ln`` acts on the tokens.
    """

    def __init__(self, cfg: ViTConfig, stem: nn.Module | None = None):
        super().__init__()
        if bool(cfg.stem_channels) != (stem is not None):
            raise ValueError(
                f"stem must be the CNN stem module exactly when cfg.stem_channels > 0, got "
                f"stem_channels={cfg.stem_channels} and stem={type(stem).__name__}"
            )
        self.stem = stem
        self.hook_stem = HookPoint() if stem is not None else None  # [batch, stem_channels, feature_h, feature_w]
        in_chans = cfg.stem_channels or cfg.in_chans
        self.kernel = tuple(p // s for p, s in zip(cfg.patch_size, cfg.stem_stride))
        self.W_E = nn.Parameter(torch.empty(cfg.d_model, in_chans, *self.kernel))
        self.b_E = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.patch_embed_bias else None
        self.ln = make_norm(cfg, cfg.d_model) if cfg.embed_norm else None

    def forward(
        self, images: Float[Tensor, "batch channel height width"]
    ) -> Float[Tensor, "batch n_patches d_model"]:
        if self.stem is not None:
            images = self.hook_stem(self.stem(images))
        grid = F.conv2d(images, self.W_E, self.b_E, stride=self.kernel)
        tokens = rearrange(grid, "batch d_model grid_h grid_w -> batch (grid_h grid_w) d_model")
        return tokens if self.ln is None else self.ln(tokens)


class PrefixTokens(nn.Module):
    """Prepends the learned prefix tokens, W_prefix [n_prefix_tokens, d_model], in timm's order:
    class, distillation, registers."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.W_prefix = nn.Parameter(torch.empty(cfg.n_prefix_tokens, cfg.d_model))

    def forward(self, patches: Float[Tensor, "batch n_patches d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return torch.cat([self.W_prefix.expand(patches.shape[0], -1, -1), patches], dim=1)


class PosEmbed(nn.Module):
    """Learned absolute position embeddings for every token, [batch, pos, d_model].

    W_pos [n_pos, d_model], or [n_patches, d_model] when prefix positions are not embedded (timm's
    ``no_embed_class``); then the prefix rows are zeros, which adds exactly what timm adds.
    Without absolute position embeddings (``cfg.abs_pos_embed`` False, rotary-only models) W_pos
    is None and the embeddings are zeros. With ``cfg.dynamic_img_size`` a patch grid other than
    ``cfg.grid_size`` gets the patch rows resampled to it (bicubic, antialiased, in float32, as
    timm's ``resample_abs_pos_embed``); prefix rows are kept.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_unembedded = 0 if cfg.pos_embed_prefix else cfg.n_prefix_tokens
        self.n_prefix_rows = cfg.n_prefix_tokens - self.n_unembedded
        self.grid_size = cfg.grid_size
        self.d_model = cfg.d_model
        self.W_pos = (
            nn.Parameter(torch.empty(cfg.n_pos - self.n_unembedded, cfg.d_model)) if cfg.abs_pos_embed else None
        )

    def resampled(self, grid: tuple[int, int]) -> Float[Tensor, "rows d_model"]:
        """W_pos with its patch rows resampled from ``cfg.grid_size`` to ``grid``."""
        if tuple(grid) == tuple(self.grid_size):
            return self.W_pos
        prefix, patches = self.W_pos[: self.n_prefix_rows], self.W_pos[self.n_prefix_rows :]
        patches = rearrange(patches.float(), "(h w) d_model -> 1 d_model h w", h=self.grid_size[0])
        patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", antialias=True)
        patches = rearrange(patches, "1 d_model h w -> (h w) d_model").to(self.W_pos.dtype)
        return torch.cat([prefix, patches])

    def forward(
        self, patches: Float[Tensor, "batch n_patches d_model"], grid: tuple[int, int] | None = None
    ) -> Float[Tensor, "batch pos d_model"]:
        """Position embeddings for a batch like ``patches`` (its size, device and dtype) on the
        patch ``grid`` (default ``cfg.grid_size``)."""
        grid = self.grid_size if grid is None else grid
        if self.W_pos is None:
            n_pos = self.n_unembedded + self.n_prefix_rows + grid[0] * grid[1]
            return patches.new_zeros(n_pos, self.d_model).expand(len(patches), -1, -1)
        return F.pad(self.resampled(grid), (0, 0, self.n_unembedded, 0)).expand(len(patches), -1, -1)
