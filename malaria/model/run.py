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

from malaria.core import layout
from malaria.core.labels import PARASITIZED, UNINFECTED
from malaria.dataset.records import (
    ArraySet,
    CellRecord,
    ImageCache,
    SlideSplit,
    load_arrays,
    split_by_slide,
)
from malaria.evaluation.drift import reference_distribution
from malaria.evaluation.metrics import (
    EvaluationReport,
    ThresholdRule,
    choose_threshold,
    evaluate,
    plot_confusion_matrix,
    plot_learning_curves,
    plot_roc,
    plot_worst_misclassified,
    worst_misclassified,
)
from malaria.io.store import Store
from malaria.registry.registry import GateDecision, ModelRegistry, decide_promotion, hash_manifest

Reader = Callable[[str], bytes]
MODEL_FILE = "model.keras"
REVIEW_LIMIT = 16  # as many cells as the worst-mistakes montage shows


@dataclass
class RetrainConfig:
    arch: str = "cellnet"
    input_size: int | None = None
    epochs: int = 30
    max_minutes: float | None = None
    # Tuned on the developers' validation slides (benchmarks/README.md, accuracy section).
    batch_size: int = 128
    learning_rate: float = 4e-3
    label_smoothing: float = 0.1
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
        from malaria.model.trainer import TrainConfig

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
    validation_distribution: dict[str, Any] = field(default_factory=dict)
    label_review: list[dict[str, Any]] = field(default_factory=list)


def evaluate_candidate(model: Any, data: PreparedData, history: list[dict[str, Any]], *,
                       threshold_rule: ThresholdRule = "youden",
                       tta: bool = True) -> CandidateEvaluation:
    from malaria.model.trainer import predict_probabilities

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
             "label": PARASITIZED if labels[i] == 1 else UNINFECTED,
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


def score_registered(registry: ModelRegistry, version: str, records: Sequence[CellRecord],
                     read_bytes: Reader, cache: ImageCache, *, tta: bool) -> EvaluationReport:
    """Score a registered model on ``records`` with its own input size and threshold."""
    import keras

    from malaria.model.trainer import predict_probabilities

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


def review_table(cells: Sequence[dict[str, Any]]) -> str:
    """A markdown table of ``cells_to_review``: what a person should look at first."""
    if not cells:
        return "No misclassified cells on the test slides."
    lines = ["| cell | slide | labelled | P(parasitized) |", "|---|---|---|---|"]
    lines += [f"| `{c['key']}` | {c['slide']} | {c['label']} | {c['probability']:.3f} |"
              for c in cells]
    return "\n".join(lines)


# ------------------------------------------------------------- local commands, no bucket


def model_card_path(model_path: Path) -> Path:
    """The JSON beside a model file: threshold, architecture, input size, metrics."""
    return model_path.with_name(model_path.name + ".json")


def train_local(data_dir: Path, out: Path, config: RetrainConfig, *, cache_dir: Path,
                on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
                ) -> dict[str, Any]:
    """``malaria train``: a folder with class subfolders in, a model file and its card out."""
    from malaria.dataset.records import folder_reader, records_from_folder
    from malaria.model.architectures import default_input_size
    from malaria.model.trainer import save_for_serving, train

    records = records_from_folder(data_dir)
    size = config.input_size or default_input_size(config.arch)
    data = prepare_data(records, folder_reader(data_dir), ImageCache(cache_dir), size,
                        seed=config.seed, val_fraction=config.val_fraction,
                        test_fraction=config.test_fraction)
    checkpoints = out.with_name(f".{out.name}.checkpoints") / checkpoint_prefix(
        config, data.manifest_sha256).rstrip("/").rsplit("/", 1)[-1]
    result = train(config.train_config(), data.train, data.val, checkpoint_dir=checkpoints,
                   on_epoch=on_epoch)
    evaluation = evaluate_candidate(result.model, data, result.history,
                                    threshold_rule=config.threshold_rule, tta=config.tta)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_bytes = save_for_serving(result.model, out)
    card = metrics_document(config, data, evaluation, {
        "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 1), "images_per_s": round(result.images_per_s, 1),
        "stopped": result.stopped})
    card["model_bytes"] = model_bytes
    model_card_path(out).write_text(json.dumps(card, indent=2, default=str))
    for name, png in evaluation.plots.items():
        out.with_name(f"{out.stem}.{name}.png").write_bytes(png)
    return card


def load_model_card(model_path: Path) -> dict[str, Any]:
    path = model_card_path(model_path)
    return json.loads(path.read_text()) if path.exists() else {}


def load_serving_model(model_path: Path) -> tuple[Any, int, float]:
    """(model, input size, threshold); the threshold comes from the model's card, 0.5 without."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    size = int(model.inputs[0].shape[1])
    threshold = float(load_model_card(model_path).get("threshold", 0.5))
    return model, size, threshold


def evaluate_local(model_path: Path, data_dir: Path, *, cache_dir: Path,
                   tta: bool = False) -> EvaluationReport:
    """``malaria evaluate``: every cell of a class-folder tree, slide from the file name."""
    from malaria.dataset.records import folder_reader, records_from_folder
    from malaria.model.trainer import predict_probabilities

    model, size, threshold = load_serving_model(model_path)
    records = records_from_folder(data_dir)
    if not records:
        raise ValueError(f"no labelled images under {data_dir} (expected class subfolders)")
    arrays = load_arrays(records, ImageCache(cache_dir), size, folder_reader(data_dir))
    prob = predict_probabilities(model, arrays.images, tta=tta)
    return evaluate(arrays.labels, prob, threshold, slides=list(arrays.slides))


@dataclass(frozen=True)
class Prediction:
    path: str
    probability: float | None
    label: str
    error: str = ""


def predict_files(model_path: Path, paths: Sequence[Path]) -> list[Prediction]:
    """``malaria predict``: one line per image, like the source article's last step; an
    unreadable file gets an error instead of a probability."""
    from malaria.core.images import validate_image
    from malaria.core.labels import PARASITIZED, UNINFECTED
    from malaria.dataset.records import decode_to_array
    from malaria.model.trainer import predict_probabilities

    model, size, threshold = load_serving_model(model_path)
    results: list[Prediction | None] = []
    arrays: list[np.ndarray] = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            results.append(Prediction(str(path), None, "", f"unreadable: {error.strerror}"))
            continue
        checked = validate_image(data)
        if not checked.accepted:
            results.append(Prediction(str(path), None, "", f"{checked.reason}: {checked.detail}"))
            continue
        arrays.append(decode_to_array(data, size))
        results.append(None)
    probs = iter(predict_probabilities(model, np.stack(arrays)) if arrays else [])
    out: list[Prediction] = []
    for path, result in zip(paths, results, strict=True):
        if result is None:
            p = float(next(probs))
            result = Prediction(str(path), p, PARASITIZED if p >= threshold else UNINFECTED)
        out.append(result)
    return out
