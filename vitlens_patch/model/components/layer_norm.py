"""LayerNorm and RMSNorm with TransformerLens hook points."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from vitlens_patch.model.config import ViTConfig


def is_hooked(hook_point: HookPoint) -> bool:
    """Whether a TransformerLens forward or backward hook is attached (``add_hook``,
    ``run_with_hooks``, ``hooks()``, ``run_with_cache``): such hooks need the explicit path.
    A plain torch ``register_forward_hook`` is not seen; set the component's ``fused`` switch
    to False for one."""
    return bool(hook_point.fwd_hooks or hook_point.bwd_hooks)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, ``(x - mean) / scale * w + b``.

    Takes ``[..., length]`` (``length`` is d_model, or d_head for qk-norm). Uses the fused
    ``F.layer_norm`` unless ``hook_scale`` is hooked or ``fused`` is False (as timm's
    ``fused_attn``); both paths agree within 1e-5.
    """

    def __init__(self, length: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(length))
        self.b = nn.Parameter(torch.zeros(length))
        self.fused = True  # False: always the explicit path, with hook_scale computed
        self.hook_scale = HookPoint()  # [..., 1]: sqrt(var + eps)
        self.hook_normalized = HookPoint()  # [..., length]: after w and b

    def forward(self, x: Float[Tensor, "... length"]) -> Float[Tensor, "... length"]:
        if not self.fused or is_hooked(self.hook_scale):
            x = x - x.mean(-1, keepdim=True)
            scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            x = x / scale * self.w + self.b
        else:
            x = F.layer_norm(x, self.w.shape, self.w, self.b, self.eps)
        return self.hook_normalized(x)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, ``x / scale * w`` with ``scale = sqrt(mean(x^2) + eps)`` (no
    mean subtraction, no bias: timm's ``RmsNorm``). Hook points as ``LayerNorm``'s."""

    def __init__(self, length: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(length))
        self.fused = True  # False: always the explicit path, with hook_scale computed
        self.hook_scale = HookPoint()  # [..., 1]: sqrt(mean(x^2) + eps)
        self.hook_normalized = HookPoint()  # [..., length]: after w

    def forward(self, x: Float[Tensor, "... length"]) -> Float[Tensor, "... length"]:
        if not self.fused or is_hooked(self.hook_scale):
            x = x / self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()) * self.w
        else:
            x = F.rms_norm(x, self.w.shape, self.w, self.eps)
        return self.hook_normalized(x)


def make_norm(cfg: ViTConfig, length: int) -> LayerNorm | RMSNorm:
    """The model's normalisation (``cfg.norm``) over ``length`` channels."""
    return RMSNorm(length, cfg.eps) if cfg.norm == "rms_norm" else LayerNorm(length, cfg.eps)
