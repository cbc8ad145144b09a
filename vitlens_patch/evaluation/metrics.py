"""The metric registry of the evaluation harness: which function, which image kind, which direction."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from vitlens_patch.metrics import (
    deletion_auc,
    insertion_auc,
    localization_aupr,
    pointing_game,
    token_deletion_auc,
)

ImageKind = Literal["full", "canvas"]


@dataclass(frozen=True)
class MetricSpec:
    """How the harness computes one metric.

    Attributes:
        function: the metric from :mod:`vitlens_patch.metrics`. Faithfulness metrics are called as
            ``function(model, images, maps, target, **options)``, localization metrics as
            ``function(maps, masks, **options)``.
        images: "full" (full-frame images) or "canvas" (canvas images with object masks).
        higher_is_better: the direction of a better map.
        proportion: each image scores 0 or 1, so the mean is a proportion and its confidence
            interval the Wilson score interval (inside [0, 1]) instead of Student's t.
    """

    function: Callable[..., Tensor]
    images: ImageKind
    higher_is_better: bool
    proportion: bool = False

    def options(self) -> list[str]:
        """The keyword options ``metric_options`` may set (the harness sets ``progress``)."""
        parameters = inspect.signature(self.function).parameters.values()
        return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name != "progress"]


# name -> metric. deletion / insertion / token_deletion: area under the target probability as the
# top-ranked patches turn black / return into a blurred image / are dropped as tokens (RISE).
# aupr: average precision of the map's pixels against the object mask; pointing_game: whether the
# map's maximum falls on the object (1 or 0 per image, so its mean is the hit rate, a proportion).
METRICS: dict[str, MetricSpec] = {
    "deletion": MetricSpec(deletion_auc, "full", higher_is_better=False),
    "insertion": MetricSpec(insertion_auc, "full", higher_is_better=True),
    "token_deletion": MetricSpec(token_deletion_auc, "full", higher_is_better=False),
    "aupr": MetricSpec(localization_aupr, "canvas", higher_is_better=True),
    "pointing_game": MetricSpec(pointing_game, "canvas", higher_is_better=True, proportion=True),
}
DEFAULT_METRICS = tuple(METRICS)
