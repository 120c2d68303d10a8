"""Honest evaluation of a binary cell classifier: metrics, the decision threshold, and plots.

Conventions used throughout:

* label 1 = Parasitized (the positive class), label 0 = Uninfected;
* ``prob`` is the model's probability of Parasitized, in [0, 1];
* a cell is predicted Parasitized when ``prob >= threshold``.

The threshold is a choice made on **validation** slides (:func:`choose_threshold`) and then
applied unchanged to the **test** slides (:func:`evaluate`). Choosing it on the test slides
would leak the answer into the score, so no function here ever looks at data it was not given.

Everything is plain numpy (no TensorFlow, no scikit-learn). Plots use matplotlib's Agg
renderer through ``matplotlib.figure.Figure`` (never pyplot, which keeps global state and is
not thread-safe) and come back as PNG bytes, so a caller can put them straight into the bucket.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ThresholdRule = Literal["youden", "max_accuracy", "min_sensitivity"]

CLASS_NAMES = {0: "Uninfected", 1: "Parasitized"}
ECE_BINS = 15  # Guo et al. (2017), "On calibration of modern neural networks"

# Floating-point slack when comparing objective values that should tie exactly.
_EPS = 1e-12


# ------------------------------------------------------------------------------- validation


def _labels_and_probs(
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
    y, p = _labels_and_probs(y_true, prob, probabilities=False)
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


def _counts_by_score(
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
    y, p = _labels_and_probs(y_true, prob, probabilities=False)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a ROC curve needs both classes in y_true")
    unique, positives, negatives = _counts_by_score(y, p)
    tps = np.concatenate([[0], np.cumsum(positives[::-1])])
    fps = np.concatenate([[0], np.cumsum(negatives[::-1])])
    thresholds = np.concatenate([[np.inf], unique[::-1]])
    return fps / n_neg, tps / n_pos, thresholds


# ------------------------------------------------------------------------------- threshold


def choose_threshold(
    y_true: npt.ArrayLike,
    prob: npt.ArrayLike,
    *,
    rule: ThresholdRule = "youden",
    min_sensitivity: float = 0.96,
) -> float:
    """The decision threshold, chosen on VALIDATION slides only; apply it unchanged to test.

    Rules:

    * ``"youden"``: maximise sensitivity + specificity - 1 (balanced errors);
    * ``"max_accuracy"``: maximise accuracy on the given cells (follows their class mix);
    * ``"min_sensitivity"``: the highest specificity whose sensitivity is at least
      ``min_sensitivity``; the screening rule, where a missed infection costs more than a
      second look at a clean cell.

    Candidates are the midpoints between adjacent distinct scores (plus one below the lowest
    and one above the highest), so the boundary keeps a margin from the validation cells on
    both sides instead of sitting on one of them. Ties go to the candidate nearest 0.5.
    """
    y, p = _labels_and_probs(y_true, prob)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("choosing a threshold needs both classes among the validation cells")
    if rule == "min_sensitivity" and not 0.0 < min_sensitivity <= 1.0:
        raise ValueError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}")

    unique, positives, negatives = _counts_by_score(y, p)
    # Candidate j predicts positive exactly the scores unique[j:], j = 0..k (k: none positive).
    lowest = unique[0] / 2.0
    highest = (unique[-1] + 1.0) / 2.0 if unique[-1] < 1.0 else float(np.nextafter(1.0, 2.0))
    candidates = np.concatenate([[lowest], (unique[:-1] + unique[1:]) / 2.0, [highest]])
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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; undefined values (NaN) become ``None`` so strict JSON accepts them."""

        def clean(value: float) -> float | None:
            return None if math.isnan(value) else float(value)

        return {
            "threshold": float(self.threshold),
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
    y, p = _labels_and_probs(y_true, prob)
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


def evaluate(
    y_true: npt.ArrayLike,
    prob: npt.ArrayLike,
    threshold: float,
    *,
    slides: Sequence[str] | None = None,
) -> EvaluationReport:
    """All test metrics at a threshold fixed beforehand (see :func:`choose_threshold`).

    ``slides`` (one name per cell) adds the per-slide accuracy table: a model that is right on
    average can still fail one patient's stain, and the minimum shows it. Rates with a zero
    denominator (e.g. precision when nothing is predicted positive) are NaN; MCC is 0 then,
    the usual convention, since such a predictor carries no information.
    """
    y, p = _labels_and_probs(y_true, prob)
    predicted = (p >= threshold).astype(np.int8)
    tp = int(np.sum((predicted == 1) & (y == 1)))
    tn = int(np.sum((predicted == 0) & (y == 0)))
    fp = int(np.sum((predicted == 1) & (y == 0)))
    fn = int(np.sum((predicted == 0) & (y == 1)))
    # Python floats: tp * tn on large sets would overflow int32 products elsewhere.
    mcc_denominator = math.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = (float(tp) * tn - float(fp) * fn) / mcc_denominator if mcc_denominator else 0.0

    per_slide = _per_slide(slides, y, predicted) if slides is not None else ()
    slide_accuracies = np.array([row.accuracy for row in per_slide])
    return EvaluationReport(
        threshold=float(threshold),
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
    )


# ------------------------------------------------------------------------------------ plots


def _figure(width: float, height: float) -> Figure:
    # Imported here: matplotlib costs ~0.4 s to import, and scoring never draws.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" stamp: the same figure then gives the same bytes on every run.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _history_columns(
    history: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]],
) -> dict[str, list[float]]:
    """Per-epoch dicts (a callback's logs) or Keras' ``History.history`` (dict of lists)."""
    if isinstance(history, Mapping):
        return {str(k): [float(v) for v in values] for k, values in history.items()}
    columns: dict[str, list[float]] = {}
    for epoch, logs in enumerate(history):
        for key, value in logs.items():
            # Epochs missing a key (e.g. no validation that epoch) are filled with NaN gaps.
            columns.setdefault(str(key), [math.nan] * epoch).append(float(value))
        for values in columns.values():
            values.extend([math.nan] * (epoch + 1 - len(values)))
    return columns


