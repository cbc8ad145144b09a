"""Slow, plain reference implementations: test oracles, also timed by the benchmarks."""

from __future__ import annotations

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from vitlens_patch.attribution.caap import check_block_range, context_images
from vitlens_patch.model import HookedViT


def caap_per_patch_reference(
    model: HookedViT,
    images: Float[Tensor, "batch channel height width"],
    *,
    layers: tuple[int, int] | None = None,
    context="blur",
    target: int | None = None,
) -> Float[Tensor, "batch grid_h grid_w"]:
    """CAAP (logit score; the ``target`` class, by default the predicted one) the slow, plain way:
    one full forward pass per (image, patch), with hooks inserting the source activations. For
    checking :func:`vitlens_patch.attribution.caap.caap` and timing it."""
    cfg = model.cfg
    start, stop = check_block_range(layers, cfg.n_layers)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(start, stop)]
    contexts = context_images(model, images, context)
    maps = torch.empty(len(images), cfg.n_patches)
    with torch.no_grad():
        source_logits, source = model.run_with_cache(images, names_filter=lambda name: name in names)
        target = source_logits.argmax(-1) if target is None else torch.full((len(images),), target)
        context_logit = model(contexts).gather(1, target[:, None])[:, 0]
        for i in range(len(images)):
            for patch in range(cfg.n_patches):
                token = cfg.n_prefix_tokens + patch

                def insert(act: Tensor, hook, i=i, token=token) -> Tensor:
                    act = act.clone()
                    act[:, token] = source[hook.name][i, token]
                    return act

                logits = model.run_with_hooks(contexts[i : i + 1], fwd_hooks=[(name, insert) for name in names])
                maps[i, patch] = logits[0, target[i]] - context_logit[i]
    return rearrange(maps, "batch (grid_h grid_w) -> batch grid_h grid_w", grid_h=cfg.grid_size[0])
