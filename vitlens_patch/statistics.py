"""The one Student-t confidence interval every mean with a CI in the package uses."""

from __future__ import annotations

import numpy as np
from scipy import stats


def student_t_half_width(sd: np.ndarray, n: np.ndarray, confidence: float) -> np.ndarray:
    """Half-width ``t * sd / sqrt(n)`` of the Student-t confidence interval of a mean.

    ``t`` is the ``(1 + confidence) / 2`` quantile of Student's t with ``n - 1`` degrees of freedom
    and ``sd`` the sample standard deviation of the ``n`` values. NaN where ``n < 2`` (one value
    gives no spread). ``sd`` and ``n`` broadcast against each other.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    sd, n = np.broadcast_arrays(np.asarray(sd, dtype=np.float64), np.asarray(n, dtype=np.float64))
    enough = n >= 2
    dof = np.where(enough, n - 1, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        half_width = stats.t.ppf((1 + confidence) / 2, dof) * sd / np.sqrt(n)
    return np.where(enough, half_width, np.nan)
