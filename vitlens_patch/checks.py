"""Argument checks shared by every layer: images, targets, positive ints, probabilities.

Each check raises ``ValueError`` naming the argument, what is allowed and what was given, in one
wording everywhere: ``"target must hold class indices in [0, 9], got [12]"``. ``Target`` is the
one type of a ``target=`` argument.
"""

from __future__ import annotations

from typing import Union

import torch
from jaxtyping import Int
from torch import Tensor

Target = Union[int, Int[Tensor, " batch"], Int[Tensor, ""], None]
"""A class to explain or score: None (each image's predicted class), an int (or a 0-d integer
tensor) for every image, or a LongTensor [batch]."""


def describe(value: object) -> str:
    """How an error message shows a given value: a tensor by dtype and shape, a number, string or
    None by repr, anything else by its type."""
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return type(value).__name__


def check_positive_int(value: object, argument: str, *, allow_none: bool = False) -> int | None:
    """``value`` if it is an int >= 1 (or None when ``allow_none``); bools are refused."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{argument} must be {allowed}, got {value!r}")
    return value


def check_probability(
    value: object, argument: str, *, include_zero: bool = True, include_one: bool = True
) -> float:
    """``value`` as a float if it lies in [0, 1] (either end excluded on request)."""
    low, high = "[" if include_zero else "(", "]" if include_one else ")"
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if (number is None or not (0 <= number <= 1) or (number == 0 and not include_zero)
            or (number == 1 and not include_one)):
        raise ValueError(f"{argument} must be a number in {low}0, 1{high}, got {value!r}")
    return number


def check_images(
    images: object,
    *,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    argument: str = "images",
) -> Tensor:
    """``images`` if they are a non-empty float tensor [batch, channel, height, width].

    Args:
        channels, size: the expected channel count and (height, width); None accepts any.
        argument: the name error messages give the tensor.
    """
    expected = (
        f"[batch, {'channel' if channels is None else channels}, "
        f"{'height' if size is None else size[0]}, {'width' if size is None else size[1]}]"
    )
    ok = (
        isinstance(images, Tensor) and images.is_floating_point() and images.ndim == 4
        and len(images) > 0
        and (channels is None or images.shape[1] == channels)
        and (size is None or tuple(images.shape[2:]) == tuple(size))
    )
    if not ok:
        raise ValueError(
            f"{argument} must be a float tensor {expected} with batch >= 1 of normalised model "
            f"inputs (see model.preprocess), got {describe(images)}"
        )
    return images


def check_target(
    target: object, batch: int, n_classes: int, device: torch.device | str | None = None
) -> Int[Tensor, " batch"] | None:
    """``target`` as a LongTensor [batch] of class indices, or None.

    An int (or a 0-d integer tensor) is used for every image. ``n_classes == 0`` (a backbone
    without a classifier) accepts only None.
    """
    if target is None:
        return None
    if n_classes == 0:
        raise ValueError(
            f"target must be None for a model without a classifier (n_classes=0), got {describe(target)}; "
            f"attach one with model.with_head(head)"
        )
    integer = isinstance(target, Tensor) and not target.is_floating_point() and not target.is_complex() \
        and target.dtype != torch.bool
    if integer and target.ndim == 0:
        target = int(target.item())
    if isinstance(target, int) and not isinstance(target, bool):
        target = torch.full((batch,), target, dtype=torch.long, device=device)
    elif integer and tuple(target.shape) == (batch,):
        target = target.to(device=device, dtype=torch.long)
    else:
        raise ValueError(
            f"target must be None, an int or an integer tensor of shape [batch] = [{batch}], "
            f"got {describe(target)}"
        )
    outside = target[(target < 0) | (target >= n_classes)]
    if len(outside):
        raise ValueError(
            f"target must hold class indices in [0, {n_classes - 1}], got {outside.unique().tolist()}"
        )
    return target
