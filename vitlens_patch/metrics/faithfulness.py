"""Faithfulness metrics: does the model's belief follow the map when we remove what it highlights?

Deletion and insertion (Petsiuk et al. 2018, RISE) perturb pixels; token deletion drops patch
tokens after the embedding. All three rank the map's units (patches, pixels or tokens) from most
to least attributed, perturb a growing share of them in ``n_steps`` steps, record the target's
softmax probability and integrate it over the perturbed fraction with the trapezoid rule.

Every perturbed input of a call is built lazily and run in chunks of ``batch_size`` so 500 images
of 224 pixels fit in memory. Run the model in eval mode: the metrics do not change its mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from typing import TYPE_CHECKING, Literal

import torch
from einops import rearrange, repeat
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from vitlens_patch.checks import Target, check_images, check_positive_int, check_target
from vitlens_patch.metrics.localization import check_maps, check_tiling, resample_maps
from vitlens_patch.images import Fill, fill_images

if TYPE_CHECKING:
    from vitlens_patch.model import HookedViT
    from vitlens_patch.model.preprocess import DataConfig


# RISE's insertion canvas: an 11-pixel Gaussian kernel with sigma 5.
_BLUR_KERNEL_SIZE = 11
_BLUR_SIGMA = 5.0


@dataclass(frozen=True)
class PerturbationCurve:
    """Target probability against the perturbed fraction, and its area.

    Attributes:
        fractions: ``[step]`` share of units perturbed (removed, inserted or dropped), 0 to 1.
        probs: ``[batch, step]`` softmax probability of the target class at each step.
        auc: ``[batch]`` trapezoid area under ``probs`` over ``fractions``.
    """

    fractions: Float[Tensor, "step"]
    probs: Float[Tensor, "batch step"]
    auc: Float[Tensor, "batch"]


def _unit_counts(n_units: int, n_steps: int) -> Int[Tensor, "step"]:
    """Units perturbed after step k = 0..n_steps: round(k * n_units / n_steps)."""
    steps = torch.arange(n_steps + 1)
    return (2 * steps * n_units + n_steps) // (2 * n_steps)


def _ranks(values: Float[Tensor, "batch n_units"]) -> Int[Tensor, "batch n_units"]:
    """Rank of each unit, 0 = largest value; ties go in row-major order (stable sort)."""
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return torch.argsort(order, dim=1)


def _resolve_target(
    forward: Callable[[Tensor], Tensor], images: Tensor, target: Target, batch_size: int
) -> Int[Tensor, "batch"]:
    """Class indices ``[batch]``; None means the model's prediction on the clean images."""
    batch = images.shape[0]
    if target is None:
        with torch.no_grad():
            return torch.cat([
                _check_logits(forward(chunk), len(chunk)).argmax(dim=-1)
                for chunk in images.split(batch_size)
            ])
    with torch.no_grad():
        n_classes = _check_logits(forward(images[:1]), 1).shape[1]
    return check_target(target, batch, n_classes, images.device)


def _check_logits(logits: Tensor, batch: int) -> Float[Tensor, "batch n_classes"]:
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != batch:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"model must return logits [batch, n_classes], got {got} for a batch of {batch}"
        )
    return logits


def _target_probs(logits: Tensor, target: Int[Tensor, "batch"]) -> Float[Tensor, "batch"]:
    logits = _check_logits(logits, target.shape[0])
    return logits.softmax(dim=-1).gather(1, target[:, None]).squeeze(1)


def _unit_maps(
    maps: Tensor, images: Tensor, unit: str, model: Callable[[Tensor], Tensor]
) -> Float[Tensor, "batch unit_h unit_w"]:
    """Maps at the resolution of the perturbed units: pixels, or the model's patch grid."""
    size = tuple(images.shape[-2:])
    maps = check_maps(maps, images.shape[0], size, other="images")
    if unit == "pixel":
        return resample_maps(maps, size)
    if unit != "patch":
        raise ValueError(f"unit must be 'patch' or 'pixel', got {unit!r}")
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        check_tiling(tuple(maps.shape[1:]), tuple(cfg.grid_size), other="model.cfg.grid_size")
        return resample_maps(maps, tuple(cfg.grid_size))
    if tuple(maps.shape[1:]) == size:
        raise ValueError(
            "unit='patch' with pixel maps needs the patch grid from model.cfg.grid_size; pass "
            "patch maps [batch, grid_h, grid_w] or unit='pixel'"
        )
    # Without a config, a map coarser than the image is taken to be the patch grid itself.
    return maps


