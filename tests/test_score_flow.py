"""The score flow end to end: a real SeaweedFS, a Prefect test server, a tiny registered
model; the default thread runner and a local Dask cluster of 2 workers give the same rows."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from malaria.core import layout
from malaria.io.store import S3Store
from malaria.registry.registry import ModelRegistry
from malaria.scoring.output import PREDICTION_COLUMNS
from malaria_dev.synthetic import generate_scan_cells

pytestmark = pytest.mark.integration

SLIDES = {"601": 40, "602": 22, "603": 9}


def _prepare(store: S3Store, model: Path) -> None:
    registry = ModelRegistry(store)
    registry.register("v1", model, metrics={"threshold": 0.5, "input_size": 32,
                                             "architecture": "cellnet-tiny"}, plots={})
    registry.promote("v1", reason="test")
    uploads = {f"scans/{slide}/{c.file_name}": c.data
               for slide, n in SLIDES.items()
               for c in generate_scan_cells(n, slide_id=int(slide), seed=5)}
    uploads["scans/602/broken.png"] = b"\x89PNG\r\n\x1a\n not really"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: store.put_bytes(*kv), uploads.items()))


def _rows(store: S3Store, slide: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.get_bytes(layout.prediction_key(slide))),
                       keep_default_na=False, dtype=str)


def test_score_flow_on_seaweedfs_threads_and_dask_agree(
        seaweed_bucket: S3Store, prefect_harness: None, tmp_path: Path) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.score import build_task_runner, score_flow, score_leased_slides
    from malaria.model.architectures import build_model
    from malaria.model.checkpoints import save_for_serving
    from malaria.scoring.model import resolve_model
    from malaria.scoring.paths import ScoringPaths

    model = tmp_path / "model.keras"
    save_for_serving(build_model("cellnet-tiny", 32), model)
    threads = S3Store(seaweed_bucket.bucket, "threads")
    dask = S3Store(seaweed_bucket.bucket, "dask")
    for store in (threads, dask):
        _prepare(store, model)

    first = score_flow(data_url=threads.url, shard_size=16, batch_size=16)
    assert first["model_version"] == "v1" and sorted(first["slides_scored"]) == sorted(SLIDES)
    assert first["cells"] == sum(SLIDES.values()) + 1 and first["shards_scored"] == 3 + 2 + 1
    assert first["summary_written"]
    for slide, n in SLIDES.items():
        rows = _rows(threads, slide)
        assert tuple(rows.columns) == PREDICTION_COLUMNS
        assert len(rows) == n + (slide == "602") and rows.key.is_unique
    assert _rows(threads, "602").set_index("cell_file").loc["broken.png"].error == "not_an_image"
    summary = pd.read_csv(io.BytesIO(threads.get_bytes(layout.PREDICTION_SUMMARY_KEY)),
                          dtype={"slide": str})
    assert list(summary.slide) == sorted(SLIDES) and summary.unreadable.sum() == 1

    # Nothing new: nothing is written (S3 ETags are content hashes, so compare times too).
    before = {i.key: (i.etag, i.last_modified) for i in threads.list("")}
    again = score_flow(data_url=threads.url, shard_size=16, batch_size=16)
    assert again["slides_scored"] == [] and again["up_to_date"] == len(SLIDES)
    assert {i.key: (i.etag, i.last_modified) for i in threads.list("")} == before

    # A slide that another run finished between this run's listing and its lease is
    # counted as up to date, not scored again.
    paths = ScoringPaths.bucket(threads.url)
    ref = resolve_model(paths, None, None, None)

    @flow
    def rescore_601() -> tuple[object, list[str]]:
        runner = build_task_runner()
        with runner:
            return score_leased_slides(runner, paths, ref, ["601"], shard_size=16,
                                       batch_size=16, concurrency=4, total_cells=SLIDES["601"])

    report, failed = rescore_601()
    assert report.up_to_date == 1 and report.slides == [] and report.cells == 0 and not failed

    # The same scans on a local Dask cluster of 2 worker processes: the same rows.
    on_dask = score_flow(data_url=dask.url, shard_size=16, batch_size=16, runner="dask",
                         dask_workers=2)
    assert sorted(on_dask["slides_scored"]) == sorted(SLIDES)
    for slide in SLIDES:
        a, b = _rows(threads, slide), _rows(dask, slide)
        columns = [c for c in PREDICTION_COLUMNS if c not in ("scored_at", "probability")]
        pd.testing.assert_frame_equal(a[columns], b[columns])
        pa = pd.to_numeric(a.probability, errors="coerce")
        pb = pd.to_numeric(b.probability, errors="coerce")
        assert ((pa - pb).abs().fillna(0) <= 2e-6).all()

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["score-parasitemia", "score-progress"])))
    by_key: dict[str, list[object]] = {}
    for artifact in artifacts:
        by_key.setdefault(str(artifact.key), []).append(artifact.data)
    tables = [d if isinstance(d, list) else json.loads(str(d))
              for d in by_key["score-parasitemia"]]
    assert any({r["slide"] for r in t} == set(SLIDES) for t in tables)
    assert any(float(str(p)) == 100.0 for p in by_key["score-progress"])


def _register(store: S3Store, model: Path, version: str, threshold: float) -> None:
    registry = ModelRegistry(store)
    registry.register(version, model, plots={}, metrics={
        "threshold": threshold, "input_size": 32, "architecture": "cellnet-tiny"})
    registry.promote(version, reason="test")


def _keys(store: S3Store, prefix: str) -> dict[str, str]:
    return {i.key: i.etag for i in store.list(prefix)}


def test_named_slides_and_a_forced_rescore_keep_the_history(
        s3_store: S3Store, clients_find_moto: None, prefect_harness: None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`slides` limits a run to named slides; `force` re-scores them although up to date,
    without touching the other slides, destroying a kept CSV or adding a history entry."""
    from prefect.client.orchestration import get_client

    from flows.score import score_flow
    from malaria.model.architectures import build_model
    from malaria.model.checkpoints import save_for_serving
    from malaria.scoring.due import marker_id
    from malaria.scoring.paths import ScoringPaths
    from malaria_cli.main import main

    model = tmp_path / "model.keras"
    save_for_serving(build_model("cellnet-tiny", 32), model)
    for slide in ("701", "702"):
        for cell in generate_scan_cells(4, slide_id=int(slide), seed=3):
            s3_store.put_bytes(f"scans/{slide}/{cell.file_name}", cell.data)
    options = {"data_url": s3_store.url, "shard_size": 3, "lease_settle_s": 0.05}
    _register(s3_store, model, "v1", threshold=1.0)
    assert sorted(score_flow(**options)["slides_scored"]) == ["701", "702"]
    paths = ScoringPaths.bucket(s3_store.url)

    # A new champion: only the named slide is considered; the other stays as it was.
    _register(s3_store, model, "v2", threshold=0.0)
    untouched = _keys(s3_store, "predictions/702") | _keys(s3_store, paths.marker_prefix("702"))
    state = score_flow(**options, slides=["701", "799"], return_state=True)
    named = state.result()
    assert named["slides_scored"] == ["701"] and named["slides_due"] == ["701"]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).name == "score-1-slides"
    history = _keys(s3_store, "predictions/history/701/")
    assert len(history) == 1 and next(iter(history)).endswith("@v1.csv")
    kept = {k: s3_store.get_bytes(k) for k in history}
    assert score_flow(**options, slides=["701"])["slides_scored"] == []  # up to date

    # Forced, through `malaria score --slide 701 --force`: scored again by v2.
    before = s3_store.get_bytes(layout.prediction_key("701"))
    [marker] = s3_store.list(paths.marker_prefix("701"))
    monkeypatch.setenv("MALARIA_DATA_URL", s3_store.url)
    monkeypatch.setenv("PREFECT_LOGGING_EXTRA_LOGGERS", "malaria")
    assert main(["score", "--slide", "701", "--force", "--shard-size", "3"]) == 0
    after = s3_store.get_bytes(layout.prediction_key("701"))
    assert after != before  # a new scoring (its scored_at), with the same predictions
    columns = ["key", "probability", "predicted_class", "model_version"]
    assert pd.read_csv(io.BytesIO(after))[columns].equals(
        pd.read_csv(io.BytesIO(before))[columns])
    # Nothing destroyed, nothing duplicated: the v1 CSV is still the one history entry,
    # byte for byte; one marker (the same scoring); no parts left; slide 702 untouched.
    assert {k: s3_store.get_bytes(k) for k in _keys(s3_store, "predictions/history/")} == kept
    [again] = s3_store.list(paths.marker_prefix("701"))
    assert marker_id(again) == marker_id(marker)
    assert not list(s3_store.list(paths.parts_prefix("701")))
    assert _keys(s3_store, "predictions/702") | _keys(
        s3_store, paths.marker_prefix("702")) == untouched
    summary = pd.read_csv(io.BytesIO(s3_store.get_bytes(layout.PREDICTION_SUMMARY_KEY)),
                          dtype={"slide": str}).set_index("slide")
    assert summary.loc["701", "model_version"] == "v2"
    assert summary.loc["702", "model_version"] == "v1"

    # Links to the CSVs: the s3:// address (no presigned URL: it would carry a key id).
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    # The newest: the harness's server is shared with the other flow tests of the run.
    with get_client(sync_client=True) as client:
        [link] = client.read_artifacts(limit=1, sort=ArtifactSort.CREATED_DESC,
                                       artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
                                           any_=["predictions-summary"])))
    # (Prefect stores a link artifact as markdown: [text](link).)
    assert f"({s3_store.uri(layout.PREDICTION_SUMMARY_KEY)})" in str(link.data)

    with pytest.raises(ValueError, match="named slides only"):
        score_flow(**options, force=True)
    with pytest.raises(ValueError, match="not a slide folder name"):
        score_flow(**options, slides=["70/1"])
