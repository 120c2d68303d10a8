"""Uncertainty by slide: a slide-level bootstrap of accuracy, AUC and parasitemia error.

Cells of one slide share a stain and optics, so they are not independent draws: an interval
from resampling cells would be too narrow. Here whole slides are resampled with replacement
(a slide drawn twice counts all its cells twice), the unit a new patient brings. Plain numpy,
like :mod:`.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from malaria.evaluation.metrics import labels_and_probs

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20240501


def weighted_roc_auc(y_true: npt.ArrayLike, prob: npt.ArrayLike,
                     weights: npt.ArrayLike) -> float:
    """AUC with each cell counted ``weights`` times (ties one half), equal to
    :func:`malaria.evaluation.metrics.roc_auc` on the cells repeated that often; NaN when
    one class has no weight."""
    y, p = labels_and_probs(y_true, prob, probabilities=False)
    _, inverse = np.unique(p, return_inverse=True)
    return _auc_from_groups(inverse, y, np.asarray(weights, dtype=np.float64).reshape(-1))


def _auc_from_groups(inverse: npt.NDArray[np.int64], y: npt.NDArray[np.int8],
                     weights: npt.NDArray[np.float64]) -> float:
    # Sorting once (np.unique) and re-weighting per resample keeps 2000 resamples of
    # ~14k cells to O(n) each.
    size = int(inverse.max()) + 1 if inverse.size else 0
    pos = np.bincount(inverse, weights=weights * y, minlength=size)
    neg = np.bincount(inverse, weights=weights * (1 - y), minlength=size)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def _interval(estimate: float, values: npt.NDArray[np.float64],
              level: float) -> dict[str, float | int | None]:
    defined = values[~np.isnan(values)]
    tail = 100 * (1 - level) / 2
    low, high = (np.percentile(defined, [tail, 100 - tail]) if defined.size
                 else (math.nan, math.nan))

    def clean(value: float) -> float | None:
        return None if math.isnan(value) else float(value)

    return {"estimate": clean(estimate), "low": clean(float(low)), "high": clean(float(high)),
            "undefined_resamples": int(values.size - defined.size)}


def slide_bootstrap(
    y_true: npt.ArrayLike,
    prob: npt.ArrayLike,
    predicted: npt.ArrayLike,
    slides: Sequence[str],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> dict[str, Any]:
    """Percentile intervals for accuracy, AUC and mean parasitemia error (percentage points)
    from ``resamples`` draws of the slides with replacement, the same for the same seed.

    ``predicted`` is each cell's 0/1 call (cross-validation folds each apply their own
    threshold, so calls are given rather than one threshold). A resample without both
    classes has no AUC; those are left out and counted.
    """
    y, p = labels_and_probs(y_true, prob)
    calls = np.asarray(predicted).reshape(-1).astype(np.int8)
    names = np.asarray([str(s) for s in slides], dtype=object)
    if calls.size != y.size or names.size != y.size:
        raise ValueError("y_true, prob, predicted and slides need one entry per cell")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError("resamples must be >= 1 and level in (0, 1)")
    unique, slide_of = np.unique(names, return_inverse=True)
    n_slides = unique.size
    cells = np.bincount(slide_of, minlength=n_slides).astype(np.float64)
    correct = np.bincount(slide_of, weights=(calls == y), minlength=n_slides)
    error = 100.0 * np.abs(np.bincount(slide_of, weights=calls, minlength=n_slides)
                           - np.bincount(slide_of, weights=y, minlength=n_slides)) / cells
    _, score_group = np.unique(p, return_inverse=True)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_slides, size=(resamples, n_slides))
    # times[r, s]: how often slide s was drawn in resample r.
    times = np.stack([np.bincount(row, minlength=n_slides) for row in draws]).astype(np.float64)
    accuracy = (times @ correct) / (times @ cells)
    parasitemia = (times @ error) / n_slides
    auc = np.array([_auc_from_groups(score_group, y, row[slide_of]) for row in times])

    ones = np.ones(n_slides)
    return {
        "resamples": resamples, "seed": seed, "level": level, "slides": int(n_slides),
        "accuracy": _interval(float((ones @ correct) / cells.sum()), accuracy, level),
        "auc": _interval(_auc_from_groups(score_group, y, ones[slide_of]), auc, level),
        "parasitemia_error_mean": _interval(float(error.mean()), parasitemia, level),
    }
