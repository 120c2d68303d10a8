"""Ingest under retries, rival runs, hostile names and a stalled store (issue 13: findings 3,
4, 5 and 7). Whole runs go through the ingest flow against the session's Prefect test
server; the lock's own rules are tested on a local folder."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from malaria.core import layout
from malaria.core.defaults import (
    INGEST_CHUNK_TIMEOUT_S,
    INGEST_LOCK_WAIT_S,
    INGEST_REPORT_TIMEOUT_S,
    INGEST_RUN_TIMEOUT_S,
    INGEST_STATE_TIMEOUT_S,
)
from malaria.ingest.chunk import IngestChunk
from malaria.ingest.lock import INGEST_LOCK_KEY, IngestLock, IngestLockBusy, IngestLockLost
from malaria.io.store import LocalStore, S3Store, put_json
from malaria_dev.synthetic import generate_cells

Store = S3Store | LocalStore

pytestmark = pytest.mark.usefixtures("clients_find_moto")

ROOT = Path(__file__).resolve().parent.parent


def ingest(store: Store, **parameters: Any) -> dict[str, Any]:
    from flows.ingest import ingest_flow

    return ingest_flow(data_url=store.url, **parameters)


def manifest(store: Store, key: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.get_bytes(key)), keep_default_na=False)


def ledger_rows(store: Store) -> pd.DataFrame:
    parts = [manifest(store, i.key) for i in store.list(layout.INGEST_LEDGER)]
    return pd.concat(parts) if parts else pd.DataFrame(columns=["source_key", "outcome"])


def upload_conflict_pair(store: Store) -> bytes:
    """One cell under two labels, plus a few ordinary cells after it."""
    cell = next(generate_cells(1, seed=11))
    store.put_bytes("incoming/a/Parasitized/C5P1_cell_1.png", cell.data)
    store.put_bytes("incoming/b/Uninfected/C5P1_cell_2.png", cell.data)
    for other in generate_cells(3, slides=1, seed=4):
        store.put_bytes(f"incoming/c/{other.class_name}/{other.file_name}", other.data)
    return cell.data


def assert_conflict_fully_applied(store: Store, conflicted: bytes) -> None:
    """Neither copy of the conflicted cell is in dataset/; both are in quarantine/."""
    import hashlib

    digest = hashlib.sha256(conflicted).hexdigest()
    in_dataset = [i.key for i in store.list(layout.DATASET)
                  if hashlib.sha256(store.get_bytes(i.key)).hexdigest() == digest]
    assert in_dataset == []
    images = [i.key for i in store.list(layout.QUARANTINE + "label_conflict/")
              if not i.key.endswith(".json")]
    assert len(images) == 2


def assert_every_object_accounted_once(store: Store) -> None:
    rows = ledger_rows(store)
    reads = rows[rows.outcome != "retracted"]
    assert reads.source_key.is_unique
    assert set(reads.source_key) == {i.key for i in store.list(layout.INCOMING)}
    retracted = set(rows[rows.outcome == "retracted"].dataset_key)
    accepted = set(reads[reads.outcome == "accepted"].dataset_key) - retracted
    assert {i.key for i in store.list(layout.DATASET)} == accepted


# -------------------------------------------------------------- finding 3: a retried chunk


def test_a_retried_chunk_retracts_the_accepted_twin(any_store: Store,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    prefect_harness: None) -> None:
    """The first attempt of the chunk holding the second copy fails after its decisions; the
    Prefect retry must still retract the copy an earlier chunk accepted."""
    import flows.ingest

    conflicted = upload_conflict_pair(any_store)
    monkeypatch.setattr(flows.ingest, "ingest_chunk", flows.ingest.ingest_chunk.with_options(
        retries=1, retry_delay_seconds=0))
    real_decide = IngestChunk._decide
    failures: list[str] = []

    def decide_then_fail(self: IngestChunk, items: list[Any]) -> list[Any]:
        retractions = real_decide(self, items)
        if retractions and not failures:
            failures.append(self.run_id)
            raise ConnectionError("injected: the store went away after the decisions")
        return retractions

    monkeypatch.setattr(IngestChunk, "_decide", decide_then_fail)
    summary = ingest(any_store, chunk_size=1)  # the two copies land in different chunks
    assert failures, "the injected failure never fired"
    assert summary["balanced"] and summary["retracted"] == 1
    assert_conflict_fully_applied(any_store, conflicted)
    assert_every_object_accounted_once(any_store)

    again = ingest(any_store, chunk_size=1)
    assert again["already_ingested"] == again["listed"] == summary["listed"]
    assert_conflict_fully_applied(any_store, conflicted)


# --------------------------------------------------------- finding 4: one writer at a time


def test_lock_is_exclusive_and_names_its_holder(local_store: LocalStore) -> None:
    with IngestLock(local_store, label="run-a", settle=0.01):
        rival = IngestLock(local_store, label="run-b", settle=0.01, wait=0)
        with pytest.raises(IngestLockBusy, match="run-a") as busy:
            rival.acquire()
        assert "wrote nothing" in str(busy.value)
        assert json.loads(local_store.get_bytes(INGEST_LOCK_KEY))["label"] == "run-a"
    assert not local_store.exists(INGEST_LOCK_KEY)  # released on leaving the block
    with IngestLock(local_store, label="run-b", settle=0.01, wait=0) as lock:
        assert lock.held


def test_expired_or_orphaned_lock_is_taken_over(local_store: LocalStore) -> None:
    now = time.time()
    put_json(local_store, INGEST_LOCK_KEY, {"owner": "old", "host": "elsewhere", "pid": 1,
                                            "expires_at": now - 1})
    with IngestLock(local_store, settle=0.01, wait=0) as lock:
        assert lock.held
    # A live-looking lock whose process on this host is gone is stale too.
    dead_pid = 2**22 + 1  # above Linux's largest pid_max: never a live process
    put_json(local_store, INGEST_LOCK_KEY, {"owner": "old", "host": socket.gethostname(),
                                            "pid": dead_pid, "expires_at": now + 600})
    with IngestLock(local_store, settle=0.01, wait=0) as lock:
        assert lock.held


def test_a_lock_taken_over_is_detected_and_never_deleted(local_store: LocalStore) -> None:
    lock = IngestLock(local_store, settle=0.01, wait=0)
    lock.acquire()
    lock.verify()
    put_json(local_store, INGEST_LOCK_KEY, {"owner": "other", "expires_at": time.time() + 60})
    with pytest.raises(IngestLockLost):
        lock.verify()
    assert lock.renew() is False
    lock.release()
    assert json.loads(local_store.get_bytes(INGEST_LOCK_KEY))["owner"] == "other"


def test_claimants_racing_for_the_lock_hold_it_one_at_a_time(local_store: LocalStore) -> None:
    inside: list[str] = []
    overlaps: list[list[str]] = []
    guard = threading.Lock()

    def work(name: str) -> None:
        with IngestLock(local_store, label=name, settle=0.05, poll=0.01, wait=60):
            with guard:
                inside.append(name)
                if len(inside) > 1:
                    overlaps.append(list(inside))
            time.sleep(0.05)
            with guard:
                inside.remove(name)

    threads = [threading.Thread(target=work, args=(f"run-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == []
    assert not local_store.exists(INGEST_LOCK_KEY)


def test_ingest_stops_cleanly_while_another_run_holds_the_lock(
        local_store: LocalStore, prefect_harness: None) -> None:
    upload_conflict_pair(local_store)
    before = sorted(i.key for i in local_store.list(""))
    with IngestLock(local_store, label="the other run", settle=0.01):
        with pytest.raises(IngestLockBusy, match="the other run"):
            ingest(local_store, lock_wait_s=0)
        assert sorted(i.key for i in local_store.list("")) == [*before, INGEST_LOCK_KEY]
    summary = ingest(local_store)
    assert summary["balanced"] and summary["listed"] == len(before)


def test_two_concurrent_ingests_write_one_after_the_other(
        s3_store: S3Store, monkeypatch: pytest.MonkeyPatch, prefect_harness: None) -> None:
    """Run A stalls inside its first chunk; run B starts meanwhile and must wait for the lock
    (not write) until A has finished; then B finds everything already ingested."""
    conflicted = upload_conflict_pair(s3_store)
    listed = len(list(s3_store.list(layout.INCOMING)))
    a_inside, let_a_go, b_waiting = threading.Event(), threading.Event(), threading.Event()
    first = threading.Lock()
    real_fetch = IngestChunk._fetch_and_validate

    def fetch(self: IngestChunk, item: Any) -> None:
        with first:
            stall = not a_inside.is_set()
            a_inside.set()
        if stall:
            let_a_go.wait(120)
        real_fetch(self, item)

    real_wait = IngestLock._wait_for_holder

    def watched_wait(self: IngestLock, seconds: float) -> None:
        b_waiting.set()
        real_wait(self, min(seconds, 0.2))

    monkeypatch.setattr(IngestChunk, "_fetch_and_validate", fetch)
    monkeypatch.setattr(IngestLock, "_wait_for_holder", watched_wait)
    results: dict[str, Any] = {}

    def run(name: str) -> None:
        try:
            results[name] = ingest(s3_store, chunk_size=1)
        except BaseException as error:  # reported by the assertions below
            results[name] = error

    run_a = threading.Thread(target=run, args=("a",))
    run_b = threading.Thread(target=run, args=("b",))
    try:
        run_a.start()
        assert a_inside.wait(120), "run A never reached its first chunk"
        run_b.start()
        while not (b_waiting.is_set() or not run_b.is_alive()):
            b_waiting.wait(0.2)
        assert b_waiting.is_set() and "b" not in results, "run B did not wait for run A"
        # While A holds the lock, B has written nothing: only A's lock is new.
        assert [i.key for i in s3_store.list(layout.MANIFESTS)] == []
    finally:
        let_a_go.set()
        run_a.join(300)
        run_b.join(300)
    a, b = results["a"], results["b"]
    assert isinstance(a, dict) and isinstance(b, dict), results
    assert a["balanced"] and a["listed"] == listed and a["retracted"] == 1
    assert b["balanced"] and b["already_ingested"] == listed
    assert_conflict_fully_applied(s3_store, conflicted)
    assert_every_object_accounted_once(s3_store)
    # One manifest per run (each with its counts beside it, manifests/<run>.summary.json).
    assert len([i for i in s3_store.list(layout.MANIFESTS) if i.key.endswith('.csv')]) == 2
    assert not s3_store.exists(INGEST_LOCK_KEY)


def test_a_run_that_lost_the_lock_stops_without_retrying(
        local_store: LocalStore, monkeypatch: pytest.MonkeyPatch, prefect_harness: None) -> None:
    """The lock is taken over after the first chunk (the run stalled past its expiry): the
    next chunk writes nothing, is not retried, and the rival's lock is left alone."""
    upload_conflict_pair(local_store)
    real_run = IngestChunk.run
    chunks: list[int] = []

    def run_then_lose_the_lock(self: IngestChunk, objects: list[Any], index: int) -> Any:
        chunks.append(index)
        result = real_run(self, objects, index)
        put_json(local_store, INGEST_LOCK_KEY, {"owner": "rival", "label": "rival run",
                                                "expires_at": time.time() + 600})
        return result

    monkeypatch.setattr(IngestChunk, "run", run_then_lose_the_lock)
    with pytest.raises(IngestLockLost, match="rival run"):
        ingest(local_store, chunk_size=1)
    assert chunks == [0, 1]  # chunk 1 ran once: no retry
    assert len(list(local_store.list(layout.INGEST_LEDGER))) == 1
    assert len(list(local_store.list(layout.DATASET))) == 1  # chunk 0's cell only
    assert json.loads(local_store.get_bytes(INGEST_LOCK_KEY))["owner"] == "rival"


