"""How small a per-slide parasitemia error a cell classifier of a given accuracy can reach on
these slides, if its mistakes were spread evenly (no training, no model).

A slide's parasitemia error is ``|false positives - false negatives| / cells`` (in percentage
points), so it depends on how many cells the slide has as much as on the model: one false
call on a 67-cell slide is 1.5 points. This draws each slide's false positives and false
negatives as independent binomials, from its own cell counts (both classes) and a given
sensitivity and specificity, and reports over the slides of the data set the expected mean
and max error and how often a draw meets the issue-15 targets (mean <= 1.0, max <= 3.0);
``--cells-per-slide N`` repeats it with every slide scaled to N cells. Errors
that are spread evenly are the best case: a model whose errors cluster on a few slides (a
stain it has not seen) does worse at the same rates.

With ``--measured DIR --variant NAME`` it also reads a CV's fold state (``benchmarks.accuracy
--cv-state``), takes the pooled sensitivity and specificity at each fold's own threshold, and
puts the measured per-slide errors beside the binomial expectation at those very rates: the
gap is what slide-to-slide differences add to the counting noise. Where the folds kept their
validation scores it also reports the "adjusted count" (each slide's called share corrected
by the fold's validation sensitivity and false-positive rate), which removes a shared bias.

    python -m benchmarks.parasitemia_floor --pack cells-80.npz \\
        --measured .malaria/cv-cpu --variant cellnet-hed --json parasitemia-floor.json
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks import emit
from malaria.evaluation.metrics import (
    EvaluationReport,
    evaluate,
    evaluate_pooled,
    parasitemia_errors,
)

ACCURACIES = (0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999)
TARGET_MEAN_PP = 1.0  # issue 15
TARGET_MAX_PP = 3.0
DRAWS = 4000
SEED = 15


@dataclass(frozen=True)
class SlideCounts:
    """Each slide's number of uninfected (``negatives``) and parasitized (``positives``) cells."""

    slides: tuple[str, ...]
    negatives: npt.NDArray[np.int64]
    positives: npt.NDArray[np.int64]

    @classmethod
    def from_cells(cls, labels: npt.ArrayLike, slides: npt.ArrayLike) -> SlideCounts:
        y = np.asarray(labels).astype(np.int64)
        names, inverse = np.unique(np.asarray(slides).astype(str), return_inverse=True)
        positives = np.bincount(inverse, weights=y, minlength=names.size).astype(np.int64)
        cells = np.bincount(inverse, minlength=names.size).astype(np.int64)
        return cls(tuple(str(n) for n in names), cells - positives, positives)

    @property
    def cells(self) -> npt.NDArray[np.int64]:
        return self.negatives + self.positives

    def scaled_to(self, cells: int) -> SlideCounts:
        """The same slides with ``cells`` cells each, each keeping its share of parasitized
        cells: how the error would shrink with larger slides."""
        positives = np.round(cells * self.positives / self.cells).astype(np.int64)
        return SlideCounts(self.slides, cells - positives, positives)


def simulated_errors(counts: SlideCounts, sensitivity: float, specificity: float, *,
                     draws: int = DRAWS, seed: int = SEED) -> npt.NDArray[np.float64]:
    """Per-slide parasitemia errors (points), ``draws`` x slides, with each slide's false
    positives ~ Bin(negatives, 1 - specificity) and false negatives ~ Bin(positives,
    1 - sensitivity), independent."""
    rng = np.random.default_rng(seed)
    shape = (draws, counts.cells.size)
    false_pos = rng.binomial(np.broadcast_to(counts.negatives, shape), 1.0 - specificity)
    false_neg = rng.binomial(np.broadcast_to(counts.positives, shape), 1.0 - sensitivity)
    return 100.0 * np.abs(false_pos - false_neg) / counts.cells


def summarise(errors: npt.NDArray[np.float64]) -> dict[str, float]:
    """Expected mean and max over the slides, their 95% ranges over the draws, and the share
    of draws that meet each target."""
    means, maxima = errors.mean(axis=1), errors.max(axis=1)
    return {
        "mean_pp": round(float(means.mean()), 3),
        "mean_pp_95": [round(float(v), 3) for v in np.percentile(means, [2.5, 97.5])],
        "max_pp": round(float(maxima.mean()), 3),
        "max_pp_95": [round(float(v), 3) for v in np.percentile(maxima, [2.5, 97.5])],
        "p_mean_within_target": round(float((means <= TARGET_MEAN_PP).mean()), 4),
        "p_max_within_target": round(float((maxima <= TARGET_MAX_PP).mean()), 4),
        "p_both_within_target": round(float(((means <= TARGET_MEAN_PP)
                                             & (maxima <= TARGET_MAX_PP)).mean()), 4),
    }