def plot_learning_curves(
    history: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]],
) -> bytes:
    """Loss, accuracy (and any other metric) for train and validation, plus the learning rate.

    ``history`` is a list of per-epoch dicts with keys such as ``loss``, ``val_loss``,
    ``accuracy``, ``val_accuracy`` and ``lr`` or ``learning_rate`` (Keras 3's name). An
    ``epoch`` key, if present, is the x axis as given (1-based, as :mod:`malaria.model.trainer`
    records it); otherwise epochs count from 1. Other keys are drawn only when they have a
    ``val_`` twin, which leaves out bookkeeping such as ``epoch_seconds``. The epoch with the lowest ``val_loss`` (the
    one early stopping restores) is marked.
    """
    columns = _history_columns(history)
    epochs_given = columns.pop("epoch", None)
    n_epochs = max((len(v) for v in columns.values()), default=0)
    if n_epochs == 0:
        raise ValueError("the training history is empty")
    epochs = np.asarray(epochs_given if epochs_given else range(1, n_epochs + 1), dtype=float)

    lr_key = next((k for k in ("lr", "learning_rate") if k in columns), None)
    metrics = sorted(
        {
            k.removeprefix("val_")
            for k in columns
            if k.startswith("val_") or k in ("loss", "accuracy") or f"val_{k}" in columns
        },
        key=lambda name: (name != "loss", name != "accuracy", name),
    )
    if not metrics and lr_key is None:
        raise ValueError(f"nothing to draw in the training history (keys: {sorted(columns)})")
    panels = [*metrics, lr_key] if lr_key else metrics
    figure = _figure(4.2 * len(panels), 3.4)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]

    best_epoch: float | None = None
    if "val_loss" in columns and np.isfinite(columns["val_loss"]).any():
        best_epoch = float(epochs[int(np.nanargmin(columns["val_loss"]))])
    for ax, name in zip(axes, panels, strict=True):
        if name == lr_key:
            ax.plot(epochs, columns[name], color="tab:gray", marker=".")
            if np.all(np.asarray(columns[name]) > 0):
                ax.set_yscale("log")  # schedules decay geometrically
            ax.set_title("learning rate")
        else:
            for key, label, style in ((name, "train", "-"), (f"val_{name}", "validation", "--")):
                if key in columns:
                    ax.plot(epochs, columns[key], style, marker=".", label=label)
            ax.set_title(name)
            ax.legend(loc="best", fontsize="small")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:red", alpha=0.3, linewidth=1)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _png(figure)