def test_the_ingest_deployment_runs_one_at_a_time() -> None:
    config = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    [deployment] = [d for d in config["deployments"] if d["name"] == "ingest"]
    assert deployment["concurrency_limit"] == 1


# ------------------------------------------------------ finding 5: poison names, one by one


def test_hostile_names_are_quarantined_and_the_rest_is_ingested(
        s3_store: S3Store, prefect_harness: None) -> None:
    cells = list(generate_cells(8, slides=2, seed=13))
    raw = s3_store.client  # past the store's own key checks, as any S3 client can write
    hostile_keys = [
        "incoming/./Parasitized/C1P1_cell_dot.png",
        "incoming/Parasitized/../C1P1_cell_dotdot.png",
        "incoming/Parasitized//C1P1_cell_empty.png",
    ]
    for key, cell in zip(hostile_keys, cells, strict=False):
        raw.put_object(Bucket=s3_store.bucket, Key=key, Body=cell.data)
    # Labels whose slide cannot be one folder of dataset/<class>/<slide>/.
    hostile_slides = {"batch/slide_up.png": "..", "batch/slide_dot.png": ".",
                      "batch/slide_sep.png": "a/b", "batch/slide_back.png": "a\\b",
                      "batch/slide_long.png": "s" * 101}
    for (relative, _), cell in zip(hostile_slides.items(), cells[4:] * 2, strict=False):
        s3_store.put_bytes(f"incoming/{relative}", cell.data)
    s3_store.put_bytes("labels/hostile.csv", (
        "key,label,slide\n" + "".join(f'{k},infected,"{s}"\n' for k, s in hostile_slides.items())
    ).encode())
    good = list(generate_cells(6, slides=2, seed=14))
    for cell in good:  # before and after the hostile ones in key order
        s3_store.put_bytes(f"incoming/{cell.class_name}/{cell.file_name}", cell.data)
        s3_store.put_bytes(f"incoming/zz/{cell.class_name}/{cell.file_name}", cell.data)

    listed = {i.key for i in s3_store.list(layout.INCOMING)}
    assert set(hostile_keys) <= listed  # the server kept the hostile keys as written
    summary = ingest(s3_store, chunk_size=4)
    assert summary["balanced"] and summary["listed"] == len(listed)
    rows = manifest(s3_store, summary["manifest"]).set_index("source_key")
    assert set(rows.index) == listed
    for key in hostile_keys:
        row = rows.loc[key]
        assert (row.outcome, row.reason) == ("quarantined", "unsafe_key"), key
        sidecar = json.loads(s3_store.get_bytes(row.quarantine_key + ".json"))
        assert sidecar["source_key"] == key and sidecar["reason"] == "unsafe_key"
    for relative in hostile_slides:
        row = rows.loc[f"incoming/{relative}"]
        assert (row.outcome, row.reason) == ("quarantined", "unsafe_slide"), relative
        assert s3_store.exists(row.quarantine_key)  # the image is kept, beside its sidecar
    assert summary["accepted"] == len(good) and summary["duplicate"] == len(good)
    written = [i for i in s3_store.list("") if not i.key.startswith(layout.INCOMING)]
    for item in written:  # nothing ingest wrote has a hostile name
        segments = item.key.split("/")
        assert not {"", ".", ".."} & set(segments), item.key
        if item.key.startswith(layout.DATASET):
            assert len(segments) == 4, item.key
    # The next run finds nothing left to do: the poison objects do not come back.
    again = ingest(s3_store, chunk_size=4)
    assert again["already_ingested"] == len(listed)


