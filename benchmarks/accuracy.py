"""Accuracy benchmark on real cells, judged by slide.

    python -m benchmarks.accuracy --data ../shared/data/nih-cells-128 --minutes 15 \\
        --json benchmarks/results/accuracy.json

Holds out 20% of the slides (fixed seed) as the test set, takes validation slides from the
rest, then trains each architecture (the default ``cellnet`` and the article's
``seed-augmented``) with the same wall-clock budget. The decision threshold is chosen on the
validation slides (Youden's J), never on test. Reports per architecture: accuracy, auc,
sensitivity, specificity, precision, f1, mcc, per-slide accuracy, calibration error,
train_seconds, images_per_s, params, model_bytes (serving .keras file), threshold, epochs.

``--eval val`` reports on the validation slides instead and never touches the test slides:
use it (and only it) to compare settings.

``--track-test`` also reports, after every epoch, the test metrics at the validation-chosen
threshold and the training seconds so far, and so the time to reach the targets (it only
reports: the model kept is still the best validation epoch). For machines without the data
folder or TensorFlow (a GPU machine with JAX), ``--write-pack FILE`` stores the decoded
cells of one input size with their keys, labels and slides, and ``--pack FILE`` trains from
it instead of ``--data``, with the same split; run with ``KERAS_BACKEND=jax`` there.

Training goes through :func:`malaria.model.candidate.train_candidate`, the function behind
``malaria train`` and the train flow, with the product's defaults (epochs, patience,
schedule, batch, learning rate) and its precision probe; the benchmark passes only the time
budget, the seed and its fixed slide split (and ``--override`` for experiments). Metrics come
from :mod:`malaria.evaluation` (threshold by the product's rule on validation). The JSON
records the precision chosen and the CPU flags it was chosen on (``meta.machine.cpu_flags``).

``--cv K`` replaces the one split by slide-grouped K-fold cross-validation over all slides
(:func:`malaria.dataset.split.slide_folds`: every slide tested exactly once, folds stratified
by each slide's majority class, a fixed seed). In each fold the validation slides (threshold,
early stopping) come from that fold's training slides, at the share that keeps the product
split's 65/15/20 proportions when K = 5; ``--minutes`` is the budget per fold. Per
architecture the JSON holds the pooled metrics over all cells (each cell at its own fold's
threshold), ``spread`` (mean, sd, min, max over the folds), ``bootstrap`` (slide-level 95%
intervals for accuracy, AUC and mean parasitemia error), ``parasitemia`` (per-slide
|predicted - labelled| parasitized percentage, in percentage points), ``train_seconds`` and
``folds`` (each fold's own row); ``meta.folds`` maps slide -> fold. It works from ``--pack``
as well (a pack holds each cell's slide and label)::

    python -m benchmarks.accuracy --cv 5 --archs cellnet --minutes 12 \\
        --data ../shared/data/nih-cells-128 --json benchmarks/results/accuracy-cv5.json

Issue 15's experiments run over the same folds: ``--slide-adapt colour|bn|colour+bn`` scores
each slide after adapting to its own cells (:mod:`malaria.evaluation.adaptation`: colour
statistics matched to the training cells', or batch-norm statistics re-estimated on the
slide, AdaBN; also on the validation slides, so the threshold is chosen on adapted scores),
``--ensemble N`` averages N models of consecutive seeds, and ``--cv-variants JSON`` runs a
list of named variants (``{"name", "arch", "override", "size", "slide_adapt", "bn_prior",
"ensemble", "tta"}``; omitted keys come from the command line, ``override`` replaces
``--override``) and writes one comparison table (``meta.comparison_markdown``, and
``--json``'s path with ``.md``): pooled figures with slide-bootstrap intervals, the paired
slide-bootstrap difference to the first variant, per-fold spread. Variants that differ only
in how they are scored share their trained models::

    python -m benchmarks.accuracy --pack cells-80.npz --cv 5 --minutes 3 \\
        --cv-variants issue15-adapt --cv-state cv-state --json accuracy-cv5-adapt.json

(presets in ``VARIANT_PRESETS``; ``--cv-state DIR`` keeps each finished fold, so the same
command run again continues where a time limit stopped it).

``--fit-on train+val --threshold-from RUN.json`` fits the final model on the validation slides
too, with the threshold a train-only run chose on them; ``--train-slides F`` trains on a
seeded fraction of the training slides (learning curves, with ``--eval val``);
``--exclude-keys CSV`` leaves listed cells (``benchmarks.label_review --below P``) out of
training only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from benchmarks import BENCH_LOCK
from malaria.core import defaults
from malaria.core.views import views_of
from malaria.dataset.cache import ImageCache
from malaria.dataset.pipeline import ArraySet, load_arrays
from malaria.dataset.records import CellRecord, folder_reader, records_from_folder
from malaria.dataset.split import SlideSplit, fold_split, slide_folds, split_by_slide
from malaria.evaluation.adaptation import (
    SLIDE_ADAPTATIONS,
    ColourStats,
    colour_stats,
    predict_by_slide,
)
from malaria.evaluation.metrics import EvaluationReport, evaluate, evaluate_pooled, roc_auc
from malaria.evaluation.paired import slide_draw_counts
from malaria.evaluation.slides import slide_bootstrap, weighted_roc_auc
from malaria.evaluation.threshold import THRESHOLD_RULES, ThresholdRule, choose_threshold
from malaria.model.architectures import classifier_params, default_input_size
from malaria.model.candidate import train_candidate
from malaria.model.checkpoints import save_for_serving
from malaria.model.config import RetrainConfig
from malaria.model.precision import backend, describe_precision, gpus, reported_cpu_flags
from malaria.model.predict import predict_probabilities
from malaria.model.trainer import TrainResult

# Issue 3's targets for the default model on held-out slides.
TARGETS = {"accuracy": 0.97, "auc": 0.995, "sensitivity": 0.96}
SPLIT_SEED = 20240501  # fixed: the test slides are the same in every run
CV_SEED = SPLIT_SEED  # fixed: the same folds (and validation slides in each) in every run
CV_RESAMPLES = 2000  # slide-bootstrap resamples behind every CV interval
# Figures whose spread over the folds is reported (mean, sd, min, max).
SPREAD_KEYS = ("accuracy", "auc", "sensitivity", "specificity", "parasitemia_error_mean",
               "parasitemia_error_max", "per_slide_accuracy_min", "threshold", "train_seconds")
# The article's architecture does not train at the default architecture's batch and peak
# rate; it is compared at the smallest change that trains it (the article used RMSprop
# 1e-4; Adam at its default rate trains it reliably). Everything else is the product's.
ARCH_RECIPES: dict[str, dict[str, Any]] = {
    "seed-augmented": {"batch_size": 32, "learning_rate": 1e-3,
                       "extra_train_options": {"warmup_epochs": 0.5}},
}


def metrics_row(report: EvaluationReport) -> dict[str, Any]:
    """The benchmark's JSON keys (README, accuracy section) from malaria.evaluation's report;
    an undefined figure stays NaN, as comparisons with the targets expect."""
    c = report.confusion
    return {"accuracy": report.accuracy, "auc": report.roc_auc,
            "sensitivity": report.sensitivity, "specificity": report.specificity,
            "precision": report.precision, "f1": report.f1, "mcc": report.mcc,
            "ece": report.ece, "confusion": {"tp": c.tp, "fn": c.fn, "fp": c.fp, "tn": c.tn},
            "per_slide_accuracy_min": report.slide_accuracy_min,
            "per_slide_accuracy_median": report.slide_accuracy_median,
            "parasitemia_error_mean": report.parasitemia_error_mean,
            "parasitemia_error_max": report.parasitemia_error_max,
            "cells": report.n, "slides": len(report.per_slide)}


# ------------------------------------------------------------------------------- benchmark


def _wait_for_bench_lock(lock: Path = BENCH_LOCK) -> None:
    # The lead times benchmarks on the same two cores; do not run over them.
    while lock.exists():
        print("waiting for", lock, file=sys.stderr, flush=True)
        time.sleep(30)


Loader = Any  # (records, size) -> ArraySet


def score(model: keras.Model, val: ArraySet, target: ArraySet | None, tta: bool | int,
          threshold: float | None = None) -> tuple[dict[str, Any], float, np.ndarray]:
    """Metrics on ``target`` (validation itself when None) at ``threshold``, or else at the
    one the product's rule picks on validation; also that threshold and the validation
    scores."""
    metrics, threshold, val_scores, _ = score_with_target(model, val, target, tta, threshold)
    return metrics, threshold, val_scores


@dataclass(frozen=True)
class Scoring:
    """How cells are scored at evaluation: per-slide adaptation (one of
    ``SLIDE_ADAPTATIONS``, with the training cells' colour statistics and AdaBN's prior)."""

    slide_adapt: str = "none"
    reference: ColourStats | None = None
    bn_prior: float = 0.0
    threshold_rule: ThresholdRule = defaults.THRESHOLD_RULE  # type: ignore[assignment]


def probabilities(models: keras.Model | list[keras.Model], cells: ArraySet, tta: bool | int,
                  scoring: Scoring = Scoring()) -> np.ndarray:
    """P(parasitized) per cell, averaged over ``models`` (an ensemble), each slide scored
    after ``scoring``'s adaptation to its own cells."""
    members = models if isinstance(models, list) else [models]
    if scoring.slide_adapt == "none":  # the product's scoring, unchanged
        per_model = [predict_probabilities(m, cells.images, tta=tta) for m in members]
    else:
        per_model = [predict_by_slide(m, cells.images, list(cells.slides),
                                      adapt=scoring.slide_adapt, reference=scoring.reference,
                                      tta=tta, prior=scoring.bn_prior) for m in members]
    return np.mean(per_model, axis=0).astype(np.float32)


