"""Loading timm and Hugging Face ViTs into HookedViT."""

from vitlens_patch.conversion.checks import load_state_dict_strictly, max_logit_difference
from vitlens_patch.conversion.timm import config_from_timm, convert_timm_state_dict, from_timm

__all__ = [
    "config_from_timm", "convert_timm_state_dict", "from_timm", "load_state_dict_strictly",
    "max_logit_difference",
]
