"""The paired, slide-level comparison of a candidate with the champion, and the gate that
uses it: refuse a candidate worse on the same slides, pass a better one, and never let a run
of slightly worse candidates walk the champion down."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from malaria.core import defaults
from malaria.evaluation.metrics import evaluate
from malaria.evaluation.paired import paired_slide_bootstrap, slide_draw_counts
from malaria.io.store import LocalStore
from malaria.registry.gate import (
    best_so_far,
    decide_promotion,
    serving_promotions,
)
from malaria.registry.registry import ModelRegistry

# Two models on the same cells: scores N(d * y, 1), so AUC = Phi(d / sqrt 2) and, at the
# midpoint threshold d / 2, accuracy = Phi(d / 2) whatever the class mix of a slide.
STRONG, WEAK = 2.0, 1.5


def phi(x: float) -> float:
    """The standard normal distribution function."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2)))


TRUE_AUC_DIFF = phi(STRONG / math.sqrt(2)) - phi(WEAK / math.sqrt(2))
TRUE_ACC_DIFF = phi(STRONG / 2) - phi(WEAK / 2)


def two_models(seed: int, *, slides: int = 40, cells: int = 150, candidate: float = STRONG,
               champion: float = WEAK) -> dict[str, Any]:
    """Labels, slide ids and both models' probabilities (and thresholds) on the same cells.
    Slides differ in their share of parasitized cells; the two models' errors correlate,
    as two models of one data set do."""
    rng = np.random.default_rng(seed)
    share = rng.uniform(0.1, 0.9, slides)
    slide = np.repeat(np.arange(slides), cells)
    y = (rng.random(slide.size) < share[slide]).astype(np.int8)
    shared = rng.standard_normal(slide.size)
    own = rng.standard_normal(slide.size)
    old = champion * y + shared
    new = candidate * y + 0.6 * shared + 0.8 * own  # still unit variance

    def prob(score: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-score))  # monotone: AUC unchanged

    return {"y": y, "slides": [f"s{s:02d}" for s in slide],
            "candidate": prob(new), "champion": prob(old),
            "t_candidate": float(prob(np.array(candidate / 2))),
            "t_champion": float(prob(np.array(champion / 2)))}


def bootstrap(case: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return paired_slide_bootstrap(case["y"], case["candidate"], case["champion"],
                                  case["slides"], threshold_candidate=case["t_candidate"],
                                  threshold_champion=case["t_champion"], **kwargs)


def metrics(case: dict[str, Any], which: str) -> dict[str, Any]:
    return evaluate(case["y"], case[which], case[f"t_{which}"],
                    slides=case["slides"]).to_dict()


# ---------------------------------------------------------------------- paired bootstrap


def test_the_paired_bootstrap_is_deterministic_for_a_seed() -> None:
    case = two_models(1)
    first, again = bootstrap(case, resamples=500), bootstrap(case, resamples=500)
    assert first == again
    other = bootstrap(case, resamples=500, seed=7)
    assert other["auc"]["estimate"] == first["auc"]["estimate"]  # the data, not the draws
    assert other["auc"]["low"] != first["auc"]["low"]
    assert first["slides"] == 40 and first["cells"] == 6000 and first["resamples"] == 500
    # The defaults are the product's.
    default = bootstrap(case)
    assert (default["resamples"], default["seed"], default["level"]) == (
        defaults.GATE_BOOTSTRAP_RESAMPLES, defaults.GATE_BOOTSTRAP_SEED,
        defaults.GATE_CONFIDENCE)


def test_the_interval_contains_the_true_difference() -> None:
    result = bootstrap(two_models(2))
    for name, truth in (("auc", TRUE_AUC_DIFF), ("accuracy", TRUE_ACC_DIFF)):
        figures = result[name]
        assert figures["low"] < truth < figures["high"], (name, truth, figures)
        assert figures["low"] > 0  # and it is clearly better
        assert figures["low"] <= figures["mean"] <= figures["high"]
        assert abs(figures["estimate"] - truth) < 0.03


def test_the_estimate_is_the_difference_of_the_two_reports() -> None:
    case = two_models(3)
    result = bootstrap(case, resamples=50)
    new, old = metrics(case, "candidate"), metrics(case, "champion")
    assert result["auc"]["estimate"] == pytest.approx(new["roc_auc"] - old["roc_auc"])
    assert result["accuracy"]["estimate"] == pytest.approx(new["accuracy"] - old["accuracy"])


def test_the_same_model_on_both_sides_differs_by_exactly_nothing() -> None:
    case = two_models(4)
    case["champion"], case["t_champion"] = case["candidate"], case["t_candidate"]
    result = bootstrap(case, resamples=200)
    for name in ("auc", "accuracy"):
        assert result[name]["low"] == result[name]["high"] == result[name]["estimate"] == 0


def test_slides_are_resampled_whole() -> None:
    counts = slide_draw_counts(5, 300, seed=0)
    assert counts.shape == (300, 5) and (counts.sum(axis=1) == 5).all()
    assert np.array_equal(counts, slide_draw_counts(5, 300, seed=0))
    # A resample with one class only has no AUC: counted, left out.
    y = np.array([0, 0, 1, 1])
    result = paired_slide_bootstrap(y, [0.1, 0.2, 0.8, 0.9], [0.2, 0.1, 0.9, 0.8],
                                    ["a", "a", "b", "b"], threshold_candidate=0.5,
                                    threshold_champion=0.5, resamples=400)
    assert 0 < result["auc"]["undefined_resamples"] < 400


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="prob has 1 values"):
        paired_slide_bootstrap([0, 1], [0.1, 0.9], [0.5], ["a", "b"],
                               threshold_candidate=0.5, threshold_champion=0.5)
    with pytest.raises(ValueError, match="slides"):
        paired_slide_bootstrap([0, 1], [0.1, 0.9], [0.2, 0.8], ["a"],
                               threshold_candidate=0.5, threshold_champion=0.5)


