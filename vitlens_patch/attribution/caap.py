"""CAAP: Causal Attribution via Activation Patching.

Each patch's source activations are inserted into a neutral context over an intermediate block
range; the resulting class score, relative to the context's own score, is that patch's attribution.
The paper's exact settings are not public; every choice here is a parameter with a documented
default. CAAP is one call of the patching engine (``run_restore``): source = the engine's clean
run, context = its corrupted run, one cell per patch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from vitlens_patch.attribution.base import Attributor
from vitlens_patch.checks import Target, check_positive_int, check_target
from vitlens_patch.images import Fill, fill_images
from vitlens_patch.model import HookedViT
from vitlens_patch.patching.attribution_patching import METHODS, restore_cells
from vitlens_patch.patching.sites import Site


def default_layers(n_layers: int) -> tuple[int, int]:
    """The middle half of the network: blocks [n_layers // 4, n_layers - n_layers // 4)."""
    return n_layers // 4, n_layers - n_layers // 4


def context_images(
    model: HookedViT, images: Float[Tensor, "batch channel height width"], context: Fill
) -> Float[Tensor, "batch channel height width"]:
    """The neutral target context for each image, as normalised model input.

    One fill vocabulary (:func:`~vitlens_patch.images.fill_images`): "blur" (Gaussian blur with
    sigma = max(height, width) / 8 pixels: strong, a 64-pixel image keeps only its coarse colour
    layout), "zeros" (black pixels), "mean" (the normalisation's mean colour: model input 0) or a
    tensor broadcastable to ``images``.
    """
    data_config = model.data_config
    return fill_images(
        images, context, normalization=(data_config.mean, data_config.std), sigma=max(model.cfg.img_size) / 8,
        argument="context",
    )


def check_block_range(layers: tuple[int, int] | None, n_layers: int) -> tuple[int, int]:
    """``layers`` as a checked half-open block range (start, stop); None gives :func:`default_layers`."""
    if layers is None:
        return default_layers(n_layers)
    if len(layers) != 2 or not 0 <= layers[0] < layers[1] <= n_layers:
        raise ValueError(f"layers must be a block range (start, stop) with 0 <= start < stop <= {n_layers}, got {layers}")
    return int(layers[0]), int(layers[1])


def caap(
    model: HookedViT,
    images: Float[Tensor, "batch channel height width"],
    *,
    target: Target = None,
    layers: tuple[int, int] | None = None,
    context="blur",
    score="logit",
    batch_size: int | None = None,
    rows_per_pass: int | None = None,
    upsample: Literal[False, "bilinear", "bicubic"] = False,
    method: str = "exact",
    verify_top_k: int | None = None,
    dtype: torch.dtype | None = None,
    return_exact: bool = False,
    progress: bool = True,
) -> Float[Tensor, "batch grid_h grid_w"] | tuple[Tensor, Tensor]:
    """CAAP attribution maps.

    Definition: ``layers`` = (start, stop) is a half-open block range (default the middle half,
    ``default_layers``). The source run on each image is cached. The context run (the target
    context, see ``context_images``) is computed once up to block ``start`` and shared by all
    patches. Row i of the batched run then, at every block l in [start, stop), replaces the residual
    stream entering block l (``blocks.{l}.hook_resid_pre``) at patch i's token with the source
    run's value there, and runs to the logits. Attribution of patch i = score(row i) -
    score(context run).

    ``method="attribution"`` estimates every patch's insertion effect from one source forward
    pass and one context forward + backward pass per batch of images
    (:func:`~vitlens_patch.patching.attribution_patching.estimate_restore`). Derivation: write
    the score of the context run as ``f(a_start[t], ..., a_(stop-1)[t])``, a function of token
    t's residual stream entering each block of the range, and let ``d_l = a_source,l[t] -
    a_context,l[t]``. To first order, setting one of them alone changes the score by
    ``d_l . g_l`` with ``g_l = d f / d a_l[t]`` on the context run (one backward pass gives every
    l and t); the estimate of inserting all of them is the sum over the range,
    ``sum_l d_l . g_l``, with AtP*'s QK fix on each term (the query and key of token t in block l
    are the source run's, so that block's softmax is recomputed exactly). The sum is not the
    joint first-order effect: inserting ``a_l[t]`` also moves ``a_(l+1)[t]``, which the next
    insertion overwrites, so the terms double-count token t's own residual path (by up to the
    range's length); the exact joint derivative needs a backward pass per patch. Maps are
    therefore compared per image by rank and correlation (``benchmarks/fast_patching.py``
    measures the agreement), and ``verify_top_k=k`` rescores each image's k best patches exactly.

    Args:
        model: the HookedViT.
        images: normalised images [batch, channel, height, width].
        target: class per image (int or [batch]); default the source run's prediction.
        layers: (start, stop) block range.
        context: "blur" (default), "zeros", "mean" or a tensor, see :func:`context_images`.
        score: "logit" (default), "prob", "logprob", ("logit_diff", c) or a callable
            (logits, target) -> [batch].
        batch_size: images per engine call (each caches its source and context runs); default
            all of them in one call.
        rows_per_pass: (image, patch) rows per batched pass; default None, the engine's memory
            budget for the model's device type (``engine.rows_per_pass_within``: 96 MB on the
            CPU, 4 GB on CUDA).
        upsample: False for [batch, grid_h, grid_w]; "bilinear" / "bicubic" for [batch, H, W].
        method: "exact" (the engine) or "attribution" (the estimate above).
        verify_top_k: with "attribution", score each image's k largest estimates exactly.
        dtype: compute precision: None (the model's) or ``torch.bfloat16`` (``torch.float16`` on
            CUDA), see ``engine.precision``; never a default (slower on CPUs without native bf16).
        return_exact: also return ``exact`` [batch, grid_h, grid_w], True where the map holds the
            engine's value (everywhere for "exact", the verified patches for "attribution").
        progress: progress bar.

    Returns:
        maps [batch, grid_h, grid_w] (or [batch, height, width] when upsampled); with
        ``return_exact``, (maps, exact).
    """
    cfg = model.cfg
    start, stop = check_block_range(layers, cfg.n_layers)
    if upsample not in (False, None, "bilinear", "bicubic"):
        raise ValueError(f"upsample must be False, 'bilinear' or 'bicubic', got {upsample!r}")
    images = model.check_images(images)
    n_images = len(images)
    batch_size = check_positive_int(batch_size, "batch_size", allow_none=True) or n_images
    target = check_target(target, n_images, cfg.n_classes, images.device)
    cells = [
        tuple(Site(f"blocks.{layer}.hook_resid_pre", (cfg.n_prefix_tokens + patch,)) for layer in range(start, stop))
        for patch in range(cfg.n_patches)
    ]
    contexts = context_images(model, images, context)
    effects, exact = [], []
    for chunk in (slice(i, i + batch_size) for i in range(0, n_images, batch_size)):
        output, chunk_exact = restore_cells(
            model, images[chunk], contexts[chunk], cells, method=method, verify_top_k=verify_top_k, score=score,
            target=None if target is None else target[chunk], rows_per_pass=rows_per_pass, dtype=dtype,
            progress=progress,
        )
        effects.append(output.effects)
        exact.append(chunk_exact)
    grid_h = cfg.grid_size[0]
    maps = rearrange(torch.cat(effects), "batch (grid_h grid_w) -> batch grid_h grid_w", grid_h=grid_h)
    if upsample:
        maps = F.interpolate(maps[:, None], size=cfg.img_size, mode=upsample, align_corners=False)[:, 0]
    if return_exact:
        return maps, rearrange(torch.cat(exact), "batch (grid_h grid_w) -> batch grid_h grid_w", grid_h=grid_h)
    return maps


class CAAP(Attributor):
    """CAAP behind the common ``Attributor`` interface (registry name "caap").

    Args:
        model: the HookedViT.
        layers, context, method, verify_top_k, dtype: see :func:`caap`.
        rows_per_pass: (image, patch) rows per batched pass; default None, the engine's memory
            budget for the model's device type (4 GB on CUDA), see :func:`caap`.
        score, upsample, batch_size, progress: as for every ``Attributor``; ``batch_size`` counts
            images per engine call.
    """

    def __init__(
        self, model: HookedViT, *, layers: tuple[int, int] | None = None, context="blur", method: str = "exact",
        verify_top_k: int | None = None, rows_per_pass: int | None = None, dtype: torch.dtype | None = None,
        **options,
    ):
        super().__init__(model, **options)
        self.layers = check_block_range(layers, model.cfg.n_layers)
        self.context = context
        self.rows_per_pass = rows_per_pass
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.verify_top_k, self.dtype = method, verify_top_k, dtype

    @property
    def requires_gradients(self) -> bool:
        return self.method == "attribution"

    def _attribute(self, images: Tensor, target: Tensor | None) -> Tensor:
        return caap(
            self.model, images, target=target, layers=self.layers, context=self.context,
            score=self.score, batch_size=self.batch_size, rows_per_pass=self.rows_per_pass, method=self.method,
            verify_top_k=self.verify_top_k, dtype=self.dtype, progress=self.progress,
        )

