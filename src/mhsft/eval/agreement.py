"""Krippendorff's alpha (ordinal) through the `krippendorff` library: how well several judgments of the same units
agree, for the judge against itself (`--judge_repeats`) and for human raters (`mhsft review`). Below 0.667 the
agreement is too low even for tentative conclusions (Krippendorff's own threshold)."""

from __future__ import annotations

ALPHA_OK = 0.667


def alpha(matrix) -> float | None:
    """Coders x units, NaN where a coder did not judge a unit; None when alpha is undefined (fewer than two units
    judged twice, or a single value throughout)."""
    import krippendorff  # deferred: scipy comes with it
    import numpy as np

    data = np.asarray(matrix, dtype=float)
    if data.ndim != 2 or data.size == 0:
        return None
    pairable = (np.sum(~np.isnan(data), axis=0) >= 2).sum()
    if pairable < 2 or len(np.unique(data[~np.isnan(data)])) < 2:
        return None
    return round(float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal")), 4)