def score_with_target(
        model: keras.Model | list[keras.Model], val: ArraySet, target: ArraySet | None,
        tta: bool | int, threshold: float | None = None, scoring: Scoring = Scoring(),
) -> tuple[dict[str, Any], float, np.ndarray, np.ndarray]:
    """:func:`score`, with the target's scores too (cross-validation pools them); an
    ensemble (a list of models) and per-slide adaptation (``scoring``) apply to the
    validation slides as to the target, so the threshold is chosen on scores like the ones
    it is applied to."""
    val_scores = probabilities(model, val, tta, scoring)
    if threshold is None:
        threshold = choose_threshold(val.labels, val_scores, rule=scoring.threshold_rule)
    if target is None:
        target, scores = val, val_scores
    else:
        scores = probabilities(model, target, tta, scoring)
    report = evaluate(target.labels, scores, threshold, slides=list(target.slides))
    return metrics_row(report), threshold, val_scores, scores


def folder_loader(data: Path, cache_folder: Path) -> Loader:
    cache, read = ImageCache(cache_folder), folder_reader(data)
    return lambda records, size: load_arrays(records, cache, size, read)


def write_pack(path: Path, records: list[CellRecord], load: Loader, size: int) -> None:
    """Every cell decoded at ``size`` with its key, label, slide and content id."""
    arrays = load(records, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=arrays.images, keys=np.array([r.key for r in records]),
             labels=arrays.labels, slides=arrays.slides,
             content_ids=np.array([r.content_id for r in records]))


def read_pack(path: Path) -> tuple[list[CellRecord], Loader]:
    pack = np.load(path, allow_pickle=False)
    images = pack["images"]
    records = [CellRecord(key=str(k), label=int(label), slide=str(s), content_id=str(c))
               for k, label, s, c in zip(pack["keys"], pack["labels"], pack["slides"],
                                         pack["content_ids"], strict=True)]
    row = {r.key: i for i, r in enumerate(records)}

    def load(subset: list[CellRecord], size: int) -> ArraySet:
        if size != images.shape[1]:
            raise SystemExit(f"{path} holds {images.shape[1]} px cells, not {size} px")
        rows = np.array([row[r.key] for r in subset], dtype=np.int64)
        return ArraySet(images[rows], np.array([r.label for r in subset], dtype=np.float32),
                        np.array([r.slide for r in subset]))

    return records, load


@dataclass(frozen=True)
class Scored:
    """The cells one run scored: labels, P(parasitized), slides, and the threshold its own
    validation slides chose."""

    labels: np.ndarray
    probabilities: np.ndarray
    slides: np.ndarray
    threshold: float
    # The validation cells' labels and probabilities, which chose the threshold: kept with a
    # CV fold so an ensemble of kept runs can choose its own threshold later.
    val_labels: np.ndarray | None = None
    val_probabilities: np.ndarray | None = None


class TimeToTarget(keras.callbacks.Callback):
    """After each epoch: test metrics at the threshold chosen on validation, against the
    training seconds so far (this callback's own evaluation time left out). Reporting only;
    nothing here feeds back into training or model selection."""

    def __init__(self, val: ArraySet, test: ArraySet, tta: bool | int) -> None:
        super().__init__()
        self.val, self.test, self.tta = val, test, tta
        self.started = 0.0
        self.overhead = 0.0
        self.epochs: list[dict[str, Any]] = []
        self.reached: dict[str, Any] | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        began = time.perf_counter()
        seconds = began - self.started - self.overhead
        m, _, _ = score(self.model, self.val, self.test, self.tta)
        row = {"epoch": epoch + 1, "train_seconds": round(seconds, 2),
               **{k: round(m[k], 5) for k in TARGETS},
               "met": all(m[k] >= v for k, v in TARGETS.items())}
        self.epochs.append(row)
        if row["met"] and self.reached is None:
            self.reached = row
        print(f"    test after epoch {row['epoch']} ({seconds:.1f} s): "
              f"acc {m['accuracy']:.4f} auc {m['auc']:.4f} sens {m['sensitivity']:.4f}"
              + ("  <- targets met" if row["met"] else ""), flush=True)
        self.overhead += time.perf_counter() - began

    def report(self) -> dict[str, Any]:
        first = {k: next((r["train_seconds"] for r in self.epochs if r[k] >= v), None)
                 for k, v in TARGETS.items()}
        return {"targets": TARGETS, "reached": self.reached,
                "first_seconds_per_target": first, "per_epoch": self.epochs,
                "evaluation_seconds_left_out": round(self.overhead, 1)}


