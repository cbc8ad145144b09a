"""The one set of argument checks: each message names the argument, what is allowed and the input."""

import pytest
import torch

from vitlens_patch.checks import check_images, check_positive_int, check_probability, check_target


@pytest.mark.parametrize(
    ("images", "options", "message"),
    [
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), {},
         r"images must be a float tensor \[batch, channel, height, width\] with batch >= 1 .* "
         r"got torch.uint8 tensor of shape \(2, 3, 8, 8\)"),
        ([[0.0]], {}, r"images must be a float tensor \[batch, channel, height, width\].* got list"),
        (torch.zeros(3, 8, 8), {}, r"got torch.float32 tensor of shape \(3, 8, 8\)"),
        (torch.zeros(0, 3, 8, 8), {}, r"with batch >= 1 .* got torch.float32 tensor of shape \(0, 3, 8, 8\)"),
        (torch.zeros(2, 1, 8, 8), {"channels": 3, "size": (8, 8)},
         r"images must be a float tensor \[batch, 3, 8, 8\] .* got torch.float32 tensor of shape \(2, 1, 8, 8\)"),
        (torch.zeros(2, 3, 4, 8), {"channels": 3, "size": (8, 8)}, r"\[batch, 3, 8, 8\] .* shape \(2, 3, 4, 8\)"),
        (torch.zeros(2, 3), {"argument": "dataset images"}, r"^dataset images must be a float tensor"),
    ],
)
def test_check_images_names_argument_expected_and_got(images, options, message):
    with pytest.raises(ValueError, match=message):
        check_images(images, **options)


def test_check_images_returns_valid_images():
    images = torch.zeros(2, 3, 8, 8)
    assert check_images(images, channels=3, size=(8, 8)) is images


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (10, r"target must hold class indices in \[0, 9\], got \[10\]"),
        (-1, r"target must hold class indices in \[0, 9\], got \[-1\]"),
        (torch.tensor([1, 12, 12]), r"target must hold class indices in \[0, 9\], got \[12\]"),
        (torch.tensor([1, 2]), r"target must be None, an int or an integer tensor of shape \[batch\] = \[3\], "
                               r"got torch.int64 tensor of shape \(2,\)"),
        (torch.tensor([1.0, 2.0, 3.0]), r"integer tensor .* got torch.float32 tensor of shape \(3,\)"),
        (True, r"target must be None, an int or an integer tensor .* got True"),
        (2.5, r"target must be None, an int .* got 2.5"),
    ],
)
def test_check_target_names_argument_expected_and_got(target, message):
    with pytest.raises(ValueError, match=message):
        check_target(target, batch=3, n_classes=10)


def test_check_target_broadcasts_ints_and_refuses_any_target_without_classes():
    assert check_target(None, 3, 10) is None
    assert check_target(4, 3, 10).tolist() == [4, 4, 4]
    assert check_target(torch.tensor(4), 3, 10).tolist() == [4, 4, 4]
    assert check_target(torch.tensor([1, 2, 3], dtype=torch.int32), 3, 10).dtype == torch.long
    with pytest.raises(ValueError, match=r"target must be None for a model without a classifier \(n_classes=0\), got 1"):
        check_target(1, 3, 0)


@pytest.mark.parametrize(
    ("value", "options", "message"),
    [
        (0, {}, "batch_size must be a positive int, got 0"),
        (2.5, {}, "batch_size must be a positive int, got 2.5"),
        (True, {}, "batch_size must be a positive int, got True"),
        (None, {}, "batch_size must be a positive int, got None"),
        (-1, {"allow_none": True}, "batch_size must be a positive int or None, got -1"),
    ],
)
def test_check_positive_int_names_argument_expected_and_got(value, options, message):
    with pytest.raises(ValueError, match=message):
        check_positive_int(value, "batch_size", **options)


def test_check_positive_int_passes_valid_values():
    assert check_positive_int(3, "n") == 3
    assert check_positive_int(None, "n", allow_none=True) is None


@pytest.mark.parametrize(
    ("value", "options", "message"),
    [
        (1.5, {}, r"confidence must be a number in \[0, 1\], got 1.5"),
        (0, {"include_zero": False}, r"confidence must be a number in \(0, 1\], got 0"),
        (1.0, {"include_one": False}, r"confidence must be a number in \[0, 1\), got 1.0"),
        ("high", {}, r"confidence must be a number in \[0, 1\], got 'high'"),
    ],
)
def test_check_probability_names_argument_expected_and_got(value, options, message):
    with pytest.raises(ValueError, match=message):
        check_probability(value, "confidence", **options)


def test_check_probability_passes_the_interval():
    assert check_probability(0, "p") == 0.0
    assert check_probability(1, "p") == 1.0
    assert check_probability(0.95, "p", include_zero=False, include_one=False) == 0.95
