"""Ingest against moto S3 and a local folder: outcomes, bucket contents, manifest,
accounting, idempotence and recovery after a crash. Whole runs go through the ingest flow
(the only ingest orchestrator) against the session's Prefect test server."""

from __future__ import annotations

import io
import json
from typing import Any

import pandas as pd
import pytest

from malaria.core import layout
from malaria.ingest.chunk import iter_chunks
from malaria.ingest.ledger import load_ledger
from malaria.ingest.manifest import ALREADY_INGESTED
from malaria.io.store import LocalStore, ObjectInfo, S3Store
from malaria_dev.synthetic import bad_inputs, generate_cells

Store = S3Store | LocalStore


pytestmark = pytest.mark.usefixtures("clients_find_moto")


def ingest(store: Store, **parameters: Any) -> dict[str, Any]:
    """One run of the ingest flow on ``store``."""
    from flows.ingest import ingest_flow

    return ingest_flow(data_url=store.url, **parameters)


def upload_corpus(store: Store, n_cells: int = 60) -> list[str]:
    keys = []
    for cell in generate_cells(n_cells, slides=3, seed=7):
        key = f"{layout.INCOMING}{cell.class_name}/{cell.file_name}"
        store.put_bytes(key, cell.data)
        keys.append(key)
    for bad in bad_inputs():
        store.put_bytes(layout.INCOMING + bad.key, bad.data)
        keys.append(layout.INCOMING + bad.key)
    return keys


def manifest(store: Store, key: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.get_bytes(key)), keep_default_na=False)


def test_bad_corpus_outcomes_bucket_and_manifest(any_store: Store, prefect_harness: None) -> None:
    keys = upload_corpus(any_store)
    summary = ingest(any_store, chunk_size=1000)
    assert summary["balanced"] and summary["listed"] == len(keys)
    rows = manifest(any_store, summary["manifest"]).set_index("source_key")
    assert sorted(rows.index) == sorted(keys)  # every object read is accounted for

    for bad in bad_inputs():
        row = rows.loc[layout.INCOMING + bad.key]
        assert row.outcome == bad.expected_outcome, bad.description
        if bad.expected_outcome == "quarantined":
            assert row.reason == bad.expected_reason, bad.description
            assert any_store.exists(row.quarantine_key)
            sidecar = json.loads(any_store.get_bytes(row.quarantine_key + ".json"))
            assert sidecar["source_key"] == row.name
            assert sidecar["reason"] == bad.expected_reason
            assert sidecar["run_id"] == summary["run_id"] and sidecar["detail"]
        elif bad.expected_outcome == "accepted":
            assert (row.converted_from or None) == bad.expected_reason
            assert row.dataset_key.startswith(f"dataset/{row.label}/")
            assert any_store.exists(row.dataset_key)

    # The bucket holds exactly the accepted objects, in dataset/<class>/<slide>/<file>.
    accepted = rows[rows.outcome == "accepted"]
    dataset = sorted(i.key for i in any_store.list(layout.DATASET))
    assert dataset == sorted(accepted.dataset_key)
    for key in dataset:
        _, label, slide, name = key.split("/")
        assert label in ("Parasitized", "Uninfected") and slide and name
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    spaces = rows.loc[[k for k in rows.index if " " in k]]
    assert (spaces.outcome == "accepted").all()
    assert summary["quarantined"] == sum(b.expected_outcome == "quarantined"
                                         for b in bad_inputs())
    assert summary["duplicate"] == 1


def test_rerun_changes_nothing_and_reports_already_ingested(any_store: Store,
                                                            prefect_harness: None) -> None:
    upload_corpus(any_store, n_cells=20)
    first = ingest(any_store)
    before = {i.key: i.etag for i in any_store.list("dataset/")}
    before_q = {i.key for i in any_store.list("quarantine/")}
    second = ingest(any_store)
    assert second["listed"] == first["listed"]
    assert second[ALREADY_INGESTED] == second["listed"] and second["balanced"]
    assert {i.key: i.etag for i in any_store.list("dataset/")} == before
    assert {i.key for i in any_store.list("quarantine/")} == before_q
    # One manifest per run (each with its counts beside it, manifests/<run>.summary.json).
    assert len([i for i in any_store.list(layout.MANIFESTS) if i.key.endswith('.csv')]) == 2


def test_new_uploads_are_ingested_incrementally(any_store: Store,
                                                prefect_harness: None) -> None:
    cells = list(generate_cells(30, slides=2, seed=3))
    for cell in cells[:20]:
        any_store.put_bytes(f"incoming/{cell.class_name}/{cell.file_name}", cell.data)
    ingest(any_store)
    for cell in cells[20:]:
        any_store.put_bytes(f"incoming/batch2/{cell.class_name}/{cell.file_name}", cell.data)
    second = ingest(any_store)
    assert second["already_ingested"] == 20 and second["accepted"] == 10
    assert len(list(any_store.list("dataset/"))) == 30


