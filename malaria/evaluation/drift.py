"""Drift between tonight's scored cells and the champion's validation slides.

Two signals a lab lead can read: the predicted-positive rate (parasitized calls per cell)
and the whole score distribution, compared with the population stability index (PSI) over
fixed probability bins. PSI < 0.1 is usually read as stable, 0.1-0.25 as a shift worth a
look, > 0.25 as a large shift (new stain, new microscope, new kind of slide). Scans are not
labelled, so this cannot say the model is wrong, only that tonight does not look like the
data it was validated on.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from malaria.core.labels import PARASITIZED

BINS = 20
PSI_WARN = 0.1
PSI_FLAG = 0.25
RATE_FLAG_RATIO = 2.0  # positive rate more than 2x or under half the reference


def probability_histogram(probabilities: Iterable[float], bins: int = BINS) -> list[int]:
    """Counts over ``bins`` equal bins of [0, 1], bin ``i`` holding ``[i/bins, (i+1)/bins)``
    and the last one 1.0 too. The one binning rule for the reference and for tonight's
    scores, so a probability on a bin edge lands in the same bin in both."""
    p = np.clip(np.fromiter(probabilities, dtype=np.float64), 0.0, 1.0)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    return [int(c) for c in np.bincount(index, minlength=bins)]


def reference_distribution(probabilities: Sequence[float], threshold: float) -> dict[str, object]:
    """What registration keeps of the validation scores (a histogram, not the scores)."""
    p = np.asarray(probabilities, dtype=np.float64)
    return {"bins": BINS, "counts": probability_histogram(p),
            "positive_rate": float((p >= threshold).mean()) if len(p) else None,
            "cells": len(p)}


def psi(expected: Sequence[int], actual: Sequence[int], *, floor: float = 1e-4) -> float:
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.sum() == 0 or a.sum() == 0:
        return math.nan
    # A small floor keeps empty bins from making the index infinite.
    e = np.maximum(e / e.sum(), floor)
    a = np.maximum(a / a.sum(), floor)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class DriftReport:
    cells: int
    positive_rate: float | None
    reference_positive_rate: float | None
    psi: float | None
    flagged: bool
    message: str


def compare(reference: dict[str, object] | None, counts: Sequence[int],
            positives: int) -> DriftReport:
    cells = int(sum(counts))
    rate = positives / cells if cells else None
    if not reference or not reference.get("counts"):
        return DriftReport(cells, rate, None, None, False,
                           "no reference: the serving model was registered without its "
                           "validation score distribution")
    ref_rate = reference.get("positive_rate")
    ref_rate = float(ref_rate) if isinstance(ref_rate, (int, float)) else None
    index = psi(reference["counts"], counts)  # type: ignore[arg-type]
    reasons = []
    if not math.isnan(index) and index > PSI_FLAG:
        reasons.append(f"score distribution shifted (PSI {index:.2f} > {PSI_FLAG})")
    if rate is not None and ref_rate:
        ratio = rate / ref_rate
        if ratio > RATE_FLAG_RATIO or ratio < 1 / RATE_FLAG_RATIO:
            reasons.append(f"positive rate {rate:.1%} vs {ref_rate:.1%} on validation slides")
    flagged = bool(reasons)
    if flagged:
        message = "DRIFT: " + "; ".join(reasons)
    elif math.isnan(index):
        message = "nothing scored to compare"
    else:
        level = "stable" if index < PSI_WARN else "a moderate shift"
        message = (f"{level}: PSI {index:.2f}, positive rate "
                   f"{rate:.1%} vs {ref_rate:.1%} on validation slides"
                   if rate is not None and ref_rate is not None else f"{level}: PSI {index:.2f}")
    return DriftReport(cells, rate, ref_rate, None if math.isnan(index) else index, flagged,
                       message)


def scored_distribution(rows: Iterable[dict[str, str]], counts: list[int],
                        positives: int, positive_label: str) -> int:
    """Add one slide's prediction rows to running ``counts``; returns the new positives."""
    probabilities: list[float] = []
    for row in rows:
        if row.get("error"):
            continue
        probabilities.append(float(row["probability"]))
        positives += row.get("predicted_class") == positive_label
    for index, count in enumerate(probability_histogram(probabilities, len(counts))):
        counts[index] += count
    return positives


class ObjectReader(Protocol):
    """What drift needs of a store (any :class:`malaria.io.store.Store` is one): this module
    computes on values and never imports I/O itself."""

    def get_bytes(self, key: str) -> bytes: ...


def drift_of_predictions(store: ObjectReader, prediction_keys: Iterable[str],
                         reference: dict[str, object] | None) -> DriftReport:
    """Read prediction CSVs one at a time and compare their scores with ``reference``."""
    counts = [0] * BINS
    positives = 0
    for key in prediction_keys:
        rows = csv.DictReader(io.StringIO(store.get_bytes(key).decode()))
        positives = scored_distribution(rows, counts, positives, PARASITIZED)
    return compare(reference, counts, positives)
