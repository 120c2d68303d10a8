"""Registering a candidate's rival: the champion re-scored on the candidate's test slides,
and the promotion gate between them (the train flow's last steps).

The gate is two steps, so that a person can stand between them (``require_approval``):
:func:`decide` (score, compare, no side effect) and :func:`settle` (record the decision
in ``gate.json`` and promote if it says so). :func:`gate` is both at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from malaria.core import defaults
from malaria.dataset.cache import ImageCache
from malaria.dataset.pipeline import load_arrays
from malaria.dataset.records import CellRecord
from malaria.evaluation.metrics import EvaluationReport, evaluate
from malaria.evaluation.paired import paired_slide_bootstrap
from malaria.model.config import RetrainConfig
from malaria.model.predict import predict_probabilities
from malaria.model.serving import load_model_file, registered_model_file
from malaria.registry.gate import (
    GateDecision,
    best_so_far,
    decide_promotion,
    serving_promotions,
)
from malaria.registry.registry import ModelRegistry, UnknownVersion

Reader = Callable[[str], bytes]
MODEL_FILE = "model.keras"  # a model's file in the registry and in the download cache


def predict_registered(registry: ModelRegistry, version: str, records: Sequence[CellRecord],
                       read_bytes: Reader, cache: ImageCache, *,
                       tta: bool | int) -> tuple[EvaluationReport, npt.NDArray[np.float64]]:
    """A registered model's report on ``records`` (its own input size and threshold) and
    its probability per cell, in the order of ``records``."""
    record = registry.get(version)
    size = int(record["input_size"])
    arrays = load_arrays(records, cache, size, read_bytes)
    model = load_model_file(registered_model_file(registry, version))
    prob = np.asarray(predict_probabilities(model, arrays.images, tta=tta), dtype=np.float64)
    report = evaluate(arrays.labels, prob, float(record["threshold"]),
                      slides=list(arrays.slides))
    return report, prob.reshape(-1)


def score_registered(registry: ModelRegistry, version: str, records: Sequence[CellRecord],
                     read_bytes: Reader, cache: ImageCache, *, tta: bool | int) -> EvaluationReport:
    """Score a registered model on ``records`` with its own input size and threshold."""
    return predict_registered(registry, version, records, read_bytes, cache, tta=tta)[0]


def best_promoted(registry: ModelRegistry) -> dict[str, Any] | None:
    """The best AUC and accuracy any promotion still standing reached on its gate
    (:func:`malaria.registry.gate.best_so_far`); a promotion made without a gate counts
    with its registration-time test metrics."""
    history = (registry.champion() or {}).get("history", [])
    promotions: list[tuple[str, dict[str, Any] | None]] = []
    for version, figures in serving_promotions(history):
        if figures is None:
            try:
                metrics = registry.get(version).get("metrics")
            except UnknownVersion:  # deleted since: it cannot set a bar it cannot show
                metrics = None
            figures = metrics if isinstance(metrics, dict) else None
        promotions.append((version, figures))
    return best_so_far(promotions)


def decide(registry: ModelRegistry, version: str, candidate: EvaluationReport,
           test_records: Sequence[CellRecord], read_bytes: Reader, cache: ImageCache,
           config: RetrainConfig, *,
           candidate_probabilities: npt.ArrayLike | None = None,
           resamples: int = defaults.GATE_BOOTSTRAP_RESAMPLES,
           seed: int = defaults.GATE_BOOTSTRAP_SEED,
           level: float = defaults.GATE_CONFIDENCE) -> GateDecision:
    """The gate's decision, without recording or promoting anything.

    The champion is re-scored on the candidate's test slides and the two are compared cell
    by cell (paired slide bootstrap). ``candidate_probabilities`` are the candidate's on
    ``test_records``, in that order (``CandidateEvaluation.test_probabilities``); without
    them the registered candidate is predicted again here.
    """
    champion_version = registry.champion_version()
    champion_metrics = None
    paired = None
    if champion_version and champion_version != version:
        champion_report, champion_prob = predict_registered(
            registry, champion_version, test_records, read_bytes, cache, tta=config.tta)
        champion_metrics = champion_report.to_dict()
        champion_metrics["version"] = champion_version
        if candidate_probabilities is None:
            candidate_probabilities = predict_registered(
                registry, version, test_records, read_bytes, cache, tta=config.tta)[1]
        paired = paired_slide_bootstrap(
            [r.label for r in test_records], candidate_probabilities, champion_prob,
            [r.slide for r in test_records], threshold_candidate=candidate.threshold,
            threshold_champion=champion_report.threshold, resamples=resamples, seed=seed,
            level=level)
    return decide_promotion(candidate.to_dict(), champion_metrics, paired=paired,
                            best=best_promoted(registry), tolerance=config.tolerance,
                            min_auc=config.min_auc, min_accuracy=config.min_accuracy)


def settle(registry: ModelRegistry, version: str, decision: GateDecision) -> GateDecision:
    """Record ``decision`` beside the version, and promote it if the decision says so."""
    registry.record_decision(version, decision)
    if decision.promote:
        registry.promote(version, reason=decision.reason, decision=decision)
    return decision


def gate(registry: ModelRegistry, version: str, candidate: EvaluationReport,
         test_records: Sequence[CellRecord], read_bytes: Reader, cache: ImageCache,
         config: RetrainConfig, *,
         candidate_probabilities: npt.ArrayLike | None = None) -> GateDecision:
    """Re-score the champion on the candidate's test slides, decide, and promote if earned."""
    decision = decide(registry, version, candidate, test_records, read_bytes, cache, config,
                      candidate_probabilities=candidate_probabilities)
    return settle(registry, version, decision)
