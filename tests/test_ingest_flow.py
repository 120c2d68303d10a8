"""The ingest flow end to end: a real SeaweedFS, a Prefect test server, synthetic cells
plus the bad-input corpus."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest

from malaria.core import layout
from malaria.io.store import S3Store, get_json
from malaria_dev.synthetic import bad_inputs, generate_cells

pytestmark = pytest.mark.integration


def test_ingest_flow_on_seaweedfs(seaweed_bucket: S3Store, prefect_harness: None) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.ingest import ingest_flow

    store = seaweed_bucket
    uploads = {f"incoming/{c.class_name}/{c.file_name}": c.data
               for c in generate_cells(300, slides=6, seed=21)}
    uploads.update({f"incoming/{b.key}": b.data for b in bad_inputs()})
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: store.put_bytes(*kv), uploads.items()))

    first = ingest_flow(data_url=store.url, chunk_size=128, concurrency=8)
    n_bad_quarantined = sum(b.expected_outcome == "quarantined" for b in bad_inputs())
    assert first["balanced"] and first["listed"] == len(uploads)
    # Chunks of 128 split the label-conflict pair: the first copy is accepted, then retracted
    # to quarantine when its twin with the other label arrives in a later chunk.
    assert first["retracted"] == 1
    assert first["quarantined"] + first["retracted"] == n_bad_quarantined
    assert first["duplicate"] == 1
    assert first["accepted"] - first["retracted"] == len(uploads) - n_bad_quarantined - 1
    assert first["accepted"] + first["duplicate"] + first["quarantined"] == first["listed"]

    # The bucket: dataset/<class>/<slide>/<file> for accepted, quarantine/<reason>/ + sidecars.
    dataset = [i.key for i in store.list("dataset/")]
    assert len(dataset) == first["accepted"] - first["retracted"]
    assert {k.split("/")[1] for k in dataset} == {"Parasitized", "Uninfected"}
    assert {k.split("/")[2] for k in dataset} >= {str(s) for s in range(201, 207)}
    quarantine = [i.key for i in store.list("quarantine/")]
    assert len(quarantine) == 2 * n_bad_quarantined
    assert {k.split("/")[1] for k in quarantine} == {
        b.expected_reason for b in bad_inputs() if b.expected_outcome == "quarantined"}

    manifest = pd.read_csv(io.BytesIO(store.get_bytes(first["manifest"])), keep_default_na=False)
    assert manifest.outcome.value_counts().to_dict() == {
        k: first[k] for k in ("accepted", "quarantined", "duplicate", "retracted")}
    reads = manifest[manifest.outcome != "retracted"]
    assert sorted(reads.source_key) == sorted(uploads)

    # Idempotence: nothing new, nothing written, everything reported as already ingested.
    before = {i.key: i.etag for i in store.list("") if not i.key.startswith(("manifests/",))}
    second = ingest_flow(data_url=store.url, chunk_size=128, concurrency=8)
    assert second["balanced"] and second["already_ingested"] == len(uploads)
    assert second.get("accepted", 0) == 0
    after = {i.key: i.etag for i in store.list("") if not i.key.startswith(("manifests/",))}
    assert after == before
    # One manifest per run (each with its counts beside it, manifests/<run>.summary.json).
    assert len([i for i in store.list(layout.MANIFESTS) if i.key.endswith('.csv')]) == 2
    assert get_json(store, layout.manifest_summary_key(second["run_id"])) == second

    # The run left a table artifact with the counts by outcome and reason.
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-counts"])))
    assert len(artifacts) >= 2
    tables = [a.data if isinstance(a.data, list) else json.loads(a.data) for a in artifacts]
    assert any(r["outcome"] == "listed" and r["count"] == len(uploads)
               for table in tables for r in table)
