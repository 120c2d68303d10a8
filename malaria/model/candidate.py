"""The steps of a retraining run, as plain functions: prepare data -> train -> evaluate.
The train flow wires them as Prefect tasks (with registering and the promotion gate,
:mod:`malaria.model.promotion`); ``malaria train`` runs the same functions on a folder
(:mod:`malaria.model.local`); ``benchmarks.accuracy`` trains through :func:`train_candidate`.

Honesty rules kept here: splits are by slide; the decision threshold is chosen on the
validation slides and applied unchanged to the test slides.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from malaria.core import defaults
from malaria.core.labels import CLASS_OF_LABEL
from malaria.dataset.cache import ImageCache
from malaria.dataset.pipeline import ArraySet, load_arrays
from malaria.dataset.records import CellRecord
from malaria.dataset.split import SlideSplit, split_by_slide
from malaria.evaluation.drift import reference_distribution
from malaria.evaluation.metrics import EvaluationReport, evaluate, worst_misclassified
from malaria.evaluation.plots import (
    plot_confusion_matrix,
    plot_learning_curves,
    plot_roc,
    plot_worst_misclassified,
)
from malaria.evaluation.threshold import ThresholdRule, choose_threshold
from malaria.model.config import RetrainConfig
from malaria.model.predict import predict_probabilities
from malaria.model.trainer import TrainResult, train
from malaria.registry.provenance import hash_manifest

Reader = Callable[[str], bytes]
REVIEW_LIMIT = 16  # as many cells as the worst-mistakes montage shows


@dataclass
class PreparedData:
    split: SlideSplit
    train: ArraySet
    val: ArraySet
    test: ArraySet
    test_records: list[CellRecord]
    manifest_sha256: str
    input_size: int

    def describe(self) -> str:
        return (f"{len(self.train)} train / {len(self.val)} validation / {len(self.test)} test "
                f"cells from {len(self.split.train)} / {len(self.split.val)} / "
                f"{len(self.split.test)} slides at {self.input_size} px")


def data_manifest_hash(records: Sequence[CellRecord]) -> str:
    return hash_manifest((r.key, r.content_id, str(r.label), r.slide) for r in records)


def prepare_data(records: Sequence[CellRecord], read_bytes: Reader, cache: ImageCache,
                 input_size: int, *, seed: int, val_fraction: float, test_fraction: float,
                 workers: int = 8) -> PreparedData:
    if not records:
        raise ValueError("no labelled cells found: ingest some data first")
    if len({r.label for r in records}) < 2:
        raise ValueError("training needs cells of both classes")
    split = split_by_slide(records, seed=seed, val_fraction=val_fraction,
                           test_fraction=test_fraction)
    try:
        return data_for_split(records, split, read_bytes, cache, input_size, workers=workers)
    except EmptySplit as error:
        raise ValueError(f"the {error.part} split is empty: need at least 3 slides") from None


class EmptySplit(ValueError):
    """A part of a slide split has no cells."""

    def __init__(self, part: str) -> None:
        super().__init__(f"the {part} split is empty")
        self.part = part


def data_for_split(records: Sequence[CellRecord], split: SlideSplit, read_bytes: Reader,
                   cache: ImageCache, input_size: int, *, workers: int = 8) -> PreparedData:
    """The arrays of each part of ``split`` (a fresh one, or one a model recorded)."""
    parts = {part: split.of(records, part) for part in ("train", "val", "test")}
    for part, chosen in parts.items():
        if not chosen:
            raise EmptySplit(part)
    arrays = {part: load_arrays(chosen, cache, input_size, read_bytes, workers=workers)
              for part, chosen in parts.items()}
    return PreparedData(split=split, train=arrays["train"], val=arrays["val"],
                        test=arrays["test"], test_records=parts["test"],
                        manifest_sha256=data_manifest_hash(records), input_size=input_size)


def train_candidate(config: RetrainConfig, train_set: ArraySet, val_set: ArraySet, *,
                    checkpoint_dir: Path,
                    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
                    resume: bool = True,
                    callbacks: Sequence[keras.callbacks.Callback] = ()) -> TrainResult:
    """The one way the product trains a model: ``malaria train``, the train flow and
    ``benchmarks.accuracy`` all come here, so they train the same recipe (the defaults of
    :class:`RetrainConfig`) with the same precision choice. ``result.summary()`` is the
    training record each of them keeps."""
    return train(config.train_config(), train_set, val_set, checkpoint_dir=checkpoint_dir,
                 on_epoch=on_epoch, resume=resume, callbacks=callbacks)


@dataclass
class CandidateEvaluation:
    threshold: float
    validation: EvaluationReport
    test: EvaluationReport
    test_probabilities: np.ndarray
    plots: dict[str, bytes]
    validation_distribution: dict[str, Any] = field(default_factory=dict)
    label_review: list[dict[str, Any]] = field(default_factory=list)


def evaluate_candidate(model: Any, data: PreparedData, history: list[dict[str, Any]], *,
                       threshold_rule: ThresholdRule = defaults.THRESHOLD_RULE,
                       tta: bool | int = defaults.TEST_TIME_AUGMENTATION
                       ) -> CandidateEvaluation:
    val_prob = predict_probabilities(model, data.val.images, tta=tta)
    threshold = choose_threshold(data.val.labels, val_prob, rule=threshold_rule)
    validation = evaluate(data.val.labels, val_prob, threshold, slides=list(data.val.slides))
    test_prob = predict_probabilities(model, data.test.images, tta=tta)
    test = evaluate(data.test.labels, test_prob, threshold, slides=list(data.test.slides))
    names = [r.key.rsplit("/", 2)[-2] + "/" + r.key.rsplit("/", 1)[-1]
             for r in data.test_records]
    plots = {
        "learning_curves": plot_learning_curves(history) if history else b"",
        "roc": plot_roc(data.test.labels, test_prob, threshold=threshold),
        "confusion_matrix": plot_confusion_matrix(test),
        "worst_misclassified": plot_worst_misclassified(
            data.test.images, data.test.labels, test_prob, threshold, names=names),
    }
    return CandidateEvaluation(threshold, validation, test, test_prob,
                               {k: v for k, v in plots.items() if v},
                               reference_distribution(val_prob, threshold),
                               cells_to_review(data.test_records, data.test.labels, test_prob,
                                               threshold))


def cells_to_review(records: Sequence[CellRecord], labels: np.ndarray, probabilities: np.ndarray,
                    threshold: float, *, limit: int = REVIEW_LIMIT) -> list[dict[str, Any]]:
    """The held-out cells the model contradicts most confidently, worst first: the same
    cells as the worst-mistakes montage, by key, for a person to check the label. On the
    real data most of these turned out to be doubtful labels rather than model errors
    (benchmarks/README.md, "Label noise on the test slides"), and a few of them cost the
    test AUC more than all the other mistakes together."""
    chosen = worst_misclassified(labels, probabilities, threshold, limit=limit)
    return [{"key": records[i].key, "slide": records[i].slide,
             "label": CLASS_OF_LABEL[int(labels[i])],
             "probability": round(float(probabilities[i]), 4)} for i in chosen]


def metrics_document(config: RetrainConfig, data: PreparedData, evaluation: CandidateEvaluation,
                     training: dict[str, Any]) -> dict[str, Any]:
    return {
        "metrics": evaluation.test.to_dict(),
        "validation_metrics": evaluation.validation.to_dict(),
        "threshold": evaluation.threshold,
        "threshold_rule": config.threshold_rule,
        # The reference for drift notes when this model scores new slides.
        "validation_distribution": evaluation.validation_distribution,
        "label_review": evaluation.label_review,
        "tta": config.tta,
        "architecture": config.arch,
        "input_size": data.input_size,
        "slides": data.split.as_dict(),
        "cells": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "data_manifest_sha256": data.manifest_sha256,
        "training": training,
        "config": asdict(config),
    }


def repeats_champion(champion: Mapping[str, Any] | None, champion_version: str | None,
                     manifest_sha256: str, config: RetrainConfig) -> str | None:
    """Why training now would only repeat the champion's training (the same dataset
    manifest and the same settings: nothing new to learn from), or None. Registering the
    repeat would churn the registry and make every slide due again for nothing."""
    if not champion:
        return None
    if champion.get("data_manifest_sha256") != manifest_sha256:
        return None
    # Through JSON, as the record stores it (tuples become lists, and so on).
    ours = json.loads(json.dumps(asdict(config), sort_keys=True, default=str))
    theirs = champion.get("config")
    if not isinstance(theirs, dict) or ours != json.loads(
            json.dumps(theirs, sort_keys=True, default=str)):
        return None
    return (f"training skipped: the dataset (manifest {manifest_sha256[:12]}) and the "
            f"settings equal those the champion {champion_version or ''} was trained on")


def metrics_table(report: EvaluationReport) -> str:
    """A markdown table of the headline test metrics."""
    rows = [("accuracy", report.accuracy), ("ROC AUC", report.roc_auc),
            ("sensitivity (parasitized recall)", report.sensitivity),
            ("specificity", report.specificity), ("precision", report.precision),
            ("F1", report.f1), ("MCC", report.mcc), ("expected calibration error", report.ece),
            ("per-slide accuracy, min", report.slide_accuracy_min),
            ("per-slide accuracy, median", report.slide_accuracy_median)]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in rows]
    # Percentage points, so two decimals: what a lab reads per slide.
    lines += [f"| per-slide parasitemia error, {name} (percentage points) | {value:.2f} |"
              for name, value in (("mean", report.parasitemia_error_mean),
                                  ("max", report.parasitemia_error_max))]
    c = report.confusion
    lines += ["", "| | predicted Uninfected | predicted Parasitized |", "|---|---|---|",
              f"| true Uninfected | {c.tn} | {c.fp} |", f"| true Parasitized | {c.fn} | {c.tp} |"]
    return "\n".join(lines)


def review_table(cells: Sequence[dict[str, Any]]) -> str:
    """A markdown table of ``cells_to_review``: what a person should look at first."""
    if not cells:
        return "No misclassified cells on the test slides."
    lines = ["| cell | slide | labelled | P(parasitized) |", "|---|---|---|---|"]
    lines += [f"| `{c['key']}` | {c['slide']} | {c['label']} | {c['probability']:.3f} |"
              for c in cells]
    return "\n".join(lines)