# ------------------------------------------------------------- finding 7: bounded in time


def test_every_ingest_step_has_a_timeout() -> None:
    from flows.ingest import ingest_flow
    from tasks.ingest import ingest_chunk, load_ingest_state, publish_ingest_report

    assert ingest_flow.timeout_seconds == INGEST_RUN_TIMEOUT_S
    assert ingest_chunk.timeout_seconds == INGEST_CHUNK_TIMEOUT_S
    assert load_ingest_state.timeout_seconds == INGEST_STATE_TIMEOUT_S
    assert publish_ingest_report.timeout_seconds == INGEST_REPORT_TIMEOUT_S
    # The run outlasts the wait for the lock plus a chunk with all its retries.
    retries = ingest_chunk.retries + 1
    assert INGEST_LOCK_WAIT_S + retries * INGEST_CHUNK_TIMEOUT_S < INGEST_RUN_TIMEOUT_S


def test_a_stalled_store_fails_the_chunk_at_its_timeout(
        local_store: LocalStore, monkeypatch: pytest.MonkeyPatch,
        prefect_harness: None) -> None:
    """Every read hangs (a black-holed endpoint): the chunk task fails at its timeout while
    the reads still hang, writes nothing, and the run lets go of the lock."""
    import flows.ingest

    upload_conflict_pair(local_store)
    unblock, a_read_returned = threading.Event(), threading.Event()
    real_get = LocalStore.get_bytes

    def black_hole(self: LocalStore, key: str) -> bytes:
        if key.startswith(layout.INCOMING):
            unblock.wait(60)
            a_read_returned.set()
        return real_get(self, key)

    monkeypatch.setattr(LocalStore, "get_bytes", black_hole)
    monkeypatch.setattr(flows.ingest, "ingest_chunk", flows.ingest.ingest_chunk.with_options(
        retries=0, timeout_seconds=2))
    try:
        with pytest.raises(TimeoutError):
            ingest(local_store)
        assert not a_read_returned.is_set()  # failed while the store was still stalled
    finally:
        unblock.set()
    assert list(local_store.list(layout.DATASET)) == []
    assert list(local_store.list(layout.INGEST_LEDGER)) == []
    assert not local_store.exists(INGEST_LOCK_KEY)
