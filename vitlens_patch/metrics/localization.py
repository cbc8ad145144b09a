"""Localization metrics: does an attribution map fall on the object?

Maps are ``[batch, grid_h, grid_w]`` (patch maps) or ``[batch, height, width]`` (pixel maps);
objects are bool masks ``[batch, height, width]`` or boxes ``(x_min, y_min, x_max, y_max)``.
A map is brought to the mask's size by nearest-neighbour upsampling (each patch value covers its
patch) or by mean pooling when it is finer than the mask, so map and mask sides must divide one
another.
"""

from __future__ import annotations

import torch
from einops import reduce, repeat
from jaxtyping import Bool, Float, Real
from torch import Tensor


def _check_map_shape(maps: Tensor) -> None:
    if not isinstance(maps, Tensor) or maps.ndim != 3:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(
            f"maps must be a tensor [batch, grid_h, grid_w] or [batch, height, width], got {shape}"
        )


def check_tiling(map_size: tuple[int, int], size: tuple[int, int], *, other: str) -> None:
    """Map sides must divide ``size`` or be multiples of it, so resampling is exact."""
    if not all(a % b == 0 or b % a == 0 for a, b in zip(map_size, size)):
        raise ValueError(
            f"maps of size {tuple(map_size)} do not tile {other} of size {tuple(size)}: "
            "each map side must divide the matching side or be a multiple of it"
        )


def check_maps(maps: Tensor, batch: int, size: tuple[int, int], *, other: str) -> Tensor:
    """Validate ``maps`` against a batch size and an image or mask size; return float maps.

    ``other`` names what ``batch`` and ``size`` come from, for the error messages.
    """
    _check_map_shape(maps)
    if maps.shape[0] != batch:
        raise ValueError(f"maps has batch {maps.shape[0]} but {other} has batch {batch}")
    check_tiling(tuple(maps.shape[1:]), size, other=other)
    maps = maps.float()
    finite = torch.isfinite(maps).flatten(1).all(dim=1)
    if not finite.all():
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"maps must be finite, got NaN or inf in images {bad}")
    return maps


