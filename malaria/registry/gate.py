"""The promotion gate: should a candidate serve instead of the champion?

Pure: it compares two metric dicts (computed on the same held-out slides) against the floors
and the tolerance in :mod:`malaria.core.defaults`; the registry records what it decides.

The rule, per metric (AUC and accuracy), all of which must hold:

1. the floor: the candidate's value >= ``min_auc`` / ``min_accuracy``;
2. the champion, on the same slides: when the paired slide bootstrap of candidate - champion
   is given (:func:`malaria.evaluation.paired.paired_slide_bootstrap`), the LOWER end of its
   interval must be >= ``-tolerance`` (a one-sided non-inferiority test at 97.5% for the
   default 95% interval): a candidate clearly worse on the same slides is refused, a better
   one passes, and one whose loss cannot be told from more than ``tolerance`` is refused
   too, because a promotion should mean something. Without paired figures (callers that
   only have metric dicts) the point value must be >= champion - tolerance, as before;
3. the best so far: the value must be >= the best value any model still in the serving
   history reached on its own gate, minus ``tolerance``, so a run of candidates each a
   little worse than the last cannot walk the champion down. Those figures come from other
   test slides (the split moves as slides are added), so this is an anchor against drift
   and not a paired comparison.

Everything is a function of its inputs (the bootstrap has a fixed seed): the same figures
always give the same decision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from malaria.core.defaults import GATE_MIN_ACCURACY, GATE_MIN_AUC, GATE_TOLERANCE

METRICS = ("auc", "accuracy")
LABELS = {"auc": "AUC", "accuracy": "accuracy"}
_SLACK = 1e-12  # "equal within tolerance" survives float rounding


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate: dict[str, Any]
    champion: dict[str, Any] | None
    tolerance: float = GATE_TOLERANCE
    min_auc: float = GATE_MIN_AUC
    min_accuracy: float = GATE_MIN_ACCURACY
    # The paired slide bootstrap of candidate - champion on the same cells, or None.
    paired: dict[str, Any] | None = None
    # {"auc", "auc_version", "accuracy", "accuracy_version", "models"}, or None.
    best_so_far: dict[str, Any] | None = None
    # With require_approval: {"required", "status", "approved", "by", "note", ...}.
    approval: dict[str, Any] | None = None

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


# ----------------------------------------------------------------------- the best so far


def serving_promotions(history: Iterable[Mapping[str, Any]]
                       ) -> list[tuple[str, dict[str, Any] | None]]:
    """``(version, gate figures)`` of every promotion still standing in ``champion.json``'s
    history: replayed as the registry does (a promotion pushes, a rollback pops), since a
    model a person rolled back should not set the bar. The figures are the candidate's
    metrics its gate saw, or None for a promotion made without a gate (``malaria models
    promote``)."""
    stack: list[tuple[str, dict[str, Any] | None]] = []
    for event in history:
        if event.get("action") == "rollback":
            if stack:
                stack.pop()
            continue
        decision = event.get("decision")
        figures = decision.get("candidate") if isinstance(decision, Mapping) else None
        stack.append((str(event.get("version")),
                      dict(figures) if isinstance(figures, Mapping) else None))
    return stack


def best_so_far(promotions: Iterable[tuple[str, Mapping[str, Any] | None]]
                ) -> dict[str, Any] | None:
    """The best AUC and the best accuracy among ``(version, metrics)`` (each with the
    version that reached it; the first one wins a tie), or None when none has a figure."""
    best: dict[str, Any] = {"models": 0}
    for version, metrics in promotions:
        if metrics is None:
            continue
        best["models"] += 1
        for name in METRICS:
            value = _metric(metrics, name)
            if value is not None and (best.get(name) is None or value > best[name]):
                best[name], best[f"{name}_version"] = value, version
    return best if any(best.get(name) is not None for name in METRICS) else None


# ---------------------------------------------------------------------------- the decision


def _interval_text(paired: Mapping[str, Any], name: str) -> str | None:
    figures = paired.get(name)
    if not isinstance(figures, Mapping) or figures.get("low") is None:
        return None
    level = float(paired.get("level", 0.95))
    return (f"paired difference {figures['estimate']:+.4f}, {level:.0%} interval "
            f"{figures['low']:+.4f} to {figures['high']:+.4f} over "
            f"{paired.get('slides')} slides")


def decide_promotion(
    candidate: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    *,
    paired: Mapping[str, Any] | None = None,
    best: Mapping[str, Any] | None = None,
    tolerance: float = GATE_TOLERANCE,
    min_auc: float = GATE_MIN_AUC,
    min_accuracy: float = GATE_MIN_ACCURACY,
) -> GateDecision:
    """Should the candidate serve? Both metric dicts must come from the SAME evaluation slides.

    The caller re-scores the champion beside the candidate: comparing against the champion's
    own registration-time figures would compare different test sets. ``paired`` is the
    paired slide bootstrap of the two on those cells and ``best`` the best figures so far
    (:func:`best_so_far`); the rule is in the module's docstring. Missing or undefined
    metrics refuse.
    """
    floors = {"auc": min_auc, "accuracy": min_accuracy}
    problems: list[str] = []
    passes: list[str] = []
    for name, floor in floors.items():
        value = _metric(candidate, name)
        label = LABELS[name]
        if value is None:
            problems.append(f"the candidate has no {label}")
            continue
        fails: list[str] = []
        shown = [f">= floor {floor:.4f}"]
        if value < floor:
            fails.append(f"candidate {label} {value:.4f} is below the floor {floor:.4f}")
        if champion is not None:
            reference = _metric(champion, name)
            if reference is None:
                problems.append(f"the champion has no {label} on these slides to compare with")
                continue
            bar = reference - tolerance
            interval = _interval_text(paired, name) if paired is not None else None
            low = float(paired[name]["low"]) if interval and paired is not None else None
            if value < bar - _SLACK:
                fails.append(f"candidate {label} {value:.4f} is worse than the champion's "
                             f"{reference:.4f} minus tolerance {tolerance:g} ({bar:.4f})"
                             + (f" (on the same slides: {interval})" if interval else ""))
            elif low is not None and low < -tolerance - _SLACK:
                fails.append(f"{label} {value:.4f} vs champion {reference:.4f} on the same "
                             f"slides: {interval}, whose lower end is below -{tolerance:g} "
                             "(it may be worse by more than the tolerance)")
            if interval:
                shown.insert(0, interval)
            shown.insert(0, f"vs champion {reference:.4f} (bar {bar:.4f})")
        if best is not None and best.get(name) is not None:
            top = float(best[name])
            best_bar = top - tolerance
            where = best.get(f"{name}_version")
            if value < best_bar - _SLACK:
                fails.append(f"candidate {label} {value:.4f} is below the best so far "
                             f"{top:.4f} ({where}) minus tolerance {tolerance:g} "
                             f"({best_bar:.4f})")
            shown.append(f"best so far {top:.4f} ({where}; bar {best_bar:.4f})")
        if fails:
            problems.extend(fails)
        else:
            passes.append(f"{label} {value:.4f} " + ", ".join(shown))

    if problems:
        reason = "Not promoted: " + "; ".join(problems) + "."
    elif champion is None:
        reason = "Promoted as the first model (no champion yet): " + "; ".join(passes) + "."
    else:
        reason = "Promoted: " + "; ".join(passes) + "."
    reason += _parasitemia_note(candidate, champion)
    return GateDecision(
        promote=not problems,
        reason=reason,
        candidate=dict(candidate),
        champion=dict(champion) if champion is not None else None,
        tolerance=tolerance,
        min_auc=min_auc,
        min_accuracy=min_accuracy,
        paired=dict(paired) if paired is not None else None,
        best_so_far=dict(best) if best is not None else None,
    )


# ----------------------------------------------------------------------------- approval


def awaiting_approval(decision: GateDecision) -> GateDecision:
    """What ``gate.json`` says while a person is asked: not promoted (yet), and why. Written
    before the pause, so a run that dies waiting leaves a visible trace."""
    return replace(decision, promote=False,
                   reason="Awaiting approval: the gate would promote. " + decision.reason,
                   approval={"required": True, "status": "pending", "approved": None,
                             "by": None, "note": ""})


def with_approval(decision: GateDecision, *, approved: bool, by: str, note: str = "",
                  status: str | None = None, **details: Any) -> GateDecision:
    """The gate's own decision (``promote`` True) after a person answered: promoted only if
    approved. ``by`` says who or what answered (a name, or e.g. "nobody: no answer within
    4 h"); ``details`` (e.g. the flow run) are kept in the record."""
    status = status or ("approved" if approved else "rejected")
    promote = decision.promote and approved
    said = f" ({note})" if note else ""
    if not decision.promote:
        head = "Not promoted (the gate refused; nothing to approve): "
    elif approved:
        head = f"Promoted, approved by {by}{said}. Gate: "
    else:
        head = f"Not promoted: {status} by {by}{said}. Gate: "
    reason = head + decision.reason
    return replace(decision, promote=promote, reason=reason,
                   approval={"required": True, "status": status, "approved": approved,
                             "by": by, "note": note, **details})


def comparison_markdown(decision: GateDecision) -> str:
    """A Markdown table of the figures the gate weighed: what a person approving reads."""
    level = float((decision.paired or {}).get("level", 0.95))

    def cell(value: float | None, signed: bool = False) -> str:
        return "n/a" if value is None else (f"{value:+.4f}" if signed else f"{value:.4f}")

    rows = [f"| | candidate | champion (same slides) | difference, {level:.0%} interval | "
            "best so far | floor |", "|---|---|---|---|---|---|"]
    floors = {"auc": decision.min_auc, "accuracy": decision.min_accuracy}
    for name in METRICS:
        diff = (decision.paired or {}).get(name) or {}
        best = decision.best_so_far or {}
        interval = (f"{cell(diff.get('estimate'), True)} [{cell(diff.get('low'), True)}, "
                    f"{cell(diff.get('high'), True)}]" if diff else "n/a")
        top = best.get(name)
        rows.append(
            f"| {LABELS[name]} | {cell(_metric(decision.candidate, name))} | "
            f"{cell(_metric(decision.champion, name)) if decision.champion else 'none'} | "
            f"{interval} | {cell(top)}"
            + (f" ({best.get(f'{name}_version')})" if top is not None else "")
            + f" | {floors[name]:.4f} |")
    champion = (decision.champion or {}).get("version")
    paired = decision.paired or {}
    notes = [f"Tolerance {decision.tolerance:g}: the lower end of each interval and the "
             "candidate's value against the best so far must not fall further below."]
    if paired:
        notes.append(f"Paired slide bootstrap: {paired.get('resamples')} resamples of "
                     f"{paired.get('slides')} slides ({paired.get('cells')} cells), seed "
                     f"{paired.get('seed')}.")
    if champion:
        notes.append(f"Champion: `{champion}`.")
    return "\n".join(rows) + "\n\n" + " ".join(notes) + "\n\n" + decision.reason + "\n"
