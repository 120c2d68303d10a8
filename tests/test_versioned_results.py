"""Re-scoring never destroys a reported result: the earlier CSV is kept under the history
prefix keyed by the model version and scan fingerprint that made it, and a slide whose
parasitemia moves by more than the set points is listed in the run's report and raises a
Prefect event."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from malaria.core import layout
from malaria.io.store import S3Store
from malaria.scoring.due import marker_id
from malaria.scoring.paths import ScoringPaths
from malaria_dev.synthetic import generate_scan_cells

pytestmark = pytest.mark.usefixtures("clients_find_moto")


def _score(store: S3Store) -> dict[str, Any]:
    from flows.score import score_flow

    return score_flow(data_url=store.url, shard_size=10, lease_settle_s=0.05)


def _register(store: S3Store, model: Path, version: str, threshold: float) -> None:
    from malaria.registry.registry import ModelRegistry

    registry = ModelRegistry(store)
    registry.register(version, model, plots={}, metrics={
        "threshold": threshold, "input_size": 32, "architecture": "cellnet-tiny"})
    registry.promote(version, reason="test")


def test_rescoring_keeps_the_earlier_csv_and_announces_a_moved_parasitemia(
        s3_store: S3Store, tiny_model: Path, prefect_harness: None) -> None:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    for slide in ("401", "402"):
        for cell in generate_scan_cells(4, slide_id=int(slide), seed=9):
            s3_store.put_bytes(f"scans/{slide}/{cell.file_name}", cell.data)
    # The same weights at two operating points: nothing called parasitized, then everything.
    _register(s3_store, tiny_model, "v1", threshold=1.0)
    first = _score(s3_store)
    assert first["parasitemia_changed"] == []
    reported = {s: s3_store.get_bytes(layout.prediction_key(s)) for s in ("401", "402")}
    paths = ScoringPaths.bucket(s3_store.url)
    fingerprints = {s: marker_id(next(iter(s3_store.list(paths.marker_prefix(s)))))[0]
                    for s in reported}

    _register(s3_store, tiny_model, "v2", threshold=0.0)
    second = _score(s3_store)
    assert sorted(second["slides_scored"]) == ["401", "402"]
    for slide, earlier in reported.items():
        kept = s3_store.get_bytes(
            layout.prediction_history_key(slide, fingerprints[slide], "v1"))
        assert kept == earlier  # byte for byte what the lab may have read
        now = pd.read_csv(io.BytesIO(s3_store.get_bytes(layout.prediction_key(slide))))
        assert set(now.model_version) == {"v2"}
    changed = {c["slide"]: c for c in second["parasitemia_changed"]}
    assert set(changed) == {"401", "402"}
    assert changed["401"]["previous_parasitemia_pct"] == 0.0
    assert changed["401"]["parasitemia_pct"] == 100.0 and changed["401"]["shift_pp"] == 100.0
    assert changed["401"]["previous_model_version"] == "v1"
    summary = pd.read_csv(io.BytesIO(s3_store.get_bytes(layout.PREDICTION_SUMMARY_KEY)),
                          dtype={"slide": str})
    assert set(summary.model_version) == {"v2"} and summary.scored_at.notna().all()

    # The history is not a slide: nothing is due, nothing is written, nothing announced.
    before = {i.key: i.etag for i in s3_store.list("")}
    third = _score(s3_store)
    assert third["slides_scored"] == [] and third["parasitemia_changed"] == []
    assert {i.key: i.etag for i in s3_store.list("")} == before

    events: list[Any] = []
    with get_client(sync_client=True) as client:
        for _ in range(20):  # events reach the server's store asynchronously
            page = client.read_events(EventFilter(event=EventNameFilter(
                name=["malaria.slide.parasitemia-changed"])), limit=50)
            events = [e for e in page.events
                      if e.resource.id in ("malaria.slide.401", "malaria.slide.402")]
            if len(events) >= 2:
                break
            time.sleep(0.5)
    assert {e.resource.id for e in events} == {"malaria.slide.401", "malaria.slide.402"}
    assert all(e.payload["previous_model_version"] == "v1" for e in events)
