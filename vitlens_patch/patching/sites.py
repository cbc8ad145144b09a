"""Where to patch: layer windows, token-position selectors and restore sites."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vitlens_patch.model.config import ViTConfig
from vitlens_patch.model.hooked_vit import HookedViT

KIND_HOOKS = {
    "attn": "hook_attn_out", "mlp": "hook_mlp_out", "resid": "hook_resid_post", "resid_pre": "hook_resid_pre",
}
HEAD_HOOKS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_result")
BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
PositionSelector = str | Sequence[int] | Tensor | None


@dataclass(frozen=True)
class Site:
    """Activations restored from the clean run: one hook, some token positions, maybe some heads.

    Attributes:
        hook_name: a block hook, e.g. ``blocks.3.hook_attn_out``.
        positions: token indices (prefix tokens included), or None for all tokens.
        heads: head indices for hooks with a head axis (q, k, v, z, result), or None for all.
    """

    hook_name: str
    positions: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None

    @property
    def layer(self) -> int:
        return int(BLOCK_HOOK.match(self.hook_name).group(1))


Cell = tuple[Site, ...]


def layer_window(center: int, window: int, n_layers: int) -> range:
    """Layers restored for a centre layer: ``range(max(0, c - w//2), min(L, c - w//2 + w))``.

    Window 3 is l-1, l, l+1; window 10 is ROME's [l-5, l+5). An even window is asymmetric: it
    reaches one layer further before the centre than after it (window 4 is l-2, l-1, l, l+1).
    Windows reaching past the first or last layer are clipped.

    Raises:
        ValueError: unless 1 <= window <= n_layers (a wider window would restore every layer at
            every centre, the same cell n_layers times).
    """
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= n_layers:
        raise ValueError(f"window must be an int in [1, {n_layers}] (the number of layers), got {window!r}")
    start = center - window // 2
    return range(max(0, start), min(n_layers, start + window))


def kind_hook(kind: str) -> str:
    """Sub-layer kind -> block hook suffix: attn -> hook_attn_out, mlp -> hook_mlp_out,
    resid -> hook_resid_post, resid_pre -> hook_resid_pre."""
    if kind not in KIND_HOOKS:
        raise ValueError(f"kind must be one of {sorted(KIND_HOOKS)}, got {kind!r}")
    return KIND_HOOKS[kind]


def resolve_positions(positions: PositionSelector, cfg: ViTConfig) -> tuple[int, ...]:
    """A position selector -> sorted token indices (prefix tokens first, index 0 = class token).

    Args:
        positions: None or "all" (every token), "cls" (the prefix tokens), "patches" (every patch
            token), a sequence of token indices, or a boolean mask over the patch grid
            [grid_h, grid_w] (selects those patches' tokens).
    """
    n_prefix, n_pos = cfg.n_prefix_tokens, cfg.n_pos
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return tuple(range(n_pos))
    if isinstance(positions, str):
        if positions == "cls":
            return tuple(range(n_prefix))
        if positions == "patches":
            return tuple(range(n_prefix, n_pos))
        raise ValueError(
            f"positions must be 'all', 'cls', 'patches', token indices or a patch-grid mask, got {positions!r}"
        )
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != cfg.grid_size:
            raise ValueError(
                f"positions mask must have the patch-grid shape {cfg.grid_size}, got {tuple(positions.shape)}"
            )
        return tuple(n_prefix + int(p) for p in positions.flatten().nonzero().flatten())
    indices = [int(p) for p in (positions.tolist() if isinstance(positions, Tensor) else positions)]
    bad = [p for p in indices if not 0 <= p < n_pos]
    if bad or not indices:
        raise ValueError(f"positions must be token indices in [0, {n_pos}), got {indices}")
    return tuple(sorted(set(indices)))


def check_site(site: Site, model: HookedViT) -> None:
    """Raise KeyError (with near matches) if a site names an unknown hook, ValueError if it names
    a non-block hook or out-of-range heads or positions."""
    model.check_hook_name(site.hook_name)
    cfg = model.cfg
    match = BLOCK_HOOK.match(site.hook_name)
    if match is None:
        raise ValueError(
            f"hook_name must be a block hook of this model such as 'blocks.0.hook_attn_out', "
            f"got {site.hook_name!r}"
        )
    if site.heads is not None:
        if match.group(2) not in HEAD_HOOKS:
            raise ValueError(f"heads apply only to {HEAD_HOOKS}, got hook {site.hook_name!r}")
        if any(not 0 <= h < cfg.n_heads for h in site.heads):
            raise ValueError(f"heads must be in [0, {cfg.n_heads}), got {list(site.heads)}")
    if site.positions is not None and any(not 0 <= p < cfg.n_pos for p in site.positions):
        raise ValueError(f"positions must be token indices in [0, {cfg.n_pos}), got {list(site.positions)}")
