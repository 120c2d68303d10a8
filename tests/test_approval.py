"""Promotion with a person in the loop: the gate split into decide and settle, the decision
record saying who answered, and the train flow pausing for input on a real Prefect server."""

from __future__ import annotations

import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from malaria.core import layout
from malaria.io.store import LocalStore
from malaria.model.promotion import settle
from malaria.registry.gate import (
    GateDecision,
    awaiting_approval,
    comparison_markdown,
    decide_promotion,
    with_approval,
)
from malaria.registry.registry import ModelRegistry

GOOD = {"roc_auc": 0.995, "accuracy": 0.975, "version": "cand"}
CHAMPION = {"roc_auc": 0.99, "accuracy": 0.97, "version": "v1"}
PAIRED = {"resamples": 2000, "seed": 1, "level": 0.95, "slides": 30, "cells": 9000,
          "auc": {"estimate": 0.005, "mean": 0.005, "low": 0.001, "high": 0.009,
                  "undefined_resamples": 0},
          "accuracy": {"estimate": 0.005, "mean": 0.005, "low": -0.002, "high": 0.011,
                       "undefined_resamples": 0}}


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    registry = ModelRegistry(LocalStore(tmp_path / "bucket"))
    model = tmp_path / "model.keras"
    model.write_bytes(b"a stand-in: nothing here loads it")
    for version in ("v1", "v2"):
        registry.register(version, model, {"metrics": {}}, {})
    registry.promote("v1", reason="first")
    return registry


def gate_says_promote() -> GateDecision:
    decision = decide_promotion(GOOD, CHAMPION, paired=PAIRED)
    assert decision.promote
    return decision


def test_pending_then_approved_promotes_and_records_who(registry: ModelRegistry) -> None:
    decision = gate_says_promote()
    pending = settle(registry, "v2", awaiting_approval(decision))
    assert not pending.promote and registry.champion_version() == "v1"
    record = registry.get_decision("v2")
    assert record is not None and record["approval"]["status"] == "pending"
    assert record["reason"].startswith("Awaiting approval") and record["promote"] is False

    approved = settle(registry, "v2", with_approval(decision, approved=True, by="Dr Ada",
                                                    note="checked the slides",
                                                    flow_run="run-1"))
    assert approved.promote and registry.champion_version() == "v2"
    record = registry.get_decision("v2")
    assert record is not None and record["promote"] is True
    assert record["approval"] == {"required": True, "status": "approved", "approved": True,
                                  "by": "Dr Ada", "note": "checked the slides",
                                  "flow_run": "run-1"}
    assert record["reason"].startswith("Promoted, approved by Dr Ada (checked the slides)")
    assert record["paired"] == PAIRED  # the figures the person saw are kept
    champion = registry.champion()
    assert champion is not None and champion["decision"]["approval"]["by"] == "Dr Ada"


def test_rejected_keeps_the_champion(registry: ModelRegistry) -> None:
    rejected = settle(registry, "v2", with_approval(gate_says_promote(), approved=False,
                                                    by="Dr Bo", note="odd stain"))
    assert not rejected.promote and registry.champion_version() == "v1"
    record = registry.get_decision("v2")
    assert record is not None and record["approval"]["status"] == "rejected"
    assert record["reason"].startswith("Not promoted: rejected by Dr Bo (odd stain). Gate: ")


def test_approval_cannot_overrule_a_refusal(registry: ModelRegistry) -> None:
    refused = decide_promotion({"roc_auc": 0.95, "accuracy": 0.9}, CHAMPION)
    assert not refused.promote
    answered = settle(registry, "v2", with_approval(refused, approved=True, by="Dr Ada"))
    assert not answered.promote and registry.champion_version() == "v1"
    assert answered.reason.startswith("Not promoted (the gate refused")


def test_an_expired_request_is_recorded() -> None:
    expired = with_approval(gate_says_promote(), approved=False, status="expired",
                            by="nobody (no answer within 60 s)")
    assert not expired.promote and expired.approval is not None
    assert expired.approval["status"] == "expired"
    assert "expired by nobody" in expired.reason


def test_the_default_path_has_no_approval(registry: ModelRegistry) -> None:
    decision = settle(registry, "v2", gate_says_promote())
    assert decision.promote and decision.approval is None
    assert registry.champion_version() == "v2"


def test_the_comparison_table_shows_what_was_weighed() -> None:
    best = {"auc": 0.996, "auc_version": "v0", "accuracy": 0.97, "accuracy_version": "v1",
            "models": 2}
    decision = decide_promotion(GOOD, CHAMPION, paired=PAIRED, best=best)
    table = comparison_markdown(decision)
    assert "| AUC | 0.9950 | 0.9900 | +0.0050 [+0.0010, +0.0090] | 0.9960 (v0) | 0.9000 |" \
        in table
    assert "| accuracy | 0.9750 | 0.9700 | +0.0050 [-0.0020, +0.0110] | 0.9700 (v1) |" in table
    assert "2000 resamples of 30 slides" in table and "Champion: `v1`" in table
    assert decision.reason in table
    first = comparison_markdown(decide_promotion(GOOD, None))
    assert "| AUC | 0.9950 | none | n/a | n/a |" in first


# --------------------------------------------------------------- the flows, for real


