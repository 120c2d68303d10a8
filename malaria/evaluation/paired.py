"""Is the candidate better or worse than the champion on the same slides, beyond noise?

Both models score the SAME test cells, so their errors are correlated: the difference of
two separate intervals would be far too wide, and cells of one slide are not independent
draws either. Here whole slides are resampled with replacement (as in :mod:`.slides`) and
in each resample the difference candidate - champion is taken on the same cells, for AUC
and for accuracy (each model at its own threshold). Plain numpy, pure, deterministic for a
seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from malaria.core.defaults import GATE_BOOTSTRAP_RESAMPLES, GATE_BOOTSTRAP_SEED, GATE_CONFIDENCE
from malaria.evaluation.metrics import labels_and_probs
from malaria.evaluation.slides import _auc_from_groups, _interval


def slide_draw_counts(n_slides: int, resamples: int, seed: int) -> npt.NDArray[np.float64]:
    """``counts[r, s]``: how often slide ``s`` is drawn in resample ``r`` (``n_slides`` draws
    with replacement each), the same for the same seed."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_slides, size=(resamples, n_slides))
    return np.stack([np.bincount(row, minlength=n_slides) for row in draws]).astype(np.float64)


def paired_slide_bootstrap(
    y_true: npt.ArrayLike,
    prob_candidate: npt.ArrayLike,
    prob_champion: npt.ArrayLike,
    slides: Sequence[str],
    *,
    threshold_candidate: float,
    threshold_champion: float,
    resamples: int = GATE_BOOTSTRAP_RESAMPLES,
    seed: int = GATE_BOOTSTRAP_SEED,
    level: float = GATE_CONFIDENCE,
) -> dict[str, Any]:
    """Candidate minus champion in AUC and accuracy on the same cells, with a slide-level
    bootstrap percentile interval.

    Returns plain JSON types: ``resamples``, ``seed``, ``level``, ``slides``, ``cells`` and,
    for ``auc`` and ``accuracy``, ``estimate`` (the difference on all the cells), ``mean``
    (over the resamples), ``low``/``high`` (the ``level`` interval) and
    ``undefined_resamples`` (AUC: resamples without both classes, left out). None where a
    figure is undefined.
    """
    y, p_new = labels_and_probs(y_true, prob_candidate)
    _, p_old = labels_and_probs(y_true, prob_champion)  # one per cell, or ValueError
    names = np.asarray([str(s) for s in slides], dtype=object)
    if names.size != y.size:
        raise ValueError(f"slides has {names.size} entries but there are {y.size} cells")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError("resamples must be >= 1 and level in (0, 1)")

    unique, slide_of = np.unique(names, return_inverse=True)
    n_slides = unique.size
    cells = np.bincount(slide_of, minlength=n_slides).astype(np.float64)
    # Per slide: cells the candidate gets right minus cells the champion gets right.
    right_new = ((p_new >= threshold_candidate).astype(np.int8) == y).astype(np.float64)
    right_old = ((p_old >= threshold_champion).astype(np.int8) == y).astype(np.float64)
    gain = np.bincount(slide_of, weights=right_new - right_old, minlength=n_slides)
    _, group_new = np.unique(p_new, return_inverse=True)
    _, group_old = np.unique(p_old, return_inverse=True)

    times = slide_draw_counts(n_slides, resamples, seed)
    accuracy = (times @ gain) / (times @ cells)
    auc = np.array([_auc_from_groups(group_new, y, row[slide_of])
                    - _auc_from_groups(group_old, y, row[slide_of]) for row in times])

    ones = np.ones(y.size)
    observed_auc = _auc_from_groups(group_new, y, ones) - _auc_from_groups(group_old, y, ones)
    return {
        "resamples": resamples, "seed": seed, "level": level, "slides": int(n_slides),
        "cells": int(y.size),
        "auc": _with_mean(_interval(observed_auc, auc, level), auc),
        "accuracy": _with_mean(_interval(float(gain.sum() / cells.sum()), accuracy, level),
                               accuracy),
    }


def _with_mean(interval: dict[str, float | int | None],
               values: npt.NDArray[np.float64]) -> dict[str, float | int | None]:
    defined = values[~np.isnan(values)]
    return {**interval, "mean": float(defined.mean()) if defined.size else None}