def resample_maps(
    maps: Float[Tensor, "batch map_h map_w"], size: tuple[int, int]
) -> Float[Tensor, "batch height width"]:
    """Bring checked maps to ``size``: nearest upsampling, or mean pooling when finer.

    Nearest (not bilinear) so a patch map keeps its patch-level claim: bilinear blur across patch
    borders would rank pixels of a perfect patch map's corner patches below pixels outside it.
    """
    (map_h, map_w), (height, width) = maps.shape[1:], size
    if map_h > height or map_w > width:
        maps = reduce(
            maps, "batch (h ph) (w pw) -> batch h w", "mean",
            ph=max(map_h // height, 1), pw=max(map_w // width, 1),
        )
        map_h, map_w = maps.shape[1:]
    return repeat(maps, "batch h w -> batch (h ph) (w pw)", ph=height // map_h, pw=width // map_w)


def _check_masks(masks: Tensor) -> Bool[Tensor, "batch height width"]:
    if not isinstance(masks, Tensor) or masks.ndim != 3 or masks.dtype != torch.bool:
        got = (
            f"{masks.dtype} tensor of shape {tuple(masks.shape)}"
            if isinstance(masks, Tensor) else type(masks).__name__
        )
        raise ValueError(f"masks must be a bool tensor [batch, height, width], got {got}")
    empty = ~masks.flatten(1).any(dim=1)
    if empty.any():
        raise ValueError(
            f"masks must mark at least one object pixel, got empty masks for images "
            f"{torch.nonzero(empty).flatten().tolist()}"
        )
    return masks


def boxes_to_masks(
    boxes: Real[Tensor, "batch 4"], size: tuple[int, int]
) -> Bool[Tensor, "batch height width"]:
    """Boxes ``(x_min, y_min, x_max, y_max)`` in pixels -> bool masks ``[batch, height, width]``.

    Pixel (row i, column j) covers [j, j+1) x [i, i+1) and is inside a box when its centre is:
    ``x_min <= j + 0.5 <= x_max and y_min <= i + 0.5 <= y_max``. Integer boxes therefore give
    ``mask[y_min:y_max, x_min:x_max]``.
    """
    height, width = size
    if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(
            f"boxes must be a tensor [batch, 4] (x_min, y_min, x_max, y_max), got {shape}"
        )
    boxes = boxes.float()
    x_min, y_min, x_max, y_max = boxes.unbind(dim=1)
    inside_image = (x_min >= 0) & (y_min >= 0) & (x_max <= width) & (y_max <= height)
    if not (torch.isfinite(boxes).all() and inside_image.all() and (x_min < x_max).all()
            and (y_min < y_max).all()):
        raise ValueError(
            f"boxes must satisfy 0 <= x_min < x_max <= {width} and 0 <= y_min < y_max <= {height} "
            f"(image size ({height}, {width})), got {boxes.tolist()}"
        )
    cols = torch.arange(width, device=boxes.device) + 0.5
    rows = torch.arange(height, device=boxes.device) + 0.5
    in_cols = (cols >= x_min[:, None]) & (cols <= x_max[:, None])  # [batch, width]
    in_rows = (rows >= y_min[:, None]) & (rows <= y_max[:, None])  # [batch, height]
    masks = in_rows[:, :, None] & in_cols[:, None, :]
    return _check_masks(masks)


def _average_precision(scores: Float[Tensor, "n"], labels: Bool[Tensor, "n"]) -> Tensor:
    """AP = sum_t (R_t - R_{t-1}) P_t over distinct score thresholds t (as scikit-learn)."""
    order = torch.argsort(scores, descending=True)
    scores, labels = scores[order], labels[order].float()
    true_pos = labels.cumsum(0)
    false_pos = (1 - labels).cumsum(0)
    # A threshold sits at the last element of each run of equal scores, so ties count together.
    last_of_tie = torch.ones_like(labels, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    true_pos, false_pos = true_pos[last_of_tie], false_pos[last_of_tie]
    precision = true_pos / (true_pos + false_pos)
    recall_gain = torch.diff(true_pos, prepend=true_pos.new_zeros(1)) / labels.sum()
    return (recall_gain * precision).sum()


def localization_aupr(
    maps: Float[Tensor, "batch map_h map_w"], masks: Bool[Tensor, "batch height width"]
) -> Float[Tensor, "batch"]:
    """Average precision of each map's pixel values against its object mask.

    The map is resampled to the mask size (nearest for patch maps, see the module docstring) and
    every pixel is a sample with score ``s`` = map value and label ``y`` = mask value. With
    ``P_t`` and ``R_t`` the precision and recall of ``s >= t``, over the distinct values ``t`` of
    ``s`` in decreasing order::

        AUPR = sum_t (R_t - R_{t-1}) * P_t,    R_0 = 0

    (``sklearn.metrics.average_precision_score``; tied pixels enter together). 1 for a map that
    scores every object pixel above every background pixel; the object's share of the image (the
    base rate) for a constant map or one that scores the object lowest.

    Args:
        maps: attribution maps ``[batch, map_h, map_w]``, finite; sides divide the mask's or are
            multiples of them.
        masks: bool object masks ``[batch, height, width]``, each with at least one object pixel.

    Returns:
        ``[batch]`` average precision in (0, 1].
    """
    masks = _check_masks(masks)
    maps = check_maps(maps, masks.shape[0], tuple(masks.shape[1:]), other="masks")
    maps = resample_maps(maps, tuple(masks.shape[1:]))
    return torch.stack([
        _average_precision(scores, labels)
        for scores, labels in zip(maps.flatten(1), masks.flatten(1))
    ])


def pointing_game(
    maps: Float[Tensor, "batch map_h map_w"],
    objects: Bool[Tensor, "batch height width"] | Float[Tensor, "batch 4"],
    *,
    image_size: tuple[int, int] | None = None,
    tolerance: float = 0.0,
) -> Bool[Tensor, "batch"]:
    """Pointing game (Zhang et al. 2016): is each map's maximum on the object?

    The map's maximal cell ``(r, c)`` (first in row-major order on exact ties) points at the image
    pixel holding the cell's centre, ``(floor((r + 1/2) H / map_h), floor((c + 1/2) W / map_w))``;
    for a pixel map that is the argmax pixel itself. With ``M`` the object mask::

        hit = exists (i, j) in M with (i - point_i)^2 + (j - point_j)^2 <= tolerance^2

    Args:
        maps: attribution maps ``[batch, map_h, map_w]``, finite.
        objects: bool masks ``[batch, height, width]`` or boxes ``[batch, 4]`` as
            ``(x_min, y_min, x_max, y_max)`` in pixels (see :func:`boxes_to_masks`).
        image_size: ``(height, width)`` the boxes refer to; defaults to the map's size, so pass it
            with patch maps. Ignored for masks.
        tolerance: hit radius in pixels, >= 0 (Zhang et al. use 15 at 224 pixels).

    Returns:
        ``[batch]`` bool, True where the map hits the object.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a number of pixels >= 0, got {tolerance}")
    _check_map_shape(maps)
    if isinstance(objects, Tensor) and objects.ndim == 2 and objects.dtype != torch.bool:
        size = tuple(maps.shape[-2:]) if image_size is None else tuple(image_size)
        masks = boxes_to_masks(objects, size)
    else:
        masks = _check_masks(objects)
    batch, height, width = masks.shape
    maps = check_maps(maps, batch, (height, width), other="objects")
    map_h, map_w = maps.shape[1:]
    cell = maps.flatten(1).argmax(dim=1)  # first maximum in row-major order
    cell_row, cell_col = cell // map_w, cell % map_w
    point_row = ((2 * cell_row + 1) * height) // (2 * map_h)
    point_col = ((2 * cell_col + 1) * width) // (2 * map_w)
    rows = torch.arange(height, device=masks.device)
    cols = torch.arange(width, device=masks.device)
    distance_sq = (
        (rows[None, :, None] - point_row[:, None, None]) ** 2
        + (cols[None, None, :] - point_col[:, None, None]) ** 2
    )
    return (masks & (distance_sq <= tolerance**2)).flatten(1).any(dim=1)
