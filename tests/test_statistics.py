"""The package's intervals: Student-t for means, Wilson for proportions."""

import math

import numpy as np
import pytest
from scipy import stats

from vitlens_patch.statistics import student_t_half_width, wilson_interval


def wilson_formula(k: int, n: int, confidence: float) -> tuple[float, float]:
    """The textbook Wilson score interval."""
    z = stats.norm.ppf((1 + confidence) / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (0, 20), (20, 20), (7, 20), (499, 500), (1, 500)])
def test_wilson_interval_is_the_wilson_score_interval_inside_zero_one(k, n):
    low, high = wilson_interval(np.array([k]), np.array([n]), 0.95)
    assert (low[0], high[0]) == pytest.approx(wilson_formula(k, n, 0.95), abs=1e-12)
    assert 0 <= low[0] <= k / n <= high[0] <= 1
    assert high[0] - low[0] > 0  # never zero width, even at 0 or n successes


def test_wilson_interval_at_all_zeros_and_all_ones():
    low, high = wilson_interval(np.array([0, 10]), np.array([10, 10]), 0.95)
    assert low[0] == 0 and 0 < high[0] < 0.5
    assert high[1] == 1 and 0.5 < low[1] < 1
    assert low[0] == pytest.approx(1 - high[1]) and high[0] == pytest.approx(1 - low[1])


def test_wilson_interval_broadcasts_and_is_nan_without_trials():
    low, high = wilson_interval(np.array([[0, 3], [5, 0]]), np.array([[4, 4], [5, 0]]), 0.9)
    assert low.shape == high.shape == (2, 2)
    assert np.isnan(low[1, 1]) and np.isnan(high[1, 1])
    wider_low, wider_high = wilson_interval(3, 4, 0.99)
    assert wider_low < low[0, 1] and wider_high > high[0, 1]


@pytest.mark.usefixtures("without_type_checks")
def test_wilson_interval_rejects_bad_input():
    with pytest.raises(ValueError, match=r"confidence must be a number in \(0, 1\), got 95"):
        wilson_interval(1, 2, 95)
    with pytest.raises(ValueError, match=r"successes must be in \[0, n\], got 3.0 of 2"):
        wilson_interval(3, 2, 0.95)


def test_student_t_half_width_is_nan_for_one_value():
    half = student_t_half_width(np.array([1.0, 1.0]), np.array([1, 4]), 0.95)
    assert np.isnan(half[0]) and half[1] == pytest.approx(stats.t.ppf(0.975, 3) / 2)
