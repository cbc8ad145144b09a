"""Attribution-quality metrics: free functions taking a model (or logits callable) and tensors."""

from vitlens_patch.metrics.faithfulness import (
    PerturbationCurve,
    deletion_auc,
    insertion_auc,
    perturbation_curve,
    token_deletion_auc,
    token_deletion_curve,
)
from vitlens_patch.metrics.localization import boxes_to_masks, localization_aupr, pointing_game

__all__ = [
    "PerturbationCurve",
    "boxes_to_masks",
    "deletion_auc",
    "insertion_auc",
    "localization_aupr",
    "perturbation_curve",
    "pointing_game",
    "token_deletion_auc",
    "token_deletion_curve",
]