def _some_slides(records: list[CellRecord], fraction: float, seed: int) -> list[CellRecord]:
    """The cells of a seeded ``fraction`` of the slides in ``records`` (learning curves)."""
    slides = sorted({r.slide for r in records})
    rng = np.random.default_rng(seed)
    keep = set(rng.choice(slides, size=max(1, round(fraction * len(slides))), replace=False))
    return [r for r in records if r.slide in keep]


def _without(records: list[CellRecord], listing: Path) -> list[CellRecord]:
    """``records`` less the keys in ``listing`` (a CSV with a ``key`` column, such as
    ``benchmarks.label_review --csv`` writes). Only ever applied to the cells trained on:
    evaluation always scores every cell of its slides as labelled."""
    import csv

    with listing.open(newline="") as handle:
        keys = {row["key"] for row in csv.DictReader(handle)}
    kept = [r for r in records if r.key not in keys]
    print(f"left {len(records) - len(kept)} listed cells out of training "
          f"({len(keys)} listed)", flush=True)
    return kept


def benchmark_split(records: list[CellRecord]) -> SlideSplit:
    """The benchmark's fixed split by slide: the same test slides in every run."""
    return split_by_slide(records, seed=SPLIT_SEED, val_fraction=defaults.VAL_FRACTION,
                          test_fraction=defaults.TEST_FRACTION)


def carried_threshold(path: Path, arch: str) -> float:
    return float(json.loads(Path(path).read_text())[arch]["threshold"])


def retrain_config(arch: str, args: argparse.Namespace) -> RetrainConfig:
    """The product's defaults, with the benchmark's time budget, seed and input size, the
    article architecture's recipe (``ARCH_RECIPES``) and ``--override`` (experiments)."""
    fields: dict[str, Any] = {"arch": arch, "max_minutes": args.minutes, "seed": args.seed,
                              **ARCH_RECIPES.get(arch, {})}
    if args.size:
        fields["input_size"] = args.size
    extra = dict(fields.pop("extra_train_options", {}))
    known = set(RetrainConfig.__dataclass_fields__)
    for name, value in json.loads(args.override or "{}").items():
        (fields if name in known else extra)[name] = value
    return RetrainConfig(**fields, extra_train_options=extra)


def run_arch(arch: str, records: list[CellRecord], split: SlideSplit,
             args: argparse.Namespace, load: Loader) -> dict[str, Any]:
    return train_and_score(arch, records, split, args, load)[0]


def load_sets(records: list[CellRecord], split: SlideSplit, args: argparse.Namespace,
              size: int, load: Loader) -> dict[str, ArraySet]:
    """The train, validation and (unless ``--eval val``) test cells of ``split`` at ``size``,
    with the training-set options (``--fit-on``, ``--exclude-keys``, ``--train-slides``)."""
    sets: dict[str, ArraySet] = {}
    for part in ("train", "val", "test"):
        if part == "test" and args.eval == "val":
            continue
        part_records = split.of(records, part)
        if part == "train" and args.fit_on == "train+val":
            part_records = part_records + split.of(records, "val")
        if part == "train" and args.exclude_keys:
            part_records = _without(part_records, args.exclude_keys)
        if part == "train" and args.train_slides < 1.0:
            part_records = _some_slides(part_records, args.train_slides, args.seed)
        sets[part] = load(part_records, size)
    return sets


@dataclass
class TrainedRun:
    """One training run: the model, its training record, and the cells it used."""

    arch: str
    config: RetrainConfig
    size: int
    result: TrainResult
    model_bytes: int
    workdir: Path
    sets: dict[str, ArraySet]
    tracker: TimeToTarget | None = None


def train_run(arch: str, records: list[CellRecord], split: SlideSplit,
              args: argparse.Namespace, load: Loader,
              sets: dict[str, ArraySet] | None = None) -> TrainedRun:
    """Train ``arch`` on ``split``'s train slides (``sets`` when already loaded at the run's
    input size) through the product's :func:`train_candidate`."""
    config = retrain_config(arch, args)
    size = config.resolved_input_size()
    if sets is None:
        sets = load_sets(records, split, args, size, load)
    workdir = Path(args.workdir) / f"{arch}-{size}-{os.getpid()}"

    def progress(epoch: int, m: dict) -> None:
        print(f"  {arch} epoch {epoch}: loss {m['loss']:.4f} val_loss {m['val_loss']:.4f} "
              f"val_acc {m['val_accuracy']:.4f} val_auc {m['val_auc']:.4f} "
              f"lr {m['learning_rate']:.2e} {m['images_per_s']:.0f} img/s", flush=True)

    tracker = TimeToTarget(sets["val"], sets["test"], args.tta) if args.track_test else None
    _wait_for_bench_lock()
    result = train_candidate(config, sets["train"], sets["val"],
                             checkpoint_dir=workdir / "checkpoint", on_epoch=progress,
                             resume=False, callbacks=[tracker] if tracker else [])
    print(f"  {arch}: {describe_precision(result.precision_policy)}", flush=True)
    model_bytes = save_for_serving(result.model, workdir / "model.keras")
    return TrainedRun(arch, config, size, result, model_bytes, workdir, sets, tracker)


def run_scoring(runs: list[TrainedRun], slide_adapt: str, bn_prior: float = 0.0,
                threshold_rule: str = defaults.THRESHOLD_RULE) -> Scoring:
    """The scoring for ``slide_adapt``; the colour adaptations take the training cells'
    colour statistics, which are also written next to the model (kept with it)."""
    reference = None
    if slide_adapt in ("colour", "colour+bn"):
        reference = colour_stats(runs[0].sets["train"].images)
        for run in runs:
            (run.workdir / "colour_reference.json").write_text(
                json.dumps(reference.to_dict(), indent=1))
    return Scoring(slide_adapt, reference, bn_prior, threshold_rule)  # type: ignore[arg-type]