# ------------------------------------------------------------------------------ the gate

LOOSE = {"min_auc": 0.5, "min_accuracy": 0.5}  # the synthetic models are weak on purpose


def test_a_candidate_worse_on_the_same_slides_is_refused() -> None:
    case = two_models(5, candidate=WEAK, champion=STRONG)
    paired = bootstrap(case)
    decision = decide_promotion(metrics(case, "candidate"), metrics(case, "champion"),
                                paired=paired, **LOOSE)
    assert not decision.promote and decision.reason.startswith("Not promoted")
    assert "on the same slides" in decision.reason and "95% interval" in decision.reason
    assert decision.paired == paired


def test_a_better_candidate_passes_and_the_reason_shows_the_paired_figures() -> None:
    case = two_models(6)
    paired = bootstrap(case)
    decision = decide_promotion(metrics(case, "candidate"), metrics(case, "champion"),
                                paired=paired, **LOOSE)
    assert decision.promote and decision.reason.startswith("Promoted:")
    low = paired["auc"]["low"]
    assert f"{low:+.4f}" in decision.reason and "over 40 slides" in decision.reason
    assert decision.to_dict()["paired"]["auc"]["low"] == low


def test_equal_within_noise_is_refused_when_the_interval_reaches_past_the_tolerance() -> None:
    """The point figures pass the old rule (0.003 worse < tolerance 0.005), but the paired
    interval says the loss could be 0.012: not promoted. A tight interval passes."""
    candidate = {"roc_auc": 0.987, "accuracy": 0.967}
    champion = {"roc_auc": 0.990, "accuracy": 0.970}
    assert decide_promotion(candidate, champion).promote  # the old rule alone

    def paired(low: float) -> dict[str, Any]:
        figures = {"estimate": -0.003, "mean": -0.003, "low": low, "high": 0.004,
                   "undefined_resamples": 0}
        return {"resamples": 2000, "seed": 1, "level": 0.95, "slides": 30, "cells": 9000,
                "auc": figures, "accuracy": figures}

    wide = decide_promotion(candidate, champion, paired=paired(-0.012))
    assert not wide.promote and "-0.0120" in wide.reason
    assert decide_promotion(candidate, champion, paired=paired(-0.0049)).promote
    assert decide_promotion(candidate, champion, paired=paired(-0.005)).promote  # the edge


def test_the_decision_is_deterministic() -> None:
    case = two_models(7)
    first = decide_promotion(metrics(case, "candidate"), metrics(case, "champion"),
                             paired=bootstrap(case), **LOOSE)
    again = decide_promotion(metrics(case, "candidate"), metrics(case, "champion"),
                             paired=bootstrap(case), **LOOSE)
    assert first == again


# ---------------------------------------------------------------------------- best so far


def _register(registry: ModelRegistry, version: str, tmp_path: Path,
              metrics: dict[str, Any] | None = None) -> None:
    model = tmp_path / "model.keras"
    model.write_bytes(b"not a real model: the gate never loads it here")
    registry.register(version, model, {"metrics": metrics or {}}, {})


