"""The transformer block's MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from vitlens_patch.model.components.layer_norm import make_norm
from vitlens_patch.model.config import ViTConfig


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATION_FUNCTIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """``act(x @ W_in + b_in) @ W_out + b_out`` with W_in [d_model, d_mlp], W_out [d_mlp, d_model].

    With ``cfg.mlp_norm`` a LayerNorm ``ln`` acts on the hidden activations before W_out.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln = make_norm(cfg, cfg.d_mlp) if cfg.mlp_norm else None
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp)) if cfg.proj_bias else None
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.proj_bias else None
        self.activation = ACTIVATION_FUNCTIONS[cfg.activation]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]: before the activation
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]: after the activation

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        pre = self.hook_pre(F.linear(x, self.W_in.T, self.b_in))
        return self.project_out(self.hook_post(self.activation(pre)))

    def project_out(self, post: Float[Tensor, "*batch d_mlp"]) -> Float[Tensor, "*batch d_model"]:
        """Hidden activations -> the MLP output (through ``ln`` first, when present)."""
        return F.linear(post if self.ln is None else self.ln(post), self.W_out.T, self.b_out)


class GatedMLP(MLP):
    """SwiGLU-style MLP: ``(act(x @ W_gate + b_gate) * (x @ W_in + b_in)) @ W_out + b_out``.

    Hook names follow TransformerLens's gated MLP: ``hook_pre`` the gate before the activation,
    ``hook_pre_linear`` the linear branch, ``hook_post`` their product [batch, pos, d_mlp].
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__(cfg)
        self.W_gate = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_mlp)) if cfg.proj_bias else None
        self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]: the linear branch

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        pre = self.hook_pre(F.linear(x, self.W_gate.T, self.b_gate))
        pre_linear = self.hook_pre_linear(F.linear(x, self.W_in.T, self.b_in))
        return self.project_out(self.hook_post(self.activation(pre) * pre_linear))