def test_nightly_passes_require_approval_to_training(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.nightly
    from malaria_dev.synthetic import generate_cells

    store = LocalStore(tmp_path / "bucket")
    cell = next(iter(generate_cells(1, slides=1, seed=0)))
    store.put_bytes(layout.dataset_key(cell.class_name, "1", cell.file_name), cell.data)
    asked: dict[str, Any] = {}
    monkeypatch.setattr(flows.nightly, "ingest_flow", lambda **_: {"ingested": 0})
    monkeypatch.setattr(flows.nightly, "train_flow",
                        lambda **kwargs: asked.update(kwargs) or {"promoted": False})
    monkeypatch.setattr(flows.nightly, "publish_cell_gifs", lambda *_: [])
    monkeypatch.setattr(flows.nightly, "publish_nightly_report", lambda *_: None)
    flows.nightly.nightly_flow.fn(data_url=store.url, require_approval=True)
    assert asked["require_approval"] is True
    flows.nightly.nightly_flow.fn(data_url=store.url)
    assert asked["require_approval"] is False


def answer_when_paused(answer: dict[str, Any], seen: dict[str, Any], store: LocalStore,
                       deadline_s: float = 600) -> None:
    """Wait for a paused flow run whose form is ready, note what it shows and what the
    bucket says meanwhile, then resume it with ``answer`` (what the UI's form sends)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run
    from prefect.input import keyset_from_paused_state
    from prefect.input.actions import read_flow_run_input

    paused = FlowRunFilter(state=FlowRunFilterState(
        type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    deadline = time.monotonic() + deadline_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            for run in client.read_flow_runs(flow_run_filter=paused):
                assert run.state is not None
                keyset = keyset_from_paused_state(run.state)
                description = read_flow_run_input(keyset["description"], flow_run_id=run.id)
                if description is None:  # the form is saved just after the pause
                    continue
                registry = ModelRegistry(store)
                seen["description"] = description
                seen["decisions"] = {v: registry.get_decision(v) for v in registry.versions()}
                seen["champion"] = registry.champion_version()
                resume_flow_run(run.id, run_input=answer)
                seen["resumed"] = str(run.id)
                return
            time.sleep(1)
    seen["error"] = "no paused run appeared"


def run_answering(options: dict[str, Any], answer: dict[str, Any],
                  store: LocalStore) -> tuple[dict[str, Any], dict[str, Any]]:
    from flows.train import train_flow

    seen: dict[str, Any] = {}
    # The harness's API settings live in a context variable: the answering thread needs them.
    context = contextvars.copy_context()
    helper = threading.Thread(target=context.run, args=(answer_when_paused, answer, seen, store),
                              daemon=True)
    helper.start()
    result = train_flow(**options)
    helper.join(timeout=60)
    assert "error" not in seen and "resumed" in seen, seen
    return result, seen


def test_train_flow_pauses_for_approval_and_promotes_only_if_approved(
        prefect_harness: None, tmp_path: Path) -> None:
    from malaria_dev.synthetic import generate_cells

    store = LocalStore(tmp_path / "bucket")
    cells = list(generate_cells(320, slides=8, seed=4))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: store.put_bytes(
            layout.dataset_key(c.class_name, str(c.slide_id), c.file_name), c.data), cells))
    options = {"data_url": store.url, "arch": "cellnet-tiny", "input_size": 32, "epochs": 3,
               "batch_size": 32, "tta": False, "cache_dir": str(tmp_path / "cache"),
               "min_auc": 0.5, "min_accuracy": 0.5, "require_approval": True}
    registry = ModelRegistry(store)

    # The first model: the gate would promote; the run waits, a person approves.
    first, seen = run_answering(options, {"approve": True, "approver": "Dr Ada",
                                          "note": "first model, checked"}, store)
    assert seen["champion"] is None  # nothing served while it waited
    (pending,) = seen["decisions"].values()
    assert pending["approval"]["status"] == "pending" and pending["promote"] is False
    assert f"# Promote model `{first['version']}`?" in seen["description"]
    assert "| AUC |" in seen["description"] and "| accuracy |" in seen["description"]
    assert first["promoted"] and registry.champion_version() == first["version"]
    record = registry.get_decision(first["version"])
    assert record is not None and record["approval"]["by"] == "Dr Ada"
    assert record["approval"]["flow_run"] == seen["resumed"]
    assert first["approval"]["status"] == "approved"

    # Another candidate the gate would pass (tolerance 1): rejected, the champion stays.
    second, seen = run_answering({**options, "seed": 7, "tolerance": 1.0},
                                 {"approve": False, "approver": "Dr Bo",
                                  "note": "not tonight"}, store)
    assert seen["champion"] == first["version"]
    assert "Champion: `" + first["version"] + "`" in seen["description"]
    assert not second["promoted"] and registry.champion_version() == first["version"]
    record = registry.get_decision(second["version"])
    assert record is not None and record["promote"] is False
    assert record["approval"]["status"] == "rejected" and record["approval"]["by"] == "Dr Bo"
    assert record["reason"].startswith("Not promoted: rejected by Dr Bo (not tonight)")
    assert record["paired"] is not None  # compared on the same slides, cell by cell


def test_an_unanswered_request_expires_and_says_so(prefect_harness: None,
                                                   tmp_path: Path) -> None:
    from prefect.exceptions import FlowPauseTimeout

    from flows.train import train_flow
    from malaria_dev.synthetic import generate_cells

    store = LocalStore(tmp_path / "bucket")
    for c in generate_cells(160, slides=6, seed=5):
        store.put_bytes(layout.dataset_key(c.class_name, str(c.slide_id), c.file_name), c.data)
    with pytest.raises(FlowPauseTimeout):
        train_flow(data_url=store.url, arch="cellnet-tiny", input_size=32, epochs=1,
                   batch_size=32, tta=False, cache_dir=str(tmp_path / "cache"), min_auc=0.0,
                   min_accuracy=0.0, require_approval=True, approval_timeout_s=2)
    registry = ModelRegistry(store)
    (version,) = registry.versions()
    record = registry.get_decision(version)
    assert record is not None and record["promote"] is False
    assert record["approval"]["status"] == "expired"
    assert record["approval"]["by"] == "nobody (no answer within 2 s)"
    assert registry.champion_version() is None
