"""The promotion gate: should a candidate serve instead of the champion?

Pure: it compares two metric dicts (computed on the same held-out slides) against the floors
and the tolerance in :mod:`malaria.core.defaults`; the registry records what it decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from malaria.core.defaults import GATE_MIN_ACCURACY, GATE_MIN_AUC, GATE_TOLERANCE


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate: dict[str, Any]
    champion: dict[str, Any] | None
    tolerance: float = GATE_TOLERANCE
    min_auc: float = GATE_MIN_AUC
    min_accuracy: float = GATE_MIN_ACCURACY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _metric(metrics: Mapping[str, Any], name: str) -> float | None:
    """AUC is ``roc_auc`` in an EvaluationReport dict and ``auc`` in the benchmark JSON."""
    keys = ("roc_auc", "auc") if name == "auc" else (name,)
    for key in keys:
        value = metrics.get(key)
        if value is not None:
            number = float(value)
            return None if math.isnan(number) else number
    return None


def _parasitemia_note(candidate: Mapping[str, Any],
                      champion: Mapping[str, Any] | None) -> str:
    """The per-slide parasitemia error (the lab's number), shown beside the decision; it
    does not decide (yet): records written before it was measured lack it."""
    def figures(metrics: Mapping[str, Any]) -> str | None:
        mean = _metric(metrics, "parasitemia_error_mean")
        worst = _metric(metrics, "parasitemia_error_max")
        if mean is None or worst is None:
            return None
        return f"mean {mean:.2f} pp, max {worst:.2f} pp"

    ours = figures(candidate)
    if ours is None:
        return ""
    theirs = figures(champion) if champion is not None else None
    return (f" Per-slide parasitemia error: {ours}"
            + (f" (champion: {theirs})" if theirs else "") + ".")


def decide_promotion(
    candidate: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    *,
    tolerance: float = GATE_TOLERANCE,
    min_auc: float = GATE_MIN_AUC,
    min_accuracy: float = GATE_MIN_ACCURACY,
) -> GateDecision:
    """Should the candidate serve? Both metric dicts must come from the SAME evaluation slides.

    The caller re-scores the champion beside the candidate: comparing against the champion's
    own registration-time figures would compare different test sets. Promote when the
    candidate's AUC and accuracy are each at least the floor, and, if there is a champion, at
    least the champion's value minus ``tolerance`` (retraining noise should not freeze the
    registry, while a real regression is refused). Missing or undefined metrics refuse.
    """
    floors = {"auc": min_auc, "accuracy": min_accuracy}
    labels = {"auc": "AUC", "accuracy": "accuracy"}
    problems: list[str] = []
    passes: list[str] = []
    for name, floor in floors.items():
        value = _metric(candidate, name)
        label = labels[name]
        if value is None:
            problems.append(f"the candidate has no {label}")
            continue
        if value < floor:
            problems.append(f"candidate {label} {value:.4f} is below the floor {floor:.4f}")
        if champion is None:
            if value >= floor:
                passes.append(f"{label} {value:.4f} >= floor {floor:.4f}")
            continue
        reference = _metric(champion, name)
        if reference is None:
            problems.append(f"the champion has no {label} on these slides to compare with")
            continue
        bar = reference - tolerance
        # A hair of slack so that "equal within tolerance" survives float rounding.
        if value < bar - 1e-12:
            problems.append(
                f"candidate {label} {value:.4f} is worse than the champion's {reference:.4f} "
                f"minus tolerance {tolerance:g} ({bar:.4f})"
            )
        elif value >= floor:
            passes.append(
                f"{label} {value:.4f} vs champion {reference:.4f} (bar {bar:.4f}, "
                f"floor {floor:.4f})"
            )

    if problems:
        reason = "Not promoted: " + "; ".join(problems) + "."
    elif champion is None:
        reason = "Promoted as the first model (no champion yet): " + ", ".join(passes) + "."
    else:
        reason = "Promoted: " + ", ".join(passes) + "."
    reason += _parasitemia_note(candidate, champion)
    return GateDecision(
        promote=not problems,
        reason=reason,
        candidate=dict(candidate),
        champion=dict(champion) if champion is not None else None,
        tolerance=tolerance,
        min_auc=min_auc,
        min_accuracy=min_accuracy,
    )
