"""The confidence intervals of the package: Student-t for means, Wilson for proportions.

Every mean with a CI uses :func:`student_t_half_width`; every share of 0/1 outcomes (pointing game
hits, accuracy) uses :func:`wilson_interval`, which stays inside [0, 1] and has non-zero width at
0 and 1 successes out of n, where a Student-t interval would leave [0, 1] or shrink to a point.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from vitlens_patch.checks import check_probability


def student_t_half_width(sd: ArrayLike, n: ArrayLike, confidence: float) -> np.ndarray:
    """Half-width ``t * sd / sqrt(n)`` of the Student-t confidence interval of a mean.

    ``t`` is the ``(1 + confidence) / 2`` quantile of Student's t with ``n - 1`` degrees of freedom
    and ``sd`` the sample standard deviation of the ``n`` values. NaN where ``n < 2`` (one value
    gives no spread). ``sd`` and ``n`` broadcast against each other.
    """
    check_probability(confidence, "confidence", include_zero=False, include_one=False)
    sd, n = np.broadcast_arrays(np.asarray(sd, dtype=np.float64), np.asarray(n, dtype=np.float64))
    enough = n >= 2
    dof = np.where(enough, n - 1, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        half_width = stats.t.ppf((1 + confidence) / 2, dof) * sd / np.sqrt(n)
    return np.where(enough, half_width, np.nan)


def wilson_interval(
    successes: ArrayLike, n: ArrayLike, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval ``(low, high)`` of a proportion: ``successes`` out of ``n`` trials.

    Computed by ``scipy.stats.binomtest(...).proportion_ci(method="wilson")``; always inside [0, 1], with
    ``low == 0`` at 0 successes and ``high == 1`` at ``n``. NaN where ``n == 0``. ``successes`` and
    ``n`` broadcast against each other; ``successes`` is rounded to the nearest integer (a mean of
    0/1 values times ``n``).
    """
    check_probability(confidence, "confidence", include_zero=False, include_one=False)
    successes, n = np.broadcast_arrays(
        np.asarray(successes, dtype=np.float64), np.asarray(n, dtype=np.float64)
    )
    low = np.full(successes.shape, np.nan)
    high = np.full(successes.shape, np.nan)
    for index in np.ndindex(successes.shape):
        if n[index] >= 1 and np.isfinite(successes[index]):
            k, trials = int(round(successes[index])), int(n[index])
            if not 0 <= k <= trials:
                raise ValueError(f"successes must be in [0, n], got {successes[index]} of {trials}")
            interval = stats.binomtest(k, trials).proportion_ci(confidence, method="wilson")
            low[index], high[index] = interval.low, interval.high
    return low, high