def plot_roc(y_true: npt.ArrayLike, prob: npt.ArrayLike, *, threshold: float | None = None) -> bytes:
    """The ROC curve with its AUC; ``threshold`` marks the operating point in use."""
    y, p = _labels_and_probs(y_true, prob)
    fpr, tpr, _ = roc_curve(y, p)
    auc = roc_auc(y, p)
    figure = _figure(4.6, 4.4)
    ax = figure.subplots()
    ax.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"model (AUC = {auc:.4f})")
    ax.plot([0, 1], [0, 1], color="tab:gray", linestyle=":", label="chance")
    if threshold is not None:
        report = evaluate(y, p, threshold)
        ax.plot(
            [1.0 - report.specificity],
            [report.sensitivity],
            "o",
            color="tab:red",
            label=f"threshold {threshold:.3f}: sens {report.sensitivity:.3f}, "
            f"spec {report.specificity:.3f}",
        )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"ROC, {y.size} cells")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    return _png(figure)


def plot_confusion_matrix(confusion: Confusion | EvaluationReport) -> bytes:
    """Counts with the share of each true class, Uninfected first, Parasitized second."""
    if isinstance(confusion, EvaluationReport):
        confusion = confusion.confusion
    counts = confusion.as_array()
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
    names = [CLASS_NAMES[0], CLASS_NAMES[1]]

    figure = _figure(4.4, 3.9)
    ax = figure.subplots()
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for (row, col), count in np.ndenumerate(counts):
        colour = "white" if shares[row, col] > 0.5 else "black"
        ax.text(col, row, f"{count}\n{shares[row, col]:.1%}", ha="center", va="center",
                color=colour, fontsize=12)
    ax.set_xticks([0, 1], labels=names)
    ax.set_yticks([0, 1], labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    return _png(figure)


def worst_misclassified(
    y_true: npt.ArrayLike, prob: npt.ArrayLike, threshold: float, *, limit: int = 16
) -> npt.NDArray[np.int64]:
    """Indices of the most confident mistakes, worst first.

    Confidence in a mistake is how far the probability lies on the wrong side of the
    threshold: a parasitized cell at p = 0.01 is worse than one at p = 0.45.
    """
    y, p = _labels_and_probs(y_true, prob)
    wrong = np.flatnonzero((p >= threshold).astype(np.int8) != y)
    margin = np.where(y[wrong] == 1, threshold - p[wrong], p[wrong] - threshold)
    order = np.argsort(-margin, kind="stable")  # stable: equal margins keep input order
    return wrong[order[:limit]]


def plot_worst_misclassified(
    images: Sequence[npt.NDArray[np.uint8]] | npt.NDArray[np.uint8],
    y_true: npt.ArrayLike,
    prob: npt.ArrayLike,
    threshold: float,
    *,
    limit: int = 16,
    columns: int = 4,
    names: Sequence[str] | None = None,
) -> bytes:
    """A montage of the most confident mistakes, captioned with the true class and p.

    ``images`` are uint8 cells, RGB (H, W, 3) or grey (H, W), one per label; sizes may
    differ. ``names`` (e.g. slide/file) are added to the captions when given. With no
    mistakes the PNG says so, so the report always has the picture it links to.
    """
    y, p = _labels_and_probs(y_true, prob)
    if len(images) != y.size:
        raise ValueError(f"{len(images)} images but {y.size} labels")
    if names is not None and len(names) != y.size:
        raise ValueError(f"{len(names)} names but {y.size} labels")
    chosen = worst_misclassified(y, p, threshold, limit=limit)
    if chosen.size == 0:
        figure = _figure(4.0, 1.2)
        figure.text(0.5, 0.5, "no misclassified cells", ha="center", va="center", fontsize=12)
        return _png(figure)

    n_columns = max(1, min(columns, chosen.size))
    n_rows = math.ceil(chosen.size / n_columns)
    figure = _figure(2.2 * n_columns, 2.4 * n_rows)
    axes = figure.subplots(n_rows, n_columns, squeeze=False).reshape(-1)
    for ax in axes:
        ax.set_axis_off()
    for ax, index in zip(axes, chosen, strict=False):
        image = np.asarray(images[int(index)])
        if image.dtype != np.uint8:
            raise ValueError(f"image {index} is {image.dtype}, expected uint8")
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255,
                  interpolation="nearest")
        caption = f"true {CLASS_NAMES[int(y[index])]}\np = {p[index]:.3f}"
        if names is not None:
            name = str(names[int(index)])
            # Keep the end (slide and cell number) of long names so captions never overlap.
            caption += f"\n{name if len(name) <= 26 else '…' + name[-25:]}"
        ax.set_title(caption, fontsize=8)
    figure.suptitle(f"most confident mistakes (threshold {threshold:.3f})", fontsize=10)
    return _png(figure)
