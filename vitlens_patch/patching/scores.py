"""Scores of a run's logits for a target class: what a patching effect is measured in."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from vitlens_patch.checks import Target, check_target

ScoreFn = Callable[[Float[Tensor, "batch n_classes"], Int[Tensor, " batch"]], Float[Tensor, " batch"]]
SCORES = ("prob", "logit", "logprob", "logit_diff", "cosine")


def _gather(values: Tensor, target: Tensor) -> Tensor:
    return values.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def _logit_diff(other: int | Tensor) -> ScoreFn:
    def score(logits: Tensor, target: Tensor) -> Tensor:
        others = torch.as_tensor(other, device=logits.device).expand_as(target)
        return _gather(logits, target) - _gather(logits, others)

    return score


def cosine_to_clean(output: Tensor, target: Tensor | None, clean_output: Tensor) -> Float[Tensor, " batch"]:
    """Cosine similarity of each row's output to the clean run's output of the same image.

    ``output`` and ``clean_output`` are [batch, ...] (logits, pooled features or tokens, flattened
    per image); ``target`` is ignored. A run that recovers the clean output scores 1.
    """
    return F.cosine_similarity(output.float().flatten(1), clean_output.float().flatten(1), dim=1)


cosine_to_clean.needs_clean_output = True


def needs_clean_output(score_fn: ScoreFn) -> bool:
    """Whether ``score_fn`` is called as (output, target, clean_output) ("cosine")."""
    return getattr(score_fn, "needs_clean_output", False)


def apply_score(score_fn: ScoreFn, output: Tensor, target: Tensor, clean_output: Tensor) -> Float[Tensor, " batch"]:
    """``score_fn`` on a run's ``output`` [batch, ...], as float: called with (output, target), or
    (output, target, clean_output) when it compares with the clean run's output ("cosine")."""
    if needs_clean_output(score_fn):
        return score_fn(output, target, clean_output).float()
    return score_fn(output, target).float()


def check_score_for_model(score_fn: ScoreFn, score, n_classes: int) -> None:
    """Refuse a class score (prob, logit...) on a model without a classifier."""
    if not n_classes and not needs_clean_output(score_fn):
        raise ValueError(
            f"score {score!r} needs class logits but the model has no classifier (n_classes=0): use "
            f"'cosine' or attach a head with model.with_head(head)"
        )


def resolve_score(score: str | tuple | ScoreFn) -> ScoreFn:
    """``score`` -> a function (logits [batch, n_classes], target [batch]) -> [batch].

    Args:
        score: "prob" (softmax probability of the target), "logit", "logprob",
            ("logit_diff", other_class) (target logit minus the other class's logit; ``other_class``
            an int or a LongTensor broadcastable to [batch]), "cosine" (``cosine_to_clean``: the
            output's cosine similarity to the clean run's output of the same image, for models
            without a classifier; no target), or a callable of (logits, target).
    """
    if callable(score):
        return score
    if isinstance(score, tuple) and len(score) == 2 and score[0] == "logit_diff":
        return _logit_diff(score[1])
    if score == "prob":
        return lambda logits, target: _gather(logits.float().softmax(-1), target)
    if score == "logit":
        return lambda logits, target: _gather(logits.float(), target)
    if score == "cosine":
        return cosine_to_clean
    if score == "logprob":
        return lambda logits, target: _gather(logits.float().log_softmax(-1), target)
    raise ValueError(
        f"score must be 'prob', 'logit', 'logprob', ('logit_diff', other_class), 'cosine' or a callable "
        f"(logits, target) -> [batch], got {score!r}"
    )


def resolve_target(target: Target, clean_logits: Tensor, n_classes: int) -> Int[Tensor, " batch"]:
    """Target class per image: None -> the clean run's prediction; an int or a [batch] tensor
    (see ``checks.check_target``).

    A model without a classifier (``n_classes == 0``) has no classes: ``target`` must be None and
    every image gets -1 (no class).
    """
    batch = clean_logits.shape[0]
    target = check_target(target, batch, n_classes, clean_logits.device)
    if target is not None:
        return target
    if n_classes == 0:
        return torch.full((batch,), -1, dtype=torch.long, device=clean_logits.device)
    return clean_logits.argmax(-1)
