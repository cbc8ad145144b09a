"""Loud conversion checks: strict state-dict loading and output parity."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def load_state_dict_strictly(model: nn.Module, state_dict: dict[str, Tensor], assign: bool = False) -> None:
    """Load every parameter, or raise ``ValueError`` listing missing, unexpected and mis-shaped keys.

    Nothing is filled in at random: a key the model has and the state dict lacks is an error.
    ``assign=True`` makes the state dict's tensors the parameters (device and dtype included)
    instead of copying into them: the way to fill a model built on the meta device.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{key}: expected {tuple(expected[key].shape)}, got {tuple(state_dict[key].shape)}"
        for key in set(expected) & set(state_dict)
        if expected[key].shape != state_dict[key].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"state dict does not match the model: missing={missing}, unexpected={unexpected}, "
            f"shape mismatches={mismatched}"
        )
    model.load_state_dict(state_dict, strict=True, assign=assign)


@torch.no_grad()
def max_logit_difference(
    reference: Callable[[Tensor], Tensor], model: nn.Module, images: Tensor
) -> float:
    """max |reference(images) - model(images)| over the batch and classes (both in eval mode)."""
    return (reference(images).float() - model(images).float()).abs().max().item()
