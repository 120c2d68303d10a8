"""Honest evaluation of a binary cell classifier: AUC, the metrics at a threshold, calibration.

Conventions used throughout :mod:`malaria.evaluation`:

* label 1 = Parasitized (the positive class), label 0 = Uninfected
  (:data:`malaria.core.labels.CLASS_OF_LABEL`);
* ``prob`` is the model's probability of Parasitized, in [0, 1];
* a cell is predicted Parasitized when ``prob >= threshold``.

The threshold is a choice made on **validation** slides
(:func:`malaria.evaluation.threshold.choose_threshold`) and then applied unchanged to the
**test** slides (:func:`evaluate`). Choosing it on the test slides would leak the answer into
the score, so no function here ever looks at data it was not given. Plots are in
:mod:`malaria.evaluation.plots`.

Everything is plain numpy (no TensorFlow, no scikit-learn).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

ECE_BINS = 15  # Guo et al. (2017), "On calibration of modern neural networks"


# ------------------------------------------------------------------------------- validation


def labels_and_probs(
    y_true: npt.ArrayLike, prob: npt.ArrayLike, *, probabilities: bool = True
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float64]]:
    """Check and convert inputs once, so every metric can trust them."""
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} labels but prob has {p.size} values")
    if y.size == 0:
        raise ValueError("no samples to evaluate")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold only 0 (Uninfected) and 1 (Parasitized)")
    if not np.isfinite(p).all():
        raise ValueError("prob holds NaN or infinite values")
    if probabilities and ((p < 0).any() or (p > 1).any()):
        raise ValueError("prob must lie in [0, 1] (a probability of Parasitized)")
    return y.astype(np.int8), p


def _ratio(numerator: float, denominator: float) -> float:
    """A rate that is undefined (NaN) rather than silently 0 when nothing was counted."""
    return numerator / denominator if denominator else math.nan


# ------------------------------------------------------------------------------ ROC and AUC


def roc_auc(y_true: npt.ArrayLike, prob: npt.ArrayLike) -> float:
    """Exact area under the ROC curve from ranks (Mann-Whitney U), ties counted as one half.

    Equals the probability that a random parasitized cell scores above a random uninfected
    one. O(n log n), no curve and no trapezoids needed. NaN when one class is absent, because
    the quantity is undefined then.
    """
    y, p = labels_and_probs(y_true, prob, probabilities=False)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Average ranks (1-based) of tied groups: a group spanning ranks a..b gets (a + b) / 2.
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts).astype(np.float64)
    ranks = (last_rank - (counts - 1) / 2.0)[inverse]
    u_statistic = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


def counts_by_score(
    y: npt.NDArray[np.int8], p: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Distinct scores (ascending) with the number of positives and negatives at each."""
    unique, inverse = np.unique(p, return_inverse=True)
    positives = np.bincount(inverse, weights=y, minlength=unique.size).astype(np.int64)
    totals = np.bincount(inverse, minlength=unique.size).astype(np.int64)
    return unique, positives, totals - positives