def adjusted_count_errors(report: EvaluationReport,
                          validation: EvaluationReport) -> npt.NDArray[np.float64]:
    """Per test slide of ``report``, the error of the "adjusted count" (Forman's
    quantification): the share called parasitized corrected by the rates on the fold's
    validation slides, ``(called - fpr) / (tpr - fpr)`` clipped to [0, 1]. It removes a bias
    the model has on every slide, not one slide's own errors."""
    tpr, fpr = validation.sensitivity, 1.0 - validation.specificity
    return np.array([100.0 * abs(float(np.clip((row.parasitized_pred - fpr)
                                                / max(tpr - fpr, 1e-6), 0.0, 1.0))
                                 - row.parasitized_true) for row in report.per_slide])


def measured(state: Path, variant: str) -> tuple[dict[str, Any], SlideCounts]:
    """A CV variant's pooled test cells at each fold's own threshold: its rates and the
    per-slide errors they gave (and the slides' cell counts)."""
    labels, probabilities, thresholds, slides, adjusted, folds = [], [], [], [], [], 0
    for path in sorted(state.glob(f"fold*-{variant}.npz")):
        data = np.load(path)
        threshold = float(data["threshold"])
        labels.append(data["labels"])
        probabilities.append(data["probabilities"])
        thresholds.append(np.full(data["labels"].size, threshold))
        slides.append(data["slides"].astype(str))
        if "val_labels" in data.files:
            fold = evaluate(data["labels"], data["probabilities"], threshold,
                            slides=list(slides[-1]))
            adjusted.append(adjusted_count_errors(
                fold, evaluate(data["val_labels"], data["val_probabilities"], threshold)))
        folds += 1
    if not folds:
        raise SystemExit(f"no fold state for {variant!r} in {state}")
    slide = np.concatenate(slides)
    report = evaluate_pooled(np.concatenate(labels), np.concatenate(probabilities),
                             np.concatenate(thresholds), slides=list(slide))
    counts = SlideCounts.from_cells(np.concatenate(labels), slide)
    errors = parasitemia_errors(report.per_slide)
    worst = np.argsort(-errors)[:5]
    found = {
        "variant": variant, "folds": folds, "slides": len(report.per_slide),
        "sensitivity": round(report.sensitivity, 4),
        "specificity": round(report.specificity, 4),
        "mean_pp": round(report.parasitemia_error_mean, 3),
        "max_pp": round(report.parasitemia_error_max, 3),
        "worst_slides": [{"slide": report.per_slide[i].slide,
                          "cells": report.per_slide[i].cells,
                          "labelled_pct": round(100.0 * report.per_slide[i].parasitized_true,
                                                1),
                          "error_pp": round(float(errors[i]), 2)} for i in worst],
        "adjusted_count": (None if len(adjusted) < folds else
                           {"mean_pp": round(float(np.concatenate(adjusted).mean()), 3),
                            "max_pp": round(float(np.concatenate(adjusted).max()), 3)}),
        "binomial_at_these_rates": summarise(simulated_errors(counts, report.sensitivity,
                                                              report.specificity)),
    }
    return found, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, help="the cells' labels and slides (a pack of "
                        "benchmarks.accuracy --write-pack); default: the measured variant's")
    parser.add_argument("--measured", type=Path, metavar="DIR", help="a CV's --cv-state")
    parser.add_argument("--variant", help="with --measured: the variant's name")
    parser.add_argument("--accuracies", default=",".join(map(str, ACCURACIES)),
                        help="sensitivity = specificity levels to simulate, comma-separated")
    parser.add_argument("--cells-per-slide", type=int, metavar="N",
                        help="also simulate every slide scaled to N cells (its mix kept)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if (args.measured is None) != (args.variant is None):
        parser.error("--measured and --variant go together")
    if args.pack is None and args.measured is None:
        parser.error("give --pack or --measured")

    result: dict[str, Any] = {"draws": DRAWS, "seed": SEED,
                              "targets": {"mean_pp": TARGET_MEAN_PP, "max_pp": TARGET_MAX_PP}}
    if args.measured is not None:
        result["measured"], counts = measured(args.measured, args.variant)
    if args.pack is not None:
        pack = np.load(args.pack, allow_pickle=False)
        counts = SlideCounts.from_cells(pack["labels"], pack["slides"])
    cells = counts.cells
    result["slides"] = {"count": int(cells.size), "cells": int(cells.sum()),
                        "cells_per_slide": {"min": int(cells.min()),
                                            "median": float(np.median(cells)),
                                            "max": int(cells.max())},
                        "without_parasitized_cells": int((counts.positives == 0).sum())}
    result["evenly_spread_errors"] = {
        level: summarise(simulated_errors(counts, float(level), float(level)))
        for level in args.accuracies.split(",")}
    if args.cells_per_slide:
        larger = counts.scaled_to(args.cells_per_slide)
        result["evenly_spread_errors_scaled"] = {
            "cells_per_slide": args.cells_per_slide,
            **{level: summarise(simulated_errors(larger, float(level), float(level)))
               for level in args.accuracies.split(",")}}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