def perturbation_curve(
    model: Callable[[Tensor], Tensor],
    images: Float[Tensor, "batch channel height width"],
    maps: Float[Tensor, "batch map_h map_w"],
    target: Target = None,
    *,
    mode: Literal["deletion", "insertion"],
    baseline: Fill,
    n_steps: int = 16,
    unit: Literal["patch", "pixel"] = "patch",
    data_config: DataConfig | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> PerturbationCurve:
    """Deletion or insertion curve (RISE): probability as units are removed or inserted.

    Units ``u_1, ..., u_N`` (patches or pixels) are sorted by decreasing map value (ties in
    row-major order). Step ``k = 0..K`` (``K = n_steps``) changes the first
    ``c_k = round(k N / K)`` of them::

        deletion:   x_k = image    with u_1..u_{c_k} set to the baseline
        insertion:  x_k = baseline with u_1..u_{c_k} set to the image
        f_k = c_k / N,   p_k = softmax(model(x_k))[target]
        AUC = sum_{k=1..K} (f_k - f_{k-1}) (p_k + p_{k-1}) / 2

    Args:
        model: ``logits [batch, n_classes] = model(images)``; a HookedViT or any callable.
        images: normalised model inputs ``[batch, channel, height, width]``.
        maps: attributions ``[batch, grid_h, grid_w]`` or ``[batch, height, width]``, finite.
            They are mean-pooled or nearest-upsampled to the units.
        target: class per image (int or ``[batch]``); None uses the model's prediction.
        mode: "deletion" or "insertion".
        baseline: the fill vocabulary of :func:`~vitlens_patch.images.fill_images`: "blur"
            (Gaussian blur, kernel 11, sigma 5, as RISE's insertion canvas), "zeros" (black
            pixels, normalised with ``data_config``; "black" is its deprecated spelling), "mean"
            (the normalisation's mean colour, model input 0) or a tensor of normalised inputs
            broadcastable to ``images``.
        n_steps: number of steps ``K >= 1``; the curve has ``K + 1`` points.
        unit: "patch" (cells of ``model.cfg.grid_size``, or of the map itself for callables
            without ``cfg``) or "pixel".
        data_config: normalisation for "zeros"; defaults to ``model.data_config``.
        batch_size: perturbed images per forward pass.
        progress: show a tqdm progress bar.

    Returns:
        :class:`PerturbationCurve` with ``fractions [K + 1]``, ``probs [batch, K + 1]``,
        ``auc [batch]``.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    check_images(images)
    check_positive_int(n_steps, "n_steps")
    check_positive_int(batch_size, "batch_size")
    unit_maps = _unit_maps(maps, images, unit, model).to(images.device)
    data_config = data_config if data_config is not None else getattr(model, "data_config", None)
    normalization = None if data_config is None else (data_config.mean, data_config.std)
    reference = fill_images(
        images, baseline, normalization=normalization, sigma=_BLUR_SIGMA, kernel_size=_BLUR_KERNEL_SIZE,
        argument="baseline",
    )
    start, end = (images, reference) if mode == "deletion" else (reference, images)
    target = _resolve_target(model, images, target, batch_size)

    batch, n_steps_total = images.shape[0], n_steps + 1
    unit_h, unit_w = unit_maps.shape[1:]
    ranks = _ranks(unit_maps.flatten(1))
    counts = _unit_counts(unit_h * unit_w, n_steps).to(images.device)
    probs = torch.empty(batch * n_steps_total, device=images.device)
    with torch.no_grad():
        # One flat index per (image, step) pair, so a chunk can span images and steps.
        flat = torch.arange(batch * n_steps_total, device=images.device)
        for index in tqdm(flat.split(batch_size), desc=mode, disable=not progress):
            image, step = index // n_steps_total, index % n_steps_total
            changed = ranks[image] < counts[step, None]  # [chunk, n_units]
            changed = repeat(
                changed, "chunk (h w) -> chunk 1 (h ph) (w pw)", h=unit_h,
                ph=images.shape[-2] // unit_h, pw=images.shape[-1] // unit_w,
            )
            perturbed = torch.where(changed, end[image], start[image])
            probs[index] = _target_probs(model(perturbed), target[image]).float()
    probs = rearrange(probs, "(batch step) -> batch step", batch=batch)
    fractions = counts.float() / (unit_h * unit_w)
    return PerturbationCurve(fractions, probs, torch.trapezoid(probs, fractions, dim=-1))


def deletion_auc(
    model: Callable[[Tensor], Tensor],
    images: Float[Tensor, "batch channel height width"],
    maps: Float[Tensor, "batch map_h map_w"],
    target: Target = None,
    *,
    n_steps: int = 16,
    baseline: Fill = "zeros",
    unit: Literal["patch", "pixel"] = "patch",
    data_config: DataConfig | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Float[Tensor, "batch"]:
    """Deletion AUC (RISE): area under the probability as the most attributed units go first.

    ``AUC = sum_k (f_k - f_{k-1}) (p_k + p_{k-1}) / 2`` where ``p_k`` is the target probability
    with the top ``f_k`` share of units replaced by the baseline (black by default, as in RISE);
    see :func:`perturbation_curve`. Lower is better.

    Returns:
        ``[batch]`` AUC in [0, 1].
    """
    return perturbation_curve(
        model, images, maps, target, mode="deletion", baseline=baseline, n_steps=n_steps,
        unit=unit, data_config=data_config, batch_size=batch_size, progress=progress,
    ).auc


def insertion_auc(
    model: Callable[[Tensor], Tensor],
    images: Float[Tensor, "batch channel height width"],
    maps: Float[Tensor, "batch map_h map_w"],
    target: Target = None,
    *,
    n_steps: int = 16,
    baseline: Fill = "blur",
    unit: Literal["patch", "pixel"] = "patch",
    data_config: DataConfig | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Float[Tensor, "batch"]:
    """Insertion AUC (RISE): area under the probability as the most attributed units come back.

    ``AUC = sum_k (f_k - f_{k-1}) (p_k + p_{k-1}) / 2`` where ``p_k`` is the target probability
    of the baseline (blurred by default, as in RISE) with the top ``f_k`` share of units restored
    from the image; see :func:`perturbation_curve`. Higher is better.

    Returns:
        ``[batch]`` AUC in [0, 1].
    """
    return perturbation_curve(
        model, images, maps, target, mode="insertion", baseline=baseline, n_steps=n_steps,
        unit=unit, data_config=data_config, batch_size=batch_size, progress=progress,
    ).auc


def token_deletion_curve(
    model: HookedViT,
    images: Float[Tensor, "batch channel height width"],
    maps: Float[Tensor, "batch map_h map_w"],
    target: Target = None,
    *,
    order: Literal["most", "least"] = "most",
    n_steps: int = 16,
    batch_size: int = 64,
    progress: bool = True,
) -> PerturbationCurve:
    """Token deletion curve: probability as patch tokens are dropped after the embedding.

    The map is brought to the patch grid (mean pooling or nearest upsampling) and patches
    ``u_1..u_N`` sorted by decreasing (``order="most"``) or increasing (``"least"``) value, ties
    in row-major order. Step ``k = 0..K`` removes tokens ``u_1..u_{c_k}``,
    ``c_k = round(k N / K)``, from ``hook_full_embed``; prefix tokens are always kept and the
    remaining tokens keep their position embeddings::

        f_k = c_k / N,   p_k = softmax(model without tokens u_1..u_{c_k})[target]
        AUC = sum_{k=1..K} (f_k - f_{k-1}) (p_k + p_{k-1}) / 2

    Lower is better for "most", higher for "least".

    Args:
        model: a HookedViT pooling its prefix tokens (``cfg.pooling`` "token" or "distilled"),
            since the last step keeps only those.
        images: normalised model inputs ``[batch, channel, height, width]``.
        maps: attributions ``[batch, grid_h, grid_w]`` or ``[batch, height, width]``, finite.
        target: class per image (int or ``[batch]``); None uses the model's prediction.
        order: "most" drops the most attributed tokens first, "least" the least attributed.
        n_steps: number of steps ``K >= 1``.
        batch_size: images per forward pass.
        progress: show a tqdm progress bar.

    Returns:
        :class:`PerturbationCurve` with ``fractions [K + 1]``, ``probs [batch, K + 1]``,
        ``auc [batch]``.
    """
    if order not in ("most", "least"):
        raise ValueError(f"order must be 'most' or 'least', got {order!r}")
    check_images(images)
    check_positive_int(n_steps, "n_steps")
    check_positive_int(batch_size, "batch_size")
    cfg = model.cfg
    if cfg.pooling not in ("token", "distilled"):
        raise ValueError(
            "token deletion needs a model that pools prefix tokens (model.cfg.pooling 'token' or "
            f"'distilled'): with pooling={cfg.pooling!r} the logits are undefined once every "
            "patch token is dropped"
        )
    maps = check_maps(maps, images.shape[0], tuple(images.shape[-2:]), other="images")
    check_tiling(tuple(maps.shape[1:]), tuple(cfg.grid_size), other="model.cfg.grid_size")
    grid_maps = resample_maps(maps, tuple(cfg.grid_size)).flatten(1).to(images.device)
    # "least" is "most" of the negated map; the stable sort keeps row-major tie order either way.
    drop_order = torch.argsort(_ranks(grid_maps if order == "most" else -grid_maps), dim=1)
    target = _resolve_target(model, images, target, batch_size)

    batch, n_patches, n_prefix = images.shape[0], grid_maps.shape[1], cfg.n_prefix_tokens
    counts = _unit_counts(n_patches, n_steps)
    probs = torch.empty(batch, n_steps + 1, device=images.device)
    # Token counts differ between steps, so a forward pass holds images of one step.
    chunks = torch.arange(batch, device=images.device).split(batch_size)
    work = list(product(range(n_steps + 1), chunks))
    with torch.no_grad():
        for step, image in tqdm(work, desc="token deletion", disable=not progress):
            # Kept patches in their original order, shifted past the prefix tokens.
            kept = drop_order[image, int(counts[step]):].sort(dim=1).values + n_prefix

            def drop_tokens(tokens: Tensor, hook, kept: Tensor = kept) -> Tensor:
                index = repeat(kept, "chunk pos -> chunk pos d_model", d_model=tokens.shape[-1])
                return torch.cat([tokens[:, :n_prefix], tokens.gather(1, index)], dim=1)

            logits = model.run_with_hooks(
                images[image], fwd_hooks=[("hook_full_embed", drop_tokens)]
            )
            probs[image, step] = _target_probs(logits, target[image]).float()
    fractions = counts.float().to(images.device) / n_patches
    return PerturbationCurve(fractions, probs, torch.trapezoid(probs, fractions, dim=-1))


def token_deletion_auc(
    model: HookedViT,
    images: Float[Tensor, "batch channel height width"],
    maps: Float[Tensor, "batch map_h map_w"],
    target: Target = None,
    *,
    order: Literal["most", "least"] = "most",
    n_steps: int = 16,
    batch_size: int = 64,
    progress: bool = True,
) -> Float[Tensor, "batch"]:
    """Token deletion AUC: ``sum_k (f_k - f_{k-1}) (p_k + p_{k-1}) / 2`` as patch tokens go.

    ``p_k`` is the target probability with the ``f_k`` share of patch tokens dropped after the
    embedding, most attributed first (``order="most"``, lower is better) or least attributed
    first (``"least"``, higher is better); see :func:`token_deletion_curve`.

    Returns:
        ``[batch]`` AUC in [0, 1].
    """
    return token_deletion_curve(
        model, images, maps, target, order=order, n_steps=n_steps, batch_size=batch_size,
        progress=progress,
    ).auc
