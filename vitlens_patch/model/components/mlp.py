"""The transformer block's MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from vitlens_patch.model.config import ViTConfig


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATION_FUNCTIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
}


class MLP(nn.Module):
    """``act(x @ W_in + b_in) @ W_out + b_out`` with W_in [d_model, d_mlp], W_out [d_mlp, d_model]."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp)) if cfg.proj_bias else None
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.proj_bias else None
        self.activation = ACTIVATION_FUNCTIONS[cfg.activation]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]: before the activation
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]: after the activation

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(F.linear(x, self.W_in.T, self.b_in))
        return F.linear(self.hook_post(self.activation(pre)), self.W_out.T, self.b_out)
