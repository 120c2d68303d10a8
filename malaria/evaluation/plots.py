"""Pictures of an evaluation: learning curves, ROC, confusion matrix, the worst mistakes.

matplotlib's Agg renderer through ``matplotlib.figure.Figure`` (never pyplot, which keeps
global state and is not thread-safe); every plot comes back as PNG bytes, so a caller can put
it straight into the bucket. Same conventions as :mod:`malaria.evaluation.metrics`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from malaria.core.labels import CLASS_OF_LABEL
from malaria.evaluation.metrics import (
    Confusion,
    EvaluationReport,
    evaluate,
    labels_and_probs,
    roc_auc,
    roc_curve,
    worst_misclassified,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
    y, p = labels_and_probs(y_true, prob)
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
    names = [CLASS_OF_LABEL[0], CLASS_OF_LABEL[1]]

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
    y, p = labels_and_probs(y_true, prob)
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
        caption = f"true {CLASS_OF_LABEL[int(y[index])]}\np = {p[index]:.3f}"
        if names is not None:
            name = str(names[int(index)])
            # Keep the end (slide and cell number) of long names so captions never overlap.
            caption += f"\n{name if len(name) <= 26 else '…' + name[-25:]}"
        ax.set_title(caption, fontsize=8)
    figure.suptitle(f"most confident mistakes (threshold {threshold:.3f})", fontsize=10)
    return _png(figure)