def test_label_conflict_across_chunks_retracts_the_earlier_copy(any_store: Store,
                                                                prefect_harness: None) -> None:
    cell = next(generate_cells(1, seed=11))
    any_store.put_bytes("incoming/a/Parasitized/C5P1_cell_1.png", cell.data)
    any_store.put_bytes("incoming/b/Uninfected/C5P1_cell_2.png", cell.data)
    summary = ingest(any_store, chunk_size=1)  # the two land in different chunks
    assert summary["retracted"] == 1 and summary["balanced"]
    assert list(any_store.list("dataset/")) == []
    reasons = {i.key.split("/")[1] for i in any_store.list("quarantine/")}
    assert reasons == {"label_conflict"}
    assert len(list(any_store.list("quarantine/"))) == 4  # two images + two sidecars
    # A third copy, in a later run, is refused too.
    any_store.put_bytes("incoming/c/Parasitized/C5P1_cell_3.png", cell.data)
    third = ingest(any_store)
    assert third["reasons"]["label_conflict"] == 1


def test_labels_csv_and_slide_column(any_store: Store, prefect_harness: None) -> None:
    cells = list(generate_cells(2, seed=5))
    any_store.put_bytes("incoming/batch/one.png", cells[0].data)
    any_store.put_bytes("incoming/batch/two.png", cells[1].data)
    any_store.put_bytes("labels/batch.csv", b"key,label,slide\nbatch/one.png,infected,77\n")
    summary = ingest(any_store)
    rows = manifest(any_store, summary["manifest"]).set_index("source_key")
    assert rows.loc["incoming/batch/one.png"].dataset_key == "dataset/Parasitized/77/one.png"
    assert rows.loc["incoming/batch/two.png"].reason == "no_label"


def test_same_name_different_content_keeps_both(any_store: Store,
                                                 prefect_harness: None) -> None:
    a, b = list(generate_cells(2, seed=9, parasitized_fraction=1.0))
    any_store.put_bytes("incoming/x/Parasitized/C1P1_cell_1.png", a.data)
    any_store.put_bytes("incoming/y/Parasitized/C1P1_cell_1.png", b.data)
    summary = ingest(any_store)
    assert summary["accepted"] == 2
    assert len(list(any_store.list("dataset/Parasitized/1/"))) == 2


def test_replaced_object_is_ingested_again(local_store: LocalStore,
                                           prefect_harness: None) -> None:
    a, b = list(generate_cells(2, seed=2, parasitized_fraction=0.0))
    local_store.put_bytes("incoming/Uninfected/C1P1_cell_1.png", a.data)
    ingest(local_store)
    local_store.put_bytes("incoming/Uninfected/C1P1_cell_1.png", b.data)
    second = ingest(local_store)
    assert second["accepted"] == 1


def test_crash_mid_run_then_rerun_counts_everything_once(
        any_store: Store, monkeypatch: pytest.MonkeyPatch, prefect_harness: None) -> None:
    import flows.ingest

    upload_corpus(any_store, n_cells=40)
    # A kill is not retried (the task's retries would only repeat it, with back-off).
    monkeypatch.setattr(flows.ingest, "ingest_chunk",
                        flows.ingest.ingest_chunk.with_options(retries=0))
    listed = len(list(any_store.list(layout.INCOMING)))
    real_put = type(any_store).put_bytes

    def die_before_third_ledger_part(self: Store, key: str, data: bytes, **kwargs: object) -> None:
        # The worst moment: chunk 3 wrote all its objects but not its ledger part.
        if key.startswith(layout.INGEST_LEDGER) and key.endswith("-000002.csv"):
            raise RuntimeError("killed")
        real_put(self, key, data, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(type(any_store), "put_bytes", die_before_third_ledger_part)
    with pytest.raises(RuntimeError, match="killed"):
        ingest(any_store, chunk_size=10)
    monkeypatch.setattr(type(any_store), "put_bytes", real_put)
    assert load_ledger(any_store).parts == 2  # nothing of the crashed chunk is recorded

    rerun = ingest(any_store, chunk_size=10)
    assert rerun["balanced"] and rerun["listed"] == listed
    assert rerun["already_ingested"] == 20
    assert ingest(any_store, chunk_size=10)["already_ingested"] == listed

    # The ledger holds every object exactly once, and the dataset exactly the accepted ones.
    ledger_rows = pd.concat([manifest(any_store, i.key)
                             for i in any_store.list(layout.INGEST_LEDGER)])
    reads = ledger_rows[ledger_rows.outcome != "retracted"]
    assert reads.source_key.is_unique and len(reads) == listed
    retracted = set(ledger_rows[ledger_rows.outcome == "retracted"].dataset_key)
    accepted = set(reads[reads.outcome == "accepted"].dataset_key) - retracted
    assert {i.key for i in any_store.list(layout.DATASET)} == accepted


def test_chunks_are_bounded_by_count_and_bytes() -> None:
    from datetime import UTC, datetime

    infos = [ObjectInfo(f"k{i}", 100, "e", datetime.now(UTC)) for i in range(25)]
    assert [len(c) for c in iter_chunks(infos, chunk_size=10)] == [10, 10, 5]
    assert [len(c) for c in iter_chunks(infos, chunk_size=100, chunk_bytes=550)] == [5] * 5
    assert list(iter_chunks([], chunk_size=10)) == []