def roc_curve(
    y_true: npt.ArrayLike, prob: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``(fpr, tpr, thresholds)`` at every distinct score, from (0, 0) to (1, 1).

    ``thresholds`` is decreasing; point i counts ``prob >= thresholds[i]`` as positive. The
    first threshold is ``+inf`` (nothing positive), as in scikit-learn. Raises ValueError when
    one class is absent: a curve needs both.
    """
    y, p = labels_and_probs(y_true, prob, probabilities=False)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC curve needs both classes in y_true")
    unique, positives, negatives = counts_by_score(y, p)
    tps = np.concatenate([[0], np.cumsum(positives[::-1])])
    fps = np.concatenate([[0], np.cumsum(negatives[::-1])])
    thresholds = np.concatenate([[np.inf], unique[::-1]])
    return fps / n_neg, tps / n_pos, thresholds


# -------------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class SlideAccuracy:
    """One slide (one patient): how many cells, how well, and the parasitized fractions."""

    slide: str
    cells: int
    accuracy: float
    parasitized_true: float
    parasitized_pred: float


@dataclass(frozen=True)
class Confusion:
    """Counts at the chosen threshold; positive = Parasitized."""

    tn: int
    fp: int
    fn: int
    tp: int

    def as_array(self) -> npt.NDArray[np.int64]:
        """Rows: true Uninfected, Parasitized; columns: predicted in the same order."""
        return np.array([[self.tn, self.fp], [self.fn, self.tp]], dtype=np.int64)


@dataclass(frozen=True)
class EvaluationReport:
    threshold: float
    n: int
    accuracy: float
    roc_auc: float
    sensitivity: float
    specificity: float
    precision: float
    f1: float
    mcc: float
    ece: float
    confusion: Confusion
    per_slide: tuple[SlideAccuracy, ...] = field(default_factory=tuple)
    slide_accuracy_min: float = math.nan
    slide_accuracy_median: float = math.nan
    # Percentage points, |predicted - labelled| share of parasitized cells per slide: what a
    # lab reads off a slide, so it is judged beside the per-cell figures.
    parasitemia_error_mean: float = math.nan
    parasitemia_error_max: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; undefined values (NaN) become ``None`` so strict JSON accepts them."""

        def clean(value: float) -> float | None:
            return None if math.isnan(value) else float(value)

        return {
            # NaN when pooled over folds that each chose their own threshold.
            "threshold": clean(self.threshold),
            "n": self.n,
            "accuracy": clean(self.accuracy),
            "roc_auc": clean(self.roc_auc),
            "sensitivity": clean(self.sensitivity),
            "specificity": clean(self.specificity),
            "precision": clean(self.precision),
            "f1": clean(self.f1),
            "mcc": clean(self.mcc),
            "ece": clean(self.ece),
            "confusion": {
                "tn": self.confusion.tn,
                "fp": self.confusion.fp,
                "fn": self.confusion.fn,
                "tp": self.confusion.tp,
            },
            "slide_accuracy_min": clean(self.slide_accuracy_min),
            "slide_accuracy_median": clean(self.slide_accuracy_median),
            "parasitemia_error_mean": clean(self.parasitemia_error_mean),
            "parasitemia_error_max": clean(self.parasitemia_error_max),
            "per_slide": [
                {
                    "slide": row.slide,
                    "cells": row.cells,
                    "accuracy": row.accuracy,
                    "parasitized_true": row.parasitized_true,
                    "parasitized_pred": row.parasitized_pred,
                }
                for row in self.per_slide
            ],
        }


def expected_calibration_error(
    y_true: npt.ArrayLike, prob: npt.ArrayLike, *, bins: int = ECE_BINS
) -> float:
    """ECE of the probability of Parasitized over ``bins`` equal-width bins on [0, 1].

    ``sum_b (n_b / n) * |fraction parasitized in b - mean prob in b|``. We bin the positive
    class probability rather than the top-label confidence max(p, 1 - p): in the binary case
    the latter would use only the upper half of the bins, and the calibration of p itself is
    what a per-slide parasitemia estimate (the mean of p) relies on.
    """
    y, p = labels_and_probs(y_true, prob)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    observed = np.bincount(index, weights=y, minlength=bins)
    predicted = np.bincount(index, weights=p, minlength=bins)
    occupied = counts > 0
    gaps = np.abs(observed[occupied] - predicted[occupied])  # = n_b * |mean y - mean p|
    return float(gaps.sum() / y.size)


def _per_slide(
    slides: Sequence[str], y: npt.NDArray[np.int8], predicted: npt.NDArray[np.int8]
) -> tuple[SlideAccuracy, ...]:
    names = np.asarray([str(s) for s in slides], dtype=object)
    if names.size != y.size:
        raise ValueError(f"slides has {names.size} entries but there are {y.size} cells")
    unique, inverse = np.unique(names, return_inverse=True)
    cells = np.bincount(inverse, minlength=unique.size)
    correct = np.bincount(inverse, weights=(y == predicted), minlength=unique.size)
    true_pos = np.bincount(inverse, weights=y, minlength=unique.size)
    pred_pos = np.bincount(inverse, weights=predicted, minlength=unique.size)
    return tuple(
        SlideAccuracy(
            slide=str(unique[i]),
            cells=int(cells[i]),
            accuracy=float(correct[i] / cells[i]),
            parasitized_true=float(true_pos[i] / cells[i]),
            parasitized_pred=float(pred_pos[i] / cells[i]),
        )
        for i in range(unique.size)
    )


def parasitemia_errors(per_slide: Sequence[SlideAccuracy]) -> npt.NDArray[np.float64]:
    """Per slide, ``|predicted - labelled|`` percentage of parasitized cells, in percentage
    points (a slide of 200 cells with 10 labelled and 14 predicted parasitized: 2.0)."""
    return np.array([100.0 * abs(row.parasitized_pred - row.parasitized_true)
                     for row in per_slide], dtype=np.float64)


def evaluate(
    y_true: npt.ArrayLike,
    prob: npt.ArrayLike,
    threshold: float,
    *,
    slides: Sequence[str] | None = None,
) -> EvaluationReport:
    """All test metrics at a threshold fixed beforehand (see :func:`choose_threshold`).

    ``slides`` (one name per cell) adds the per-slide accuracy table and the parasitemia
    error: a model that is right on average can still fail one patient's stain, and the
    minimum and the maximum error show it. Rates with a zero denominator (e.g. precision when
    nothing is predicted positive) are NaN; MCC is 0 then, the usual convention, since such a
    predictor carries no information.
    """
    y, p = labels_and_probs(y_true, prob)
    return _report(y, p, (p >= threshold).astype(np.int8), float(threshold), slides)


def evaluate_pooled(
    y_true: npt.ArrayLike,
    prob: npt.ArrayLike,
    thresholds: npt.ArrayLike,
    *,
    slides: Sequence[str] | None = None,
) -> EvaluationReport:
    """:func:`evaluate` over cells pooled from several models (cross-validation folds), each
    cell judged at the threshold its own fold chose on its validation slides (one threshold
    per cell). AUC and calibration pool the probabilities; the report's threshold is NaN."""
    y, p = labels_and_probs(y_true, prob)
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"thresholds has {t.size} values but there are {p.size} cells")
    return _report(y, p, (p >= t).astype(np.int8), math.nan, slides)