def score_runs(runs: list[TrainedRun], args: argparse.Namespace, *, tta: bool | int,
               scoring: Scoring = Scoring()) -> tuple[dict[str, Any], Scored]:
    """Score ``runs`` (one model, or an ensemble of runs on the same cells, probabilities
    averaged) on the test (or validation) slides: the metrics and the scored cells."""
    first = runs[0]
    sets = first.sets
    # Fitted on the validation slides too: they cannot choose the threshold, so it comes
    # from a train-only run of the same recipe (its JSON).
    carried = (carried_threshold(args.threshold_from, first.arch)
               if args.fit_on == "train+val" else None)
    target = sets["val"] if args.eval == "val" else sets["test"]
    models = [run.result.model for run in runs]
    metrics, threshold, val_scores, scores = score_with_target(
        models if len(models) > 1 else models[0], sets["val"],
        None if args.eval == "val" else target, tta, carried, scoring)
    summary = first.result.summary()
    metrics.update(
        evaluated_on=args.eval, threshold=threshold,
        val_auc=roc_auc(sets["val"].labels, val_scores),
        # An ensemble costs the training of all its members.
        train_seconds=sum(run.result.summary()["seconds"] for run in runs),
        images_per_s=summary["images_per_s"],
        params=classifier_params(first.result.model), model_bytes=first.model_bytes,
        epochs=first.result.epochs_run, best_epoch=first.result.best_epoch,
        stopped=first.result.stopped, input_size=first.size,
        precision_policy=first.result.precision_policy, tta=tta,
        training=summary, config=asdict(first.config),
        train_config=asdict(first.config.train_config()),
        train_cells=len(sets["train"]), val_cells=len(sets["val"]),
        train_slides=len(set(sets["train"].slides)), fit_on=args.fit_on,
    )
    if scoring.slide_adapt != "none":
        metrics.update(slide_adapt=scoring.slide_adapt, bn_prior=scoring.bn_prior,
                       colour_reference=(scoring.reference.to_dict()
                                         if scoring.reference else None))
    if len(runs) > 1:
        metrics["ensemble"] = [{"seed": run.config.seed, "epochs": run.result.epochs_run,
                                "best_epoch": run.result.best_epoch,
                                "train_seconds": run.result.summary()["seconds"]}
                               for run in runs]
    if first.tracker is not None:
        metrics["time_to_target"] = first.tracker.report()
    return metrics, Scored(target.labels, scores, target.slides, threshold,
                           sets["val"].labels, val_scores)


def train_and_score(arch: str, records: list[CellRecord], split: SlideSplit,
                    args: argparse.Namespace, load: Loader) -> tuple[dict[str, Any], Scored]:
    """One training run on ``split``'s train slides, scored on its test (or validation)
    slides: the metrics and the scored cells (``--ensemble N``: N runs of seeds seed..
    seed+N-1, probabilities averaged; ``--slide-adapt``: per-slide adaptation)."""
    count = max(1, getattr(args, "ensemble", 1))
    runs = [train_run(arch, records, split, argparse.Namespace(**{
        **vars(args), "seed": args.seed + i,
        # A work folder per member, so no member saves over another's model.
        "workdir": Path(args.workdir) / f"member{i}" if count > 1 else args.workdir}), load)
        for i in range(count)]
    adapt = getattr(args, "slide_adapt", "none")
    return score_runs(runs, args, tta=args.tta,
                      scoring=run_scoring(runs, adapt, getattr(args, "bn_prior", 0.0),
                                          args.threshold_rule))


# ------------------------------------------------------------------------ cross-validation


def cv_splits(records: list[CellRecord], k: int) -> tuple[dict[str, int], list[SlideSplit]]:
    """The fixed slide -> fold assignment and, per fold, its train/validation/test slides
    (validation from the fold's training slides, seeded per fold)."""
    folds = slide_folds(records, k, seed=CV_SEED)
    return folds, [fold_split(records, folds, fold, seed=CV_SEED + fold)
                   for fold in range(k)]


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample sd (0 for one value), min and max over the folds."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def cv_summary(fold_rows: list[dict[str, Any]], scored: list[Scored], folds: dict[str, int],
               *, resamples: int = CV_RESAMPLES) -> dict[str, Any]:
    """Pooled metrics over every fold's test cells (each at its own fold's threshold), the
    per-fold spread, slide-bootstrap intervals and the per-slide parasitemia error."""
    labels, probs, slides, calls = pooled_cells(scored)
    report = pooled_report(scored)
    per_slide = [{"slide": row.slide, "fold": folds[row.slide], "cells": row.cells,
                  "accuracy": row.accuracy,
                  "labelled_pct": 100 * row.parasitized_true,
                  "predicted_pct": 100 * row.parasitized_pred,
                  "error_pp": 100 * abs(row.parasitized_pred - row.parasitized_true)}
                 for row in report.per_slide]
    seconds = [float(r["train_seconds"]) for r in fold_rows]
    return {
        **metrics_row(report), "evaluated_on": "cv", "cv_folds": len(fold_rows),
        "thresholds": [s.threshold for s in scored],
        "spread": {key: spread([float(r[key]) for r in fold_rows]) for key in SPREAD_KEYS},
        "bootstrap": slide_bootstrap(labels, probs, calls, list(slides),
                                     resamples=resamples, seed=CV_SEED),
        "parasitemia": {"unit": "percentage points", "mean": report.parasitemia_error_mean,
                        "max": report.parasitemia_error_max, "per_slide": per_slide},
        "train_seconds": {"per_fold": seconds, "total": sum(seconds),
                          "mean": sum(seconds) / len(seconds)},
        "precision_policy": fold_rows[0]["precision_policy"],
        "input_size": fold_rows[0]["input_size"], "params": fold_rows[0]["params"],
        "model_bytes": fold_rows[0]["model_bytes"],
        "folds": fold_rows,
    }


@dataclass(frozen=True)
class Variant:
    """One recipe of a cross-validation comparison: what is trained (``arch``,
    ``override``, ``size``) and how it is scored (``slide_adapt``, ``bn_prior``,
    ``ensemble`` members of seeds seed..seed+N-1, ``tta`` test-time views,
    ``threshold_rule``). Views and rule are part of what a kept fold is: :func:`parse_variants`
    fills them in from ``--tta`` and ``--threshold-rule``."""

    name: str
    arch: str
    override: str | None = None  # JSON of RetrainConfig/TrainConfig fields, as --override
    size: int | None = None
    slide_adapt: str = "none"
    bn_prior: float = 0.0
    ensemble: int = 1
    tta: int | None = None
    threshold_rule: str = defaults.THRESHOLD_RULE

    @property
    def recipe(self) -> tuple[str, str, int | None]:
        """What training depends on: variants with the same recipe share their models."""
        override = json.dumps(json.loads(self.override or "{}"), sort_keys=True)
        return self.arch, override, self.size or default_input_size(self.arch)