def test_slightly_worse_candidates_cannot_walk_the_champion_down(tmp_path: Path) -> None:
    """Each candidate is 0.004 worse than the champion of the night, within the tolerance
    and non-inferior on the paired test: without the best-so-far bar each would be promoted
    and ten nights would cost 0.04 AUC. With it, the champion stays within the tolerance
    of the best model so far."""
    from malaria.model.promotion import best_promoted, settle

    registry = ModelRegistry(LocalStore(tmp_path / "bucket"))
    tolerance = defaults.GATE_TOLERANCE
    paired_ok = {"resamples": 2000, "seed": 1, "level": 0.95, "slides": 30, "cells": 9000,
                 **{name: {"estimate": -0.004, "mean": -0.004, "low": -0.0045,
                           "high": -0.0035, "undefined_resamples": 0}
                    for name in ("auc", "accuracy")}}
    first = {"roc_auc": 0.990, "accuracy": 0.970}
    _register(registry, "v00", tmp_path)
    assert settle(registry, "v00", decide_promotion(first, None)).promote
    champion = dict(first)
    promoted = 1
    for night in range(1, 11):
        version = f"v{night:02d}"
        _register(registry, version, tmp_path)
        candidate = {name: value - 0.004 for name, value in champion.items()}
        # The old rule, and the paired rule alone, would both promote it.
        assert decide_promotion(candidate, champion).promote
        assert decide_promotion(candidate, champion, paired=paired_ok).promote
        decision = settle(registry, version, decide_promotion(
            candidate, champion, paired=paired_ok, best=best_promoted(registry)))
        if decision.promote:
            champion = candidate
            promoted += 1
        else:
            assert "best so far 0.9900 (v00)" in decision.reason
        assert champion["roc_auc"] >= first["roc_auc"] - tolerance - 1e-12
        assert champion["accuracy"] >= first["accuracy"] - tolerance - 1e-12
    assert promoted == 2  # v01 (0.986) is within the tolerance of v00; v02 (0.982) is not
    assert registry.champion_version() == "v01"
    assert registry.get_decision("v05")["best_so_far"]["auc"] == 0.99  # type: ignore[index]


def test_the_best_so_far_skips_rolled_back_models_and_reads_manual_promotions(
        tmp_path: Path) -> None:
    from malaria.model.promotion import best_promoted, settle

    registry = ModelRegistry(LocalStore(tmp_path / "bucket"))
    assert best_promoted(registry) is None
    _register(registry, "v1", tmp_path)
    settle(registry, "v1", decide_promotion({"roc_auc": 0.98, "accuracy": 0.96}, None))
    _register(registry, "v2", tmp_path)
    settle(registry, "v2", decide_promotion({"roc_auc": 0.995, "accuracy": 0.95},
                                            {"roc_auc": 0.98, "accuracy": 0.95}))
    best = best_promoted(registry)
    assert best is not None and (best["auc"], best["auc_version"]) == (0.995, "v2")
    assert (best["accuracy"], best["accuracy_version"]) == (0.96, "v1")
    # A person rolled v2 back: its figures no longer set the bar.
    registry.rollback(reason="bad on real slides")
    best = best_promoted(registry)
    assert best is not None and (best["auc"], best["auc_version"]) == (0.98, "v1")
    # A promotion by hand (no gate) counts with the version's own test metrics.
    _register(registry, "v3", tmp_path, {"roc_auc": 0.99, "accuracy": 0.97})
    registry.promote("v3", reason="by hand")
    best = best_promoted(registry)
    assert best is not None and best["auc_version"] == "v3" and best["accuracy"] == 0.97


def test_best_so_far_and_history_replay_are_pure() -> None:
    history = [
        {"action": "promote", "version": "a", "decision": {"candidate": {"auc": 0.97}}},
        {"action": "promote", "version": "b", "decision": {"candidate": {"roc_auc": 0.99,
                                                                          "accuracy": 0.9}}},
        {"action": "rollback", "version": "a"},
        {"action": "promote", "version": "c"},
    ]
    assert serving_promotions(history) == [("a", {"auc": 0.97}), ("c", None)]
    assert best_so_far(serving_promotions(history)) == {
        "models": 1, "auc": 0.97, "auc_version": "a"}
    assert best_so_far([("c", None)]) is None
    # Below the floor-free bar set by the best: refused, and said so.
    decision = decide_promotion({"roc_auc": 0.96, "accuracy": 0.95}, None,
                                best={"auc": 0.97, "auc_version": "a"}, min_auc=0.5,
                                min_accuracy=0.5)
    assert not decision.promote and "best so far 0.9700 (a)" in decision.reason
