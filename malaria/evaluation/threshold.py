"""The decision threshold: chosen on VALIDATION slides only, then applied unchanged to test.

Same conventions as :mod:`malaria.evaluation.metrics` (1 = Parasitized, ``prob >= threshold``
is Parasitized).
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from malaria.core.defaults import DEFAULT_THRESHOLD, THRESHOLD_MIN_SENSITIVITY, THRESHOLD_RULE
from malaria.evaluation.metrics import counts_by_score, labels_and_probs

ThresholdRule = Literal["fixed", "youden", "max_accuracy", "min_sensitivity"]
THRESHOLD_RULES: tuple[ThresholdRule, ...] = get_args(ThresholdRule)  # e.g. CLI choices


def rule_origin(rule: object) -> str:
    """Where a threshold came from, for reports: ``fixed`` or ``<rule>, from validation
    slides``."""
    return "fixed" if rule == "fixed" else f"{rule or '?'}, from validation slides"


# Floating-point slack when comparing objective values that should tie exactly.
_EPS = 1e-12


def threshold_candidates(unique: np.ndarray) -> np.ndarray:
    """The thresholds worth trying for the distinct scores ``unique`` (sorted): candidate j
    calls exactly ``unique[j:]`` positive, j = 0..k (k: none), each at the midpoint between
    adjacent scores so the boundary keeps a margin from the cells on both sides."""
    lowest = unique[0] / 2.0
    highest = (unique[-1] + 1.0) / 2.0 if unique[-1] < 1.0 else float(np.nextafter(1.0, 2.0))
    return np.concatenate([[lowest], (unique[:-1] + unique[1:]) / 2.0, [highest]])


def choose_threshold(
    y_true: npt.ArrayLike,
    prob: npt.ArrayLike,
    *,
    rule: ThresholdRule = THRESHOLD_RULE,
    min_sensitivity: float = THRESHOLD_MIN_SENSITIVITY,
) -> float:
    """The decision threshold, chosen on VALIDATION slides only; apply it unchanged to test.

    Rules:

    * ``"fixed"``: :data:`~malaria.core.defaults.DEFAULT_THRESHOLD` (0.5), not fitted: the
      point the class-balanced training loss already targets, estimated from all the
      training cells rather than from the validation slides' few;
    * ``"youden"``: maximise sensitivity + specificity - 1 (balanced errors);
    * ``"max_accuracy"``: maximise accuracy on the given cells (follows their class mix);
    * ``"min_sensitivity"``: the highest specificity whose sensitivity is at least
      ``min_sensitivity``; the screening rule, where a missed infection costs more than a
      second look at a clean cell.

    Candidates are the midpoints between adjacent distinct scores (plus one below the lowest
    and one above the highest), so the boundary keeps a margin from the validation cells on
    both sides instead of sitting on one of them. Ties go to the candidate nearest 0.5.
    """
    y, p = labels_and_probs(y_true, prob)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("choosing a threshold needs both classes among the validation cells")
    if rule == "fixed":
        return float(DEFAULT_THRESHOLD)
    if rule == "min_sensitivity" and not 0.0 < min_sensitivity <= 1.0:
        raise ValueError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}")

    unique, positives, negatives = counts_by_score(y, p)
    candidates = threshold_candidates(unique)
    tp = np.concatenate([np.cumsum(positives[::-1])[::-1], [0]])
    fp = np.concatenate([np.cumsum(negatives[::-1])[::-1], [0]])
    sensitivity = tp / n_pos
    specificity = (n_neg - fp) / n_neg

    if rule == "youden":
        objectives = [sensitivity - (1.0 - specificity)]
        feasible = np.ones_like(candidates, dtype=bool)
    elif rule == "max_accuracy":
        objectives = [(tp + n_neg - fp) / y.size]
        feasible = np.ones_like(candidates, dtype=bool)
    elif rule == "min_sensitivity":
        # Candidate 0 (all positive) always has sensitivity 1, so one is always feasible.
        objectives = [specificity, sensitivity]
        feasible = sensitivity >= min_sensitivity - _EPS
    else:
        raise ValueError(f"unknown threshold rule {rule!r}")

    keep = feasible.copy()
    for objective in objectives:  # lexicographic: best on the first, then on the next
        best = objective[keep].max()
        keep &= objective >= best - _EPS
    chosen = candidates[keep]
    return float(chosen[np.argmin(np.abs(chosen - 0.5))])