# Issue 15's comparisons, each over the same 5 folds (``--cv-variants issue15-adapt``). The
# first variant of each is the product's recipe as it was then, the baseline of the paired
# differences.
# Models trained per fold (H200, ~45-60 s each with compilation): adapt 1, stain 4,
# ensemble 3. They score at 8 test-time views and Youden's threshold, the defaults when they
# were first run (the kept folds are so); benchmarks.cv_ensemble rescores kept fold models at
# the product's views and rule.
AS_FIRST_RUN = {"tta": 8, "threshold_rule": "youden"}
VARIANT_PRESETS: dict[str, list[dict[str, Any]]] = {
    "issue15-adapt": [
        {"name": "cellnet", "arch": "cellnet", **AS_FIRST_RUN},
        # The same models scored with one view: what 8-view TTA buys for its 8x scoring cost.
        {"name": "cellnet-tta1", "arch": "cellnet", **AS_FIRST_RUN, "tta": 1},
        {"name": "cellnet+colour", "arch": "cellnet", "slide_adapt": "colour", **AS_FIRST_RUN},
        {"name": "cellnet+bn", "arch": "cellnet", "slide_adapt": "bn", **AS_FIRST_RUN},
        {"name": "cellnet+bn-prior128", "arch": "cellnet", "slide_adapt": "bn",
         "bn_prior": 128, **AS_FIRST_RUN},
        {"name": "cellnet+colour+bn", "arch": "cellnet", "slide_adapt": "colour+bn",
         **AS_FIRST_RUN},
    ],
    "issue15-stain": [
        {"name": "cellnet", "arch": "cellnet", **AS_FIRST_RUN},
        {"name": "cellnet-hed", "arch": "cellnet-hed", **AS_FIRST_RUN},
        {"name": "cellnet-hed+bn", "arch": "cellnet-hed", "slide_adapt": "bn", **AS_FIRST_RUN},
        {"name": "cellnet-hed-only", "arch": "cellnet-hed-only", **AS_FIRST_RUN},
        {"name": "cellnet-stainnorm", "arch": "cellnet-stainnorm", **AS_FIRST_RUN},
    ],
    "issue15-ensemble": [
        {"name": "cellnet", "arch": "cellnet", **AS_FIRST_RUN},
        {"name": "cellnet-x2", "arch": "cellnet", "ensemble": 2, **AS_FIRST_RUN},
        {"name": "cellnet-x3", "arch": "cellnet", "ensemble": 3, **AS_FIRST_RUN},
        {"name": "cellnet-x3+bn", "arch": "cellnet", "ensemble": 3, "slide_adapt": "bn",
         **AS_FIRST_RUN},
    ],
}
VARIANT_KEYS = {"name", "arch", "archs", "override", "size", "slide_adapt", "bn_prior",
                "ensemble", "tta", "threshold_rule"}


def parse_variants(text: str, args: argparse.Namespace) -> list[Variant]:
    """``--cv-variants``: a JSON list (inline, or a file holding it) of objects with a
    ``name`` and any of ``arch`` (or ``archs``; default the first of ``--archs``),
    ``override`` (an object, or its JSON text), ``size``, ``slide_adapt``, ``bn_prior``,
    ``ensemble`` and ``tta``; what an entry leaves out comes from the command line. A name
    in :data:`VARIANT_PRESETS` stands for that list."""
    path = Path(text)
    if text in VARIANT_PRESETS:
        raw: Any = VARIANT_PRESETS[text]
    elif not text.lstrip().startswith("[") and path.is_file():
        raw = json.loads(path.read_text())
    else:
        raw = json.loads(text)
    if not isinstance(raw, list) or not raw:
        raise ValueError("--cv-variants takes a non-empty JSON list of objects")
    variants: list[Variant] = []
    for entry in raw:
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"each variant needs a name: {entry!r}")
        unknown = set(entry) - VARIANT_KEYS
        if unknown:
            raise ValueError(f"variant {entry['name']!r}: unknown keys {sorted(unknown)}")
        override = entry.get("override", args.override)
        if isinstance(override, dict):
            override = json.dumps(override)
        variants.append(Variant(
            name=str(entry["name"]),
            arch=str(entry.get("arch", entry.get("archs", args.archs.split(",")[0]))),
            override=override, size=entry.get("size", args.size),
            slide_adapt=entry.get("slide_adapt", args.slide_adapt),
            bn_prior=float(entry.get("bn_prior", args.bn_prior)),
            ensemble=int(entry.get("ensemble", args.ensemble)),
            tta=int(entry.get("tta", args.tta or 1)),
            threshold_rule=str(entry.get("threshold_rule", args.threshold_rule))))
    check_variants(variants)
    return variants


def check_variants(variants: list[Variant]) -> None:
    """Refuse, before any training, what would fail after it."""
    from malaria.model.architectures import ARCHITECTURES

    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must differ: {names}")
    for v in variants:
        if v.arch not in ARCHITECTURES:
            raise ValueError(f"variant {v.name!r}: unknown architecture {v.arch!r}")
        if v.slide_adapt not in SLIDE_ADAPTATIONS:
            raise ValueError(f"variant {v.name!r}: slide_adapt must be one of "
                             f"{SLIDE_ADAPTATIONS}, got {v.slide_adapt!r}")
        if v.ensemble < 1:
            raise ValueError(f"variant {v.name!r}: ensemble must be >= 1")
        if v.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"variant {v.name!r}: threshold_rule must be one of "
                             f"{THRESHOLD_RULES}, got {v.threshold_rule!r}")
        json.loads(v.override or "{}")  # malformed JSON fails here, not after a fold


def _state_files(state: Path, fold: int, variant: Variant) -> tuple[Path, Path]:
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in variant.name)
    return state / f"fold{fold}-{stem}.json", state / f"fold{fold}-{stem}.npz"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return str(value)


def save_fold_state(state: Path, fold: int, variant: Variant, split: SlideSplit,
                    row: dict[str, Any], cells: Scored) -> None:
    """One variant's finished fold (``--cv-state``): a rerun of the same command takes it
    instead of training again, so a CV longer than one device session is done in pieces."""
    state.mkdir(parents=True, exist_ok=True)
    meta, arrays = _state_files(state, fold, variant)
    validation = ({} if cells.val_labels is None else
                  {"val_labels": cells.val_labels, "val_probabilities": cells.val_probabilities})
    np.savez(arrays, labels=cells.labels, probabilities=cells.probabilities,
             slides=cells.slides.astype(str), threshold=np.float64(cells.threshold),
             **validation)
    # Written last: a fold whose JSON exists is complete.
    meta.write_text(json.dumps({"variant": asdict(variant), "slides": split.as_dict(),
                                "row": row}, default=_jsonable))


