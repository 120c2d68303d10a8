"""The steps of a retraining run, as plain functions: prepare data -> train -> evaluate ->
register -> gate. The train flow wires them as Prefect tasks; the local ``malaria train``
command runs the same functions on a folder.

Honesty rules kept here: splits are by slide; the decision threshold is chosen on the
validation slides and applied unchanged to the test slides; the champion is re-scored on the
same test slides as the candidate before the gate compares them.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from malaria import layout
from malaria.data import (
    ArraySet,
    CellRecord,
    ImageCache,
    SlideSplit,
    load_arrays,
    split_by_slide,
)
from malaria.evaluation import (
    EvaluationReport,
    ThresholdRule,
    choose_threshold,
    evaluate,
    plot_confusion_matrix,
    plot_learning_curves,
    plot_roc,
    plot_worst_misclassified,
)
from malaria.registry import GateDecision, ModelRegistry, decide_promotion, hash_manifest
from malaria.storage import Store

Reader = Callable[[str], bytes]
MODEL_FILE = "model.keras"


@dataclass
class RetrainConfig:
    arch: str = "cellnet"
    input_size: int | None = None
    epochs: int = 30
    max_minutes: float | None = None
    batch_size: int = 64
    learning_rate: float = 3e-3
    label_smoothing: float = 0.0
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    threshold_rule: ThresholdRule = "youden"
    tta: bool = True
    # Gate: not worse than the champion minus the tolerance, and above absolute floors.
    tolerance: float = 0.005
    min_auc: float = 0.90
    min_accuracy: float = 0.85
    extra_train_options: dict[str, Any] = field(default_factory=dict)

    def train_config(self) -> Any:
        from malaria.training import TrainConfig

        return TrainConfig(arch=self.arch, input_size=self.input_size, epochs=self.epochs,
                           max_minutes=self.max_minutes, batch_size=self.batch_size,
                           learning_rate=self.learning_rate, seed=self.seed,
                           label_smoothing=self.label_smoothing, **self.extra_train_options)


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
    parts = {part: split.of(records, part) for part in ("train", "val", "test")}
    for part, chosen in parts.items():
        if not chosen:
            raise ValueError(f"the {part} split is empty: need at least 3 slides")
    arrays = {part: load_arrays(chosen, cache, input_size, read_bytes, workers=workers)
              for part, chosen in parts.items()}
    return PreparedData(split=split, train=arrays["train"], val=arrays["val"],
                        test=arrays["test"], test_records=parts["test"],
                        manifest_sha256=data_manifest_hash(records), input_size=input_size)


def checkpoint_prefix(config: RetrainConfig, manifest_sha256: str) -> str:
    """Checkpoints of the same data and settings share a prefix, so a killed run resumes."""
    identity = json.dumps({"config": asdict(config), "data": manifest_sha256}, sort_keys=True)
    return f"{layout.CHECKPOINTS}{hashlib.sha256(identity.encode()).hexdigest()[:16]}/"


def upload_folder(store: Store, folder: Path, prefix: str) -> int:
    count = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith(".tmp"):
            store.put_file(prefix + path.relative_to(folder).as_posix(), path)
            count += 1
    return count


def download_folder(store: Store, prefix: str, folder: Path) -> int:
    count = 0
    for info in store.list(prefix):
        target = folder / info.key[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(info.key, target)
        count += 1
    return count


@dataclass
class CandidateEvaluation:
    threshold: float
    validation: EvaluationReport
    test: EvaluationReport
    test_probabilities: np.ndarray
    plots: dict[str, bytes]


def evaluate_candidate(model: Any, data: PreparedData, history: list[dict[str, Any]], *,
                       threshold_rule: ThresholdRule = "youden",
                       tta: bool = True) -> CandidateEvaluation:
    from malaria.training import predict_probabilities

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
                               {k: v for k, v in plots.items() if v})


def metrics_document(config: RetrainConfig, data: PreparedData, evaluation: CandidateEvaluation,
                     training: dict[str, Any]) -> dict[str, Any]:
    return {
        "metrics": evaluation.test.to_dict(),
        "validation_metrics": evaluation.validation.to_dict(),
        "threshold": evaluation.threshold,
        "threshold_rule": config.threshold_rule,
        "tta": config.tta,
        "architecture": config.arch,
        "input_size": data.input_size,
        "slides": data.split.as_dict(),
        "cells": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "data_manifest_sha256": data.manifest_sha256,
        "training": training,
        "config": asdict(config),
    }


def score_registered(registry: ModelRegistry, version: str, records: Sequence[CellRecord],
                     read_bytes: Reader, cache: ImageCache, *, tta: bool) -> EvaluationReport:
    """Score a registered model on ``records`` with its own input size and threshold."""
    import keras

    from malaria.training import predict_probabilities

    record = registry.get(version)
    size = int(record["input_size"])
    arrays = load_arrays(records, cache, size, read_bytes)
    with tempfile.TemporaryDirectory() as folder:
        path = registry.download_model(version, Path(folder) / MODEL_FILE)
        model = keras.models.load_model(path, compile=False)
    prob = predict_probabilities(model, arrays.images, tta=tta)
    return evaluate(arrays.labels, prob, float(record["threshold"]),
                    slides=list(arrays.slides))


def gate(registry: ModelRegistry, version: str, candidate: EvaluationReport,
         test_records: Sequence[CellRecord], read_bytes: Reader, cache: ImageCache,
         config: RetrainConfig) -> GateDecision:
    """Re-score the champion on the candidate's test slides, decide, and promote if earned."""
    champion_version = registry.champion_version()
    champion_metrics = None
    if champion_version and champion_version != version:
        champion_metrics = score_registered(registry, champion_version, test_records,
                                            read_bytes, cache, tta=config.tta).to_dict()
        champion_metrics["version"] = champion_version
    decision = decide_promotion(candidate.to_dict(), champion_metrics,
                                tolerance=config.tolerance, min_auc=config.min_auc,
                                min_accuracy=config.min_accuracy)
    registry.record_decision(version, decision)
    if decision.promote:
        registry.promote(version, reason=decision.reason, decision=decision)
    return decision


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
    c = report.confusion
    lines += ["", "| | predicted Uninfected | predicted Parasitized |", "|---|---|---|",
              f"| true Uninfected | {c.tn} | {c.fp} |", f"| true Parasitized | {c.fn} | {c.tp} |"]
    return "\n".join(lines)
