"""The nightly loop left alone: nightly and scoring run twice on unchanged data (issue 14).
The second night trains nothing, registers nothing, promotes nothing, and the second scoring
run rewrites no CSV: every object under models/ and predictions/ keeps its ETag."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from malaria.core import layout
from malaria.io.store import S3Store
from malaria.registry.registry import ModelRegistry
from malaria_dev.synthetic import generate_cells, generate_scan_cells

pytestmark = pytest.mark.integration

SCAN_SLIDES = (901, 902)


def _upload(store: S3Store) -> None:
    labelled = [(layout.incoming_key(f"{c.class_name}/{c.file_name}"), c.data)
                for c in generate_cells(240, slides=6, seed=11)]
    scans = [(layout.scan_key(str(slide), c.file_name), c.data) for slide in SCAN_SLIDES
             for c in generate_scan_cells(30, slide_id=slide, seed=11)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: store.put_bytes(*item), labelled + scans))


def _etags(store: S3Store, prefix: str) -> dict[str, str]:
    return {info.key: info.etag for info in store.list(prefix)}


def test_nightly_twice_on_unchanged_data_changes_nothing(
        seaweed_bucket: S3Store, prefect_harness: None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.nightly import nightly_flow
    from flows.score import score_flow

    store = seaweed_bucket
    monkeypatch.setenv("MALARIA_CACHE_DIR", str(tmp_path / "cache"))
    _upload(store)
    options: dict[str, Any] = {"data_url": store.url, "arch": "cellnet-tiny", "input_size": 32,
                               "epochs": 2, "batch_size": 32, "tta": False, "gif_cells": 4,
                               "min_auc": 0.0, "min_accuracy": 0.0}  # churn, not quality

    first_night = nightly_flow(**options)
    assert first_night["training"]["promoted"]
    first_scoring = score_flow(data_url=store.url)
    assert sorted(first_scoring["slides_scored"]) == sorted(str(s) for s in SCAN_SLIDES)
    models, predictions = _etags(store, layout.MODELS), _etags(store, layout.PREDICTIONS)
    registry = ModelRegistry(store)
    champion = registry.champion_version()

    second_night = nightly_flow(**options)
    training = second_night["training"]
    assert training["skipped"] and training["version"] is None and not training["promoted"]
    assert second_night["ingest"]["accepted"] == 0  # every object already ingested
    second_scoring = score_flow(data_url=store.url)
    assert second_scoring["slides_scored"] == [] and second_scoring["cells"] == 0
    assert second_scoring["up_to_date"] == len(SCAN_SLIDES)

    # One version, one promotion, and not one byte rewritten where a lab reads results.
    assert registry.versions() == [champion]
    assert len((registry.champion() or {}).get("history", [])) == 1
    assert _etags(store, layout.MODELS) == models
    assert _etags(store, layout.PREDICTIONS) == predictions
    assert not list(store.list(f"{layout.PREDICTIONS}history/"))