def load_fold_state(state: Path, fold: int, variant: Variant,
                    split: SlideSplit) -> tuple[dict[str, Any], Scored] | None:
    """The saved fold of the same variant on the same slides, or None."""
    meta, arrays = _state_files(state, fold, variant)
    if not (meta.is_file() and arrays.is_file()):
        return None
    saved = json.loads(meta.read_text())
    if saved["variant"].get("tta") is None:  # kept before the views were recorded: the row's
        saved["variant"]["tta"] = int(saved["row"].get("tta") or 1)
    # Kept before the rule was recorded: every fold then was thresholded by Youden's J.
    saved["variant"].setdefault("threshold_rule", "youden")
    same = json.loads(json.dumps({"variant": asdict(variant), "slides": split.as_dict()}))
    if {k: saved.get(k) for k in same} != same:
        return None
    with np.load(arrays, allow_pickle=False) as data:
        # Folds kept before the validation scores were saved have none.
        val = ((data["val_labels"], data["val_probabilities"])
               if "val_labels" in data.files else (None, None))
        cells = Scored(data["labels"], data["probabilities"], data["slides"],
                       float(data["threshold"]), *val)
    return saved["row"], cells


def run_cv_variants(variants: list[Variant], records: list[CellRecord],
                    folds: dict[str, int], splits: list[SlideSplit],
                    args: argparse.Namespace, load: Loader,
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, list[Scored]]]:
    """Every variant over the same folds (its summary, and its scored cells per fold). In each fold each distinct recipe is trained once
    per ensemble member it needs (variants differing only in scoring share those models);
    each variant is then scored with its own adaptation, ensemble and TTA, and its folds are
    pooled as :func:`cv_summary` does."""
    recipe_ids = {recipe: i for i, recipe in enumerate(dict.fromkeys(v.recipe
                                                                     for v in variants))}
    fold_rows: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    scored: dict[str, list[Scored]] = {v.name: [] for v in variants}
    state: Path | None = getattr(args, "cv_state", None)
    for fold, split in enumerate(splits):
        started = time.perf_counter()
        todo = []
        for v in variants:
            kept = load_fold_state(state, fold, v, split) if state else None
            if kept is None:
                todo.append(v)
                continue
            fold_rows[v.name].append(kept[0])
            scored[v.name].append(kept[1])
            print(f"{v.name} fold {fold + 1}/{len(splits)}: taken from {state}", flush=True)
        members: dict[tuple[str, str, int | None], int] = {}
        for v in todo:
            members[v.recipe] = max(members.get(v.recipe, 0), v.ensemble)
        sets_at: dict[int, dict[str, ArraySet]] = {}
        runs: dict[tuple[str, str, int | None], list[TrainedRun]] = {}
        for recipe, count in members.items():
            arch, override, size = recipe
            runs[recipe] = []
            for member in range(count):
                # One work folder per fold, recipe and member: no checkpoint of another run
                # is ever picked up.
                run_args = argparse.Namespace(**{
                    **vars(args), "override": override, "size": size,
                    "seed": args.seed + member,
                    "workdir": Path(args.workdir) / f"cv{len(splits)}-fold{fold}"
                    / f"recipe{recipe_ids[recipe]}-member{member}"})
                at = retrain_config(arch, run_args).resolved_input_size()
                if at not in sets_at:
                    sets_at[at] = load_sets(records, split, run_args, at, load)
                runs[recipe].append(train_run(arch, records, split, run_args, load,
                                              sets=sets_at[at]))
        for v in todo:
            chosen = runs[v.recipe][:v.ensemble]
            views = v.tta if v.tta is not None else int(args.tta or 1)
            tta = views if views > 1 else False
            row, cells = score_runs(chosen, args, tta=tta,
                                    scoring=run_scoring(chosen, v.slide_adapt, v.bn_prior,
                                                        v.threshold_rule))
            row.update(fold=fold, slides=split.as_dict())
            fold_rows[v.name].append(row)
            scored[v.name].append(cells)
            if state:
                save_fold_state(state, fold, v, split, row, cells)
            print(f"{v.name} fold {fold + 1}/{len(splits)}: {len(split.test)} test slides "
                  f"({row['cells']} cells), {len(split.val)} val: acc {row['accuracy']:.4f} "
                  f"auc {row['auc']:.4f} sens {row['sensitivity']:.4f} "
                  f"spec {row['specificity']:.4f} parasitemia err "
                  f"{row['parasitemia_error_mean']:.2f}/{row['parasitemia_error_max']:.2f} pp "
                  f"thr {row['threshold']:.3f} epochs {row['epochs']} "
                  f"train {row['train_seconds']:.0f}s", flush=True)
        print(f"fold {fold + 1}/{len(splits)} done in {time.perf_counter() - started:.0f}s",
              flush=True)
    summaries = {v.name: {**cv_summary(fold_rows[v.name], scored[v.name], folds),
                          "variant": asdict(v)} for v in variants}
    return summaries, scored


def run_cv(arch: str, records: list[CellRecord], folds: dict[str, int],
           splits: list[SlideSplit], args: argparse.Namespace, load: Loader) -> dict[str, Any]:
    """Train ``arch`` once per fold (``--ensemble`` times) through :func:`train_run` (the
    same run as a single split) and pool the folds' test cells."""
    variant = Variant(arch, arch, args.override, args.size, args.slide_adapt, args.bn_prior,
                      args.ensemble, int(args.tta or 1), args.threshold_rule)
    return run_cv_variants([variant], records, folds, splits, args, load)[0][arch]


