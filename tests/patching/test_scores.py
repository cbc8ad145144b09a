"""Scores of a run's logits: values on hand-made logits, and target resolution."""

import math

import pytest
import torch

from vitlens_patch.patching.scores import apply_score, resolve_score, resolve_target

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 3.0]])
TARGET = torch.tensor([0, 2])


def test_logit_and_logprob_and_prob_values():
    torch.testing.assert_close(resolve_score("logit")(LOGITS, TARGET), torch.tensor([2.0, 3.0]))
    log_z = LOGITS.exp().sum(-1).log()
    torch.testing.assert_close(resolve_score("logprob")(LOGITS, TARGET), torch.tensor([2.0, 3.0]) - log_z)
    expected = [math.exp(2) / (math.exp(2) + 1 + math.exp(-1)),
                math.exp(3) / (math.exp(0.5) + math.exp(1.5) + math.exp(3))]
    torch.testing.assert_close(resolve_score("prob")(LOGITS, TARGET), torch.tensor(expected))


def test_logit_diff_value_with_an_int_and_a_per_image_other_class():
    # target logit minus the other class's logit: [2 - 0, 3 - 1.5] and [2 - (-1), 3 - 0.5]
    torch.testing.assert_close(resolve_score(("logit_diff", 1))(LOGITS, TARGET), torch.tensor([2.0, 1.5]))
    per_image = resolve_score(("logit_diff", torch.tensor([2, 0])))
    torch.testing.assert_close(per_image(LOGITS, TARGET), torch.tensor([3.0, 2.5]))
    # the difference does not change when every logit of an image moves by a constant
    shifted = LOGITS + torch.tensor([[10.0], [-4.0]])
    torch.testing.assert_close(resolve_score(("logit_diff", 1))(shifted, TARGET), torch.tensor([2.0, 1.5]))


def test_callable_and_cosine_scores_through_apply_score():
    last = lambda logits, target: logits[:, -1]  # noqa: E731
    torch.testing.assert_close(apply_score(resolve_score(last), LOGITS, TARGET, LOGITS), torch.tensor([-1.0, 3.0]))
    cosine = resolve_score("cosine")
    torch.testing.assert_close(apply_score(cosine, LOGITS, TARGET, LOGITS), torch.ones(2))
    torch.testing.assert_close(apply_score(cosine, -LOGITS, TARGET, LOGITS), -torch.ones(2))


def test_unknown_score_is_refused():
    with pytest.raises(ValueError, match=r"score must be 'prob', 'logit', 'logprob'.* got 'accuracy'"):
        resolve_score("accuracy")


def test_resolve_target_forms():
    assert resolve_target(None, LOGITS, 3).tolist() == [0, 2]
    assert resolve_target(1, LOGITS, 3).tolist() == [1, 1]
    assert resolve_target(torch.tensor([2, 1]), LOGITS, 3).tolist() == [2, 1]
    assert resolve_target(None, LOGITS, 0).tolist() == [-1, -1]  # a backbone: no class
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 2\], got \[3\]"):
        resolve_target(3, LOGITS, 3)
    with pytest.raises(ValueError, match=r"target must be None for a model without a classifier"):
        resolve_target(1, LOGITS, 0)
