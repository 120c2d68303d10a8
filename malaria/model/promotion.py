"""Registering a candidate's rival: the champion re-scored on the candidate's test slides,
and the promotion gate between them (the train flow's last steps)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from malaria.dataset.cache import ImageCache
from malaria.dataset.pipeline import load_arrays
from malaria.dataset.records import CellRecord
from malaria.evaluation.metrics import EvaluationReport, evaluate
from malaria.model.config import RetrainConfig
from malaria.model.predict import predict_probabilities
from malaria.model.serving import load_model_file, registered_model_file
from malaria.registry.gate import GateDecision, decide_promotion
from malaria.registry.registry import ModelRegistry

Reader = Callable[[str], bytes]
MODEL_FILE = "model.keras"  # a model's file in the registry and in the download cache


def score_registered(registry: ModelRegistry, version: str, records: Sequence[CellRecord],
                     read_bytes: Reader, cache: ImageCache, *, tta: bool) -> EvaluationReport:
    """Score a registered model on ``records`` with its own input size and threshold."""
    record = registry.get(version)
    size = int(record["input_size"])
    arrays = load_arrays(records, cache, size, read_bytes)
    model = load_model_file(registered_model_file(registry, version))
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