def pooled_cells(scored: list[Scored]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    labels = np.concatenate([s.labels for s in scored])
    probs = np.concatenate([s.probabilities for s in scored])
    slides = np.concatenate([s.slides for s in scored]).astype(str)
    calls = np.concatenate([s.probabilities >= s.threshold for s in scored])
    return labels, probs, slides, calls


def paired_difference(base: list[Scored], other: list[Scored], *, resamples: int = CV_RESAMPLES,
                      seed: int = CV_SEED, level: float = 0.95) -> dict[str, Any]:
    """``other`` minus ``base`` on the same cells (both pooled over the same folds, each
    cell at its own fold's threshold): accuracy, AUC and mean per-slide parasitemia error
    (percentage points), with a paired slide-bootstrap interval. Both variants score the
    same cells, so the paired interval is far narrower than the two separate ones."""
    y, p_base, slides, c_base = pooled_cells(base)
    y_other, p_other, slides_other, c_other = pooled_cells(other)
    if not (np.array_equal(y, y_other) and np.array_equal(slides, slides_other)):
        raise ValueError("the two variants did not score the same cells")
    unique, slide_of = np.unique(slides, return_inverse=True)
    n = unique.size
    cells = np.bincount(slide_of, minlength=n).astype(np.float64)
    gain = np.bincount(slide_of, weights=(c_other == y).astype(float) - (c_base == y),
                       minlength=n)
    positives = np.bincount(slide_of, weights=y, minlength=n)

    def error(calls: np.ndarray) -> np.ndarray:
        return 100 * np.abs(np.bincount(slide_of, weights=calls, minlength=n)
                            - positives) / cells

    times = slide_draw_counts(n, resamples, seed)
    observed, draws = slide_count_differences(cells, gain, error(c_other) - error(c_base),
                                              times)
    draws["auc"] = np.array([weighted_roc_auc(y, p_other, row[slide_of])
                             - weighted_roc_auc(y, p_base, row[slide_of]) for row in times])
    ones = np.ones(y.size)
    observed["auc"] = weighted_roc_auc(y, p_other, ones) - weighted_roc_auc(y, p_base, ones)
    return {"resamples": resamples, "seed": seed, "level": level, "slides": int(n),
            **percentile_intervals(observed, draws, level)}


def slide_count_differences(cells: np.ndarray, gain: np.ndarray, worse: np.ndarray,
                            times: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Paired differences that per-slide counts decide, observed and in each resample:
    accuracy (``gain``: cells one run gets right minus the other's, per slide) and mean
    parasitemia error (``worse``: the difference of the two errors per slide, pp).
    ``times[r, s]``: how often resample ``r`` draws slide ``s``."""
    observed = {"accuracy": float(gain.sum() / cells.sum()),
                "parasitemia_error_mean": float(worse.mean())}
    draws = {"accuracy": (times @ gain) / (times @ cells),
             "parasitemia_error_mean": (times @ worse) / cells.size}
    return observed, draws


def percentile_intervals(observed: dict[str, float], draws: dict[str, np.ndarray],
                         level: float) -> dict[str, dict[str, float | None]]:
    """Each figure's estimate with the percentile interval of its defined resamples."""
    tail = 100 * (1 - level) / 2
    out: dict[str, dict[str, float | None]] = {}
    for key, values in draws.items():
        defined = values[~np.isnan(values)]
        low, high = np.percentile(defined, [tail, 100 - tail]) if defined.size else (None,) * 2
        out[key] = {"estimate": observed[key], "low": None if low is None else float(low),
                    "high": None if high is None else float(high)}
    return out


def pooled_report(scored: list[Scored]) -> EvaluationReport:
    """The product's metrics over every fold's test cells, each at its own fold's
    threshold."""
    labels, probs, slides, _ = pooled_cells(scored)
    thresholds = np.concatenate([np.full(len(s.labels), s.threshold) for s in scored])
    return evaluate_pooled(labels, probs, thresholds, slides=list(slides))


def signed_ci(interval: dict[str, Any], digits: int) -> str:
    """``+0.0012 [-0.0003, +0.0027]``: a paired difference and its interval."""
    estimate, low, high = interval["estimate"], interval["low"], interval["high"]
    if low is None or high is None:
        return f"{estimate:+.{digits}f}"
    return f"{estimate:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def with_interval(value: float, interval: dict[str, Any], digits: int) -> str:
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def comparison_table(results: dict[str, dict[str, Any]],
                     differences: dict[str, dict[str, Any]]) -> str:
    """A markdown table of the variants: pooled figures with slide-bootstrap intervals, the
    paired difference to the first variant, and the per-fold spread."""
    lines = ["| variant | accuracy [95% CI] | d acc vs first [CI] | AUC [95% CI] | "
             "d AUC [CI] | sensitivity | specificity | parasitemia err mean [CI] / max, pp | "
             "d parasitemia mean [CI] | per-fold acc mean ± sd (min-max) | per-fold AUC "
             "mean ± sd | train s per fold |", "|" + "---|" * 12]
    for name, r in results.items():
        b, sp, d = r["bootstrap"], r["spread"], differences.get(name)
        delta = {key: (with_interval(d[key]["estimate"], d[key], 2 if "parasitemia" in key else 4)
                       if d else "-") for key in ("accuracy", "auc", "parasitemia_error_mean")}
        lines.append(
            f"| {name} | {with_interval(r['accuracy'], b['accuracy'], 4)} | {delta['accuracy']} | "
            f"{with_interval(r['auc'], b['auc'], 4)} | {delta['auc']} | {r['sensitivity']:.4f} | "
            f"{r['specificity']:.4f} | "
            f"{with_interval(r['parasitemia']['mean'], b['parasitemia_error_mean'], 2)} / "
            f"{r['parasitemia']['max']:.1f} | {delta['parasitemia_error_mean']} | "
            f"{sp['accuracy']['mean']:.4f} ± {sp['accuracy']['sd']:.4f} "
            f"({sp['accuracy']['min']:.4f}-{sp['accuracy']['max']:.4f}) | "
            f"{sp['auc']['mean']:.4f} ± {sp['auc']['sd']:.4f} | "
            f"{r['train_seconds']['mean']:.0f} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    found = gpus()
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "keras": keras.__version__, "backend": backend(),
                            "gpus": len(found), "cpu_flags": reported_cpu_flags()}
    # A cap on oneDNN's instruction set emulates an older CPU kind (ONEDNN_MAX_CPU_ISA=AVX2
    # on an AVX-512 machine); the flags above stay the hardware's, so record the cap too.
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        info["onednn_max_cpu_isa"] = os.environ["ONEDNN_MAX_CPU_ISA"]
    if backend() == "tensorflow":
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
    elif backend() == "jax":
        import jax

        info["jax"] = jax.__version__
        info["gpu_names"] = [d.device_kind for d in found]
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "MALARIA_CELLS", "../shared/data/nih-cells-128")))
    parser.add_argument("--minutes", type=float, default=defaults.TRAIN_MAX_MINUTES,
                        help="training budget per architecture (default: the product's)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--archs", default=f"{defaults.DEFAULT_ARCH},seed-augmented")
    parser.add_argument("--size", type=int, help="input size for every architecture")
    parser.add_argument("--override", help="JSON of RetrainConfig or TrainConfig fields, "
                        "for experiments (the product's defaults otherwise)")
    parser.add_argument("--seed", type=int, default=defaults.TRAIN_SEED, help="training seed")
    parser.add_argument("--tta", type=int, default=views_of(defaults.TEST_TIME_AUGMENTATION),
                        help="test-time views (1 = none; default: the product's setting)")
    parser.add_argument("--threshold-rule", choices=THRESHOLD_RULES,
                        default=defaults.THRESHOLD_RULE,
                        help="how the decision threshold is set (default: the product's)")
    parser.add_argument("--eval", choices=("test", "val"), default="test")
    parser.add_argument("--train-slides", type=float, default=1.0,
                        help="train on this seeded fraction of the training slides")
    parser.add_argument("--fit-on", choices=("train", "train+val"), default="train",
                        help="train+val: fit on the validation slides too (their metrics are "
                        "then not held out) with the threshold of --threshold-from")
    parser.add_argument("--threshold-from", type=Path,
                        help="a train-only run's JSON whose threshold --fit-on train+val uses")
    parser.add_argument("--exclude-keys", type=Path,
                        help="a CSV whose key column lists cells to leave out of training "
                        "(suspected label errors); evaluation still scores every cell")
    parser.add_argument("--track-test", action="store_true",
                        help="test metrics after every epoch: time to reach the targets")
    parser.add_argument("--cv", type=int, metavar="K",
                        help="slide-grouped K-fold cross-validation over all slides instead "
                        "of the fixed split (--minutes is then per fold)")
    parser.add_argument("--slide-adapt", choices=SLIDE_ADAPTATIONS, default="none",
                        help="score each slide after adapting to its own cells: colour "
                        "statistics to the training cells', BN statistics (AdaBN), or both")
    parser.add_argument("--bn-prior", type=float, default=0.0,
                        help="AdaBN: the trained BN statistics count as this many cells")
    parser.add_argument("--ensemble", type=int, default=1, metavar="N",
                        help="train N models (seeds seed..seed+N-1) and average them")
    parser.add_argument("--cv-variants", metavar="JSON",
                        help="with --cv: a JSON list (or a file holding it, or a preset: "
                        + ", ".join(VARIANT_PRESETS) + ") of variants "
                        "{name, arch, override, size, slide_adapt, bn_prior, ensemble, tta}, "
                        "all run over the same folds and compared in one table")
    parser.add_argument("--cv-state", type=Path, metavar="DIR",
                        help="with --cv: keep each finished fold here and take it from here "
                        "when the same command runs again (a CV in pieces)")
    parser.add_argument("--pack", type=Path, help="train from a pack instead of --data")
    parser.add_argument("--write-pack", type=Path,
                        help="write the decoded cells at --size (default 80) here and stop")
    parser.add_argument("--cache", type=Path, default=Path(".malaria/cache/images"))
    parser.add_argument("--workdir", type=Path, default=Path(".malaria/bench-accuracy"))
    args = parser.parse_args(argv)
    args.tta = args.tta if args.tta > 1 else False

    if args.fit_on == "train+val" and args.eval == "val":
        parser.error("--fit-on train+val trains on the validation slides: evaluate on test")
    if args.fit_on == "train+val" and not args.threshold_from:
        parser.error("--fit-on train+val needs --threshold-from")
    if args.track_test and args.eval == "val":
        parser.error("--track-test reads the test slides; it does not go with --eval val")
    if args.cv is not None and (args.eval == "val" or args.fit_on == "train+val"):
        parser.error("--cv tests every slide once and picks each fold's threshold on its own "
                     "validation slides: it goes with neither --eval val nor --fit-on")
    if args.cv_variants and args.cv is None:
        parser.error("--cv-variants compares variants over the folds of --cv K")
    if args.ensemble < 1:
        parser.error("--ensemble must be >= 1")
    if args.cv_variants:
        try:
            args.variants = parse_variants(args.cv_variants, args)
        except (ValueError, OSError) as error:  # json.JSONDecodeError is a ValueError
            parser.error(f"--cv-variants: {error}")
    if args.pack:
        records, load = read_pack(args.pack)
    elif args.data.is_dir():
        records, load = records_from_folder(args.data), folder_loader(args.data, args.cache)
    else:
        parser.error(f"no data folder at {args.data}")
    if args.write_pack:
        write_pack(args.write_pack, records, load, args.size or 80)
        print(f"wrote {len(records)} cells to {args.write_pack}")
        return 0
    if args.cv is not None:
        return main_cv(args, records, load)
    split = benchmark_split(records)
    print(f"{len(records)} cells; slides train/val/test = {len(split.train)}/"
          f"{len(split.val)}/{len(split.test)}", flush=True)

    results: dict[str, Any] = {}
    for arch in args.archs.split(","):
        started = time.perf_counter()
        results[arch] = run_arch(arch, records, split, args, load)
        r = results[arch]
        print(f"{arch}: acc {r['accuracy']:.4f} auc {r['auc']:.4f} sens {r['sensitivity']:.4f} "
              f"spec {r['specificity']:.4f} thr {r['threshold']:.3f} epochs {r['epochs']} "
              f"train {r['train_seconds']:.0f}s ({time.perf_counter() - started:.0f}s in all) "
              f"{r['images_per_s']:.0f} img/s params {r['params']} bytes {r['model_bytes']}",
              flush=True)
    # One entry per architecture at the top level (the keys issue 3 names), plus "meta".
    report: dict[str, Any] = dict(results)
    report["meta"] = {
        "data": str(args.pack or args.data), "cells": len(records), "split_seed": SPLIT_SEED,
        "slides": split.as_dict(), "minutes": args.minutes, "evaluated_on": args.eval,
        "machine": machine(),
        "precision_policy": {arch: r["precision_policy"] for arch, r in results.items()},
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


def main_cv(args: argparse.Namespace, records: list[CellRecord], load: Loader) -> int:
    try:
        folds, splits = cv_splits(records, args.cv)
    except ValueError as error:
        raise SystemExit(f"--cv {args.cv}: {error}") from None
    print(f"{len(records)} cells, {len(folds)} slides in {args.cv} folds; slides "
          f"train/val/test per fold = "
          + ", ".join(f"{len(s.train)}/{len(s.val)}/{len(s.test)}" for s in splits), flush=True)
    variants: list[Variant] = getattr(args, "variants", None) or [
        Variant(arch, arch, args.override, args.size, args.slide_adapt, args.bn_prior,
                args.ensemble, int(args.tta or 1), args.threshold_rule)
        for arch in args.archs.split(",")]
    check_variants(variants)
    results, scored = run_cv_variants(variants, records, folds, splits, args, load)
    for name, r in results.items():
        b = r["bootstrap"]
        print(f"{name} pooled over {args.cv} folds: acc {r['accuracy']:.4f} "
              f"[{b['accuracy']['low']:.4f}, {b['accuracy']['high']:.4f}] auc {r['auc']:.4f} "
              f"[{b['auc']['low']:.4f}, {b['auc']['high']:.4f}] sens {r['sensitivity']:.4f} "
              f"spec {r['specificity']:.4f} parasitemia err mean {r['parasitemia']['mean']:.2f} "
              f"max {r['parasitemia']['max']:.2f} pp; train "
              f"{r['train_seconds']['mean']:.0f}s per fold", flush=True)
    report: dict[str, Any] = dict(results)
    table = None
    if args.cv_variants:
        first = variants[0].name
        differences = {v.name: paired_difference(scored[first], scored[v.name])
                       for v in variants[1:]}
        for name, difference in differences.items():
            results[name]["versus_first"] = {"variant": first, **difference}
        table = comparison_table(results, differences)
        print("\n" + table, flush=True)
    report["meta"] = {
        "data": str(args.pack or args.data), "cells": len(records), "evaluated_on": "cv",
        "cv": args.cv, "fold_seed": CV_SEED, "minutes": args.minutes,
        "minutes_per": "fold (each model of an ensemble)", "folds": folds,
        "fold_slides": [s.as_dict() for s in splits], "machine": machine(),
        "precision_policy": {name: r["precision_policy"] for name, r in results.items()},
        "variants": [asdict(v) for v in variants],
    }
    if table is not None:
        report["meta"]["comparison_markdown"] = table
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
        if table is not None:
            args.json.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
