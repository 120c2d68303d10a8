"""Cross-validation runs compared slide by slide from their result JSONs alone (no models).

The fold models of a CV live in a work folder that a new machine does not have, so a run on
another machine, CPU kind or day cannot be paired with ``benchmarks.cv_ensemble``. The
result JSON of ``benchmarks.accuracy --cv K`` keeps every test slide's cells, accuracy and
called share (``parasitemia.per_slide``), and that is enough for the paired slide-bootstrap
difference of accuracy and of mean parasitemia error, the same resamples as the CV's own
(AUC needs each cell's score: it is left out, and each run's own AUC interval is shown).

    python -m benchmarks.cv_compare \\
        benchmarks/results/accuracy-cv5-cpu-avx2-15min.json \\
        benchmarks/results/accuracy-cv5-cpu-avx512-15min.json \\
        --json benchmarks/results/cv5-cpu-avx512-vs-avx2.json

Each argument is ``FILE`` (its only variant) or ``FILE:VARIANT``; the first is the baseline.
Runs pair only when they tested the same slides with the same cells (the CV's fixed folds).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from malaria.evaluation.paired import slide_draw_counts

RESAMPLES = 2000  # benchmarks.accuracy.CV_RESAMPLES: the CV's own intervals
LEVEL = 0.95


@dataclass(frozen=True)
class SlideCounts:
    """One run's test slides, in slide order: cells, cells called right, error (pp)."""

    name: str
    slides: tuple[str, ...]
    cells: np.ndarray
    correct: np.ndarray
    error_pp: np.ndarray
    row: dict[str, Any]


def read_run(spec: str) -> SlideCounts:
    """``FILE`` or ``FILE:VARIANT`` of a ``benchmarks.accuracy --cv`` result JSON."""
    path_text, _, variant = spec.partition(":")
    data = json.loads(Path(path_text).read_text())
    variants = [key for key in data if key != "meta"]
    if not variant:
        if len(variants) != 1:
            raise ValueError(f"{path_text} holds {variants}: name one as FILE:VARIANT")
        variant = variants[0]
    if variant not in variants:
        raise ValueError(f"{path_text} has no variant {variant!r} (it has {variants})")
    row = data[variant]
    per_slide = (row.get("parasitemia") or {}).get("per_slide")
    if not per_slide:
        raise ValueError(f"{spec}: no per-slide results (not a --cv result JSON?)")
    ordered = sorted(per_slide, key=lambda entry: str(entry["slide"]))
    cells = np.array([entry["cells"] for entry in ordered], dtype=np.float64)
    correct = np.rint(np.array([entry["accuracy"] for entry in ordered]) * cells)
    return SlideCounts(name=f"{Path(path_text).stem}:{variant}",
                       slides=tuple(str(entry["slide"]) for entry in ordered), cells=cells,
                       correct=correct,
                       error_pp=np.array([entry["error_pp"] for entry in ordered]), row=row)


def paired(base: SlideCounts, other: SlideCounts, *, resamples: int = RESAMPLES,
           seed: int | None = None, level: float = LEVEL) -> dict[str, Any]:
    """``other`` minus ``base``: accuracy and mean parasitemia error, with the CV's paired
    slide-bootstrap interval."""
    from benchmarks.accuracy import CV_SEED, percentile_intervals, slide_count_differences

    if base.slides != other.slides or not np.array_equal(base.cells, other.cells):
        raise ValueError(f"{base.name} and {other.name} did not test the same slides and "
                         "cells: they pair only over the same folds")
    times = slide_draw_counts(base.cells.size, resamples, CV_SEED if seed is None else seed)
    observed, draws = slide_count_differences(base.cells, other.correct - base.correct,
                                              other.error_pp - base.error_pp, times)
    return {"resamples": resamples, "level": level, "slides": int(base.cells.size),
            **percentile_intervals(observed, draws, level)}


def _figure(row: dict[str, Any], key: str, digits: int) -> str:
    interval = row.get("bootstrap", {}).get(key, {})
    value = row["parasitemia"]["mean"] if key == "parasitemia_error_mean" else row[key]
    low, high = interval.get("low"), interval.get("high")
    shown = f"{value:.{digits}f}"
    return shown if low is None or high is None else f"{shown} [{low:.{digits}f}, {high:.{digits}f}]"


def _signed(interval: dict[str, Any], digits: int) -> str:
    return (f"{interval['estimate']:+.{digits}f} [{interval['low']:+.{digits}f}, "
            f"{interval['high']:+.{digits}f}]")


def table(runs: list[SlideCounts], differences: dict[str, dict[str, Any]]) -> str:
    lines = ["| run | accuracy [95% CI] | d acc vs first [CI] | AUC [95% CI] | sensitivity | "
             "specificity | parasitemia err mean [CI] / max, pp | d parasitemia [CI] | "
             "precision | epochs per fold | train s per fold |", "|" + "---|" * 11]
    for run in runs:
        row, diff = run.row, differences.get(run.name)
        epochs = [fold.get("epochs") for fold in row.get("folds", [])]
        shown_epochs = ("-" if not epochs or None in epochs
                        else f"{min(epochs)}-{max(epochs)}")
        lines.append(
            f"| {run.name} | {_figure(row, 'accuracy', 4)} | "
            f"{_signed(diff['accuracy'], 4) if diff else '-'} | {_figure(row, 'auc', 4)} | "
            f"{row['sensitivity']:.4f} | {row['specificity']:.4f} | "
            f"{_figure(row, 'parasitemia_error_mean', 2)} / {row['parasitemia']['max']:.1f} | "
            f"{_signed(diff['parasitemia_error_mean'], 2) if diff else '-'} | "
            f"{row.get('precision_policy', '-')} | {shown_epochs} | "
            f"{row.get('train_seconds', {}).get('mean', float('nan')):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="FILE[:VARIANT]",
                        help="CV result JSONs; the first is the baseline")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two runs")
    try:
        runs = [read_run(spec) for spec in args.runs]
        differences = {run.name: paired(runs[0], run) for run in runs[1:]}
    except (OSError, ValueError, KeyError) as error:
        parser.error(str(error))
    print(f"paired against {runs[0].name}; intervals: 95%, {RESAMPLES} resamples of the "
          "slides (AUC: each run's own interval, unpaired)\n")
    print(table(runs, differences))
    if args.json:
        args.json.write_text(json.dumps({"baseline": runs[0].name, "runs": args.runs,
                                         "versus_first": differences}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