def _report(
    y: npt.NDArray[np.int8],
    p: npt.NDArray[np.float64],
    predicted: npt.NDArray[np.int8],
    threshold: float,
    slides: Sequence[str] | None,
) -> EvaluationReport:
    tp = int(np.sum((predicted == 1) & (y == 1)))
    tn = int(np.sum((predicted == 0) & (y == 0)))
    fp = int(np.sum((predicted == 1) & (y == 0)))
    fn = int(np.sum((predicted == 0) & (y == 1)))
    # Python floats: tp * tn on large sets would overflow int32 products elsewhere.
    mcc_denominator = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = (float(tp) * tn - float(fp) * fn) / mcc_denominator if mcc_denominator else 0.0

    per_slide = _per_slide(slides, y, predicted) if slides is not None else ()
    slide_accuracies = np.array([row.accuracy for row in per_slide])
    errors = parasitemia_errors(per_slide)
    return EvaluationReport(
        threshold=threshold,
        n=int(y.size),
        accuracy=(tp + tn) / y.size,
        roc_auc=roc_auc(y, p),
        sensitivity=_ratio(tp, tp + fn),
        specificity=_ratio(tn, tn + fp),
        precision=_ratio(tp, tp + fp),
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        mcc=mcc,
        ece=expected_calibration_error(y, p),
        confusion=Confusion(tn=tn, fp=fp, fn=fn, tp=tp),
        per_slide=per_slide,
        slide_accuracy_min=float(slide_accuracies.min()) if per_slide else math.nan,
        slide_accuracy_median=float(np.median(slide_accuracies)) if per_slide else math.nan,
        parasitemia_error_mean=float(errors.mean()) if per_slide else math.nan,
        parasitemia_error_max=float(errors.max()) if per_slide else math.nan,
    )


def worst_misclassified(
    y_true: npt.ArrayLike, prob: npt.ArrayLike, threshold: float, *, limit: int = 16
) -> npt.NDArray[np.int64]:
    """Indices of the most confident mistakes, worst first.

    Confidence in a mistake is how far the probability lies on the wrong side of the
    threshold: a parasitized cell at p = 0.01 is worse than one at p = 0.45.
    """
    y, p = labels_and_probs(y_true, prob)
    wrong = np.flatnonzero((p >= threshold).astype(np.int8) != y)
    margin = np.where(y[wrong] == 1, threshold - p[wrong], p[wrong] - threshold)
    order = np.argsort(-margin, kind="stable")  # stable: equal margins keep input order
    return wrong[order[:limit]]
