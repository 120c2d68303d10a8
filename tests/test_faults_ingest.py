"""Ingest under storage faults at the HTTP level (tests/faultproxy.py in front of the
session's SeaweedFS), run as the deployment runs it: ``flows.ingest.ingest_flow`` against the
session's Prefect test server, its clients opened from the URL and the environment.

At a 10% fault rate (500, 503 SlowDown, resets mid-answer after the request landed, stalls
shorter than the read timeout; pipelining is refused always) a run over synthetic cells, the
bad-upload catalogue and a labels CSV finishes with the same objects and bytes under
``dataset/``, ``quarantine/``, ``manifests/`` and the ledger (``state/ingest/``) as a
fault-free run on a twin bucket, and a re-run reports every object as already ingested. At
100% a run fails within its limits, the cause in its Prefect logs, leaving no ``dataset/``
object, no ledger part and no manifest, and a lock that is released or expiring.

What the comparisons ignore, and why: only what a run stamps with its own id or the time by
design, which differs between any two runs: the run id (``ingest-<time>-<hash>``, in the
keys of ledger parts and manifests, in their ``run_id`` column and in the ``run_id`` field
of quarantine sidecars) is replaced by the run's rank in its bucket (``<run 1>``, ``<run 2>``), and the sidecars' ``quarantined_at``
is dropped. Every key and every other byte, image or CSV cell or JSON field, must be equal.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from faultproxy import KINDS, FaultProxy, Through, proxy

from malaria.core import layout
from malaria.core.defaults import INGEST_LOCK_TTL_S
from malaria.ingest.lock import INGEST_LOCK_KEY, IngestLock
from malaria.io.s3 import S3Store, reset_clients
from malaria.io.store import LocalStore, StorageError
from malaria_dev.synthetic import bad_inputs, generate_cells

pytestmark = pytest.mark.integration

# Short per-request limits so a test waits seconds, not minutes; at 10% a request gets
# enough tries that failing every one of them is a one-in-a-million event.
RIDE_OUT = {"MALARIA_S3_MAX_ATTEMPTS": "8", "MALARIA_S3_CONNECT_TIMEOUT_S": "3",
            "MALARIA_S3_READ_TIMEOUT_S": "4", "MALARIA_S3_RETRY_TIMEOUT_S": "60"}
GIVE_UP = {"MALARIA_S3_MAX_ATTEMPTS": "2", "MALARIA_S3_CONNECT_TIMEOUT_S": "2",
           "MALARIA_S3_READ_TIMEOUT_S": "2", "MALARIA_S3_RETRY_TIMEOUT_S": "6"}
TEN_PERCENT = ("500", "503", "reset", "stall")  # stalls shorter than the read timeout
# Every request of a dead store fails: a stall would go through, so it is left out here.
DEAD = ("500", "503", "reset", "blackhole")
CHUNK = 16  # several chunks, so the label-conflict pair is split and one copy retracted
RUN_PARAMETERS: dict[str, Any] = {"chunk_size": CHUNK, "concurrency": 8}
LABELS_CSV = (b"key,label,slide\nbatch/one.png,infected,77\nbatch/two.png,uninfected,78\n"
              b"batch/Parasitized/three.png,uninfected,79\n")
INJECTED: dict[str, dict[str, int]] = {}  # test -> fault kind -> count, printed at the end


@pytest.fixture
def seaweed(seaweedfs: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The session's SeaweedFS endpoint, with the client environment pointing at it."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, seaweedfs[name])
    reset_clients()
    yield seaweedfs["AWS_ENDPOINT_URL"]
    reset_clients()


def new_bucket(endpoint: str) -> S3Store:
    store = S3Store(f"faults-ingest-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint)
    store.ensure_bucket()
    return store


def record(name: str, faults: FaultProxy, outcome: str) -> None:
    INJECTED[name] = {**dict(faults.injected), "requests": faults.requests}
    print(f"\nfaults injected in {name}: {INJECTED[name]} -> {outcome}")


def incoming() -> dict[str, bytes]:
    """Synthetic cells over three slides, the bad-upload catalogue (corrupt, empty, wrong
    format, too small or large, grayscale, unlabelled, a label-conflict pair, a duplicate,
    converted formats) and cells labelled by a labels CSV (one of them against its folder)."""
    uploads = {f"{layout.INCOMING}{c.class_name}/{c.file_name}": c.data
               for c in generate_cells(48, slides=3, seed=31)}
    uploads.update({f"{layout.INCOMING}{b.key}": b.data for b in bad_inputs()})
    extra = list(generate_cells(3, slides=1, seed=32))
    for name, cell in zip(("batch/one.png", "batch/two.png", "batch/Parasitized/three.png"),
                          extra, strict=True):
        uploads[f"{layout.INCOMING}{name}"] = cell.data
    uploads["labels/batch.csv"] = LABELS_CSV
    return uploads


def fill(store: S3Store, uploads: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: store.put_bytes(*kv), uploads.items()))


def ingest(store: S3Store) -> dict[str, Any]:
    from flows.ingest import ingest_flow

    return ingest_flow(data_url=f"s3://{store.bucket}", **RUN_PARAMETERS)


# ----------------------------------------------------------------- comparing two buckets

COMPARED = (layout.DATASET, layout.QUARANTINE, layout.MANIFESTS, layout.INGEST_LEDGER)


def snapshot(store: S3Store, run_ids: list[str]) -> dict[str, Any]:
    """Every object under the compared prefixes, by key, with the run's own stamps
    normalized as the module docstring says; plus whether a lock is left."""
    keys = [info.key for prefix in COMPARED for info in store.list(prefix)]
    data = store.get_many(keys)
    shot: dict[str, Any] = {}
    for key, value in zip(keys, data, strict=True):
        assert isinstance(value, bytes), key
        shot[stamped(key, run_ids)] = normalize(key, value, run_ids)
    shot["lock left"] = store.exists(INGEST_LOCK_KEY)
    return shot


def placeholder(run_ids: list[str], run_id: str) -> str:
    """The n-th run of a bucket, whatever its id (ids hold the time they started)."""
    return f"<run {run_ids.index(run_id) + 1}>"


def stamped(text: str, run_ids: list[str]) -> str:
    for run_id in run_ids:
        text = text.replace(run_id, placeholder(run_ids, run_id))
    return text


def normalize(key: str, data: bytes, run_ids: list[str]) -> Any:
    if key.startswith(layout.MANIFESTS) and key.endswith(".summary.json"):
        counts = json.loads(data)  # a run's counts: its id in the fields that name it
        assert counts["run_id"] in run_ids
        return json.loads(stamped(data.decode("utf-8"), run_ids))
    if key.startswith((layout.MANIFESTS, layout.INGEST_LEDGER)):
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
        assert rows and all(row["run_id"] in run_ids for row in rows), key
        return [{**row, "run_id": placeholder(run_ids, row["run_id"])} for row in rows]
    if key.startswith(layout.QUARANTINE) and key.endswith(".json"):
        sidecar = json.loads(data)
        assert sidecar.pop("quarantined_at")  # a time, by design
        assert sidecar["run_id"] in run_ids
        return {**sidecar, "run_id": placeholder(run_ids, sidecar["run_id"])}
    return data


def counts(summary: dict[str, Any]) -> dict[str, Any]:
    """A run's report without its own id and manifest key."""
    return {k: v for k, v in summary.items() if k not in ("run_id", "manifest")}


# ------------------------------------------------------------------------------ 10%


def test_ingest_rides_out_ten_percent_faults(
        seaweed: str, prefect_harness: None, monkeypatch: pytest.MonkeyPatch) -> None:
    uploads = incoming()
    clean, faulty = new_bucket(seaweed), new_bucket(seaweed)
    for store in (clean, faulty):
        fill(store, uploads)
    listed = sum(key.startswith(layout.INCOMING) for key in uploads)

    expected = ingest(clean)
    expected_again = ingest(clean)
    with Through(monkeypatch, proxy(seaweed, 0.10, TEN_PERCENT), RIDE_OUT) as faults:
        got = ingest(faulty)
    record("ingest at 10%", faults, "finished; outputs equal to the fault-free run's")
    assert sum(faults.injected.values()) > 0
    with Through(monkeypatch, proxy(seaweed, 0.10, TEN_PERCENT, seed=23), RIDE_OUT) as faults:
        again = ingest(faulty)
    record("ingest re-run at 10%", faults, "finished; every object already ingested")
    assert sum(faults.injected.values()) > 0

    # The run's report: every object accounted for, as in the fault-free run.
    assert got["balanced"] and got["listed"] == listed
    assert got["retracted"] == 1 and got["reasons"]["label_conflict"] >= 1  # the split pair
    assert counts(got) == counts(expected)
    # The re-run: nothing new, everything already ingested, nothing downloaded or written.
    assert again["balanced"] and again["already_ingested"] == again["listed"] == listed
    assert counts(again) == counts(expected_again)

    # The bucket: the same objects and bytes (nothing lost, nothing twice), and no lock left.
    want = snapshot(clean, [expected["run_id"], expected_again["run_id"]])
    have = snapshot(faulty, [got["run_id"], again["run_id"]])
    assert sorted(have) == sorted(want)
    assert have == want
    assert have["lock left"] is False
    assert sum(k.startswith(layout.DATASET) for k in have) == got["accepted"] - got["retracted"]
    assert sum(k.startswith(layout.MANIFESTS) and k.endswith(".csv") for k in have) == 2


# ----------------------------------------------------------------------------- 100%


def flow_logs(flow_run_id: Any) -> str:
    """The run's log lines as the Prefect UI shows them (sent to the API in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


CAUSES = ("SlowDown", "InternalError", "500", "503", "timed out", "timeout", "Timeout",
          "reset", "connection", "Connection")


def assert_nothing_half_written(store: S3Store, before: dict[str, str]) -> None:
    """No dataset/ object, no quarantine copy, no ledger part, no manifest; incoming/ and
    labels/ as they were; a lock left behind (its release failed too) expires on its own."""
    now = {i.key: i.etag for i in store.list("") if i.key != INGEST_LOCK_KEY}
    assert now == before
    for prefix in COMPARED:
        assert not list(store.list(prefix)), prefix
    if store.exists(INGEST_LOCK_KEY):
        lock = json.loads(store.get_bytes(INGEST_LOCK_KEY))
        # Not renewed any more (the run is over): stale a TTL after its last renewal at most,
        # then the next run takes it over.
        assert float(lock["expires_at"]) <= time.time() + INGEST_LOCK_TTL_S
        assert not IngestLock(store).is_live(lock, now=time.time() + INGEST_LOCK_TTL_S + 1)


def test_ingest_against_a_dead_store_fails_in_time_and_writes_nothing(
        seaweed: str, prefect_harness: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request fails from the start (blackholes included): the run stops at the lock."""
    from flows.ingest import ingest_flow

    store = new_bucket(seaweed)
    fill(store, incoming())
    before = {i.key: i.etag for i in store.list("")}
    started = time.monotonic()
    with Through(monkeypatch, proxy(seaweed, 1.0, KINDS), GIVE_UP) as faults:
        state = ingest_flow.with_options(timeout_seconds=120)(
            data_url=f"s3://{store.bucket}", return_state=True, **RUN_PARAMETERS)
    elapsed = time.monotonic() - started
    record("ingest at 100% from the start", faults, f"failed after {elapsed:.0f} s")
    assert state.is_failed()
    assert elapsed < 180  # two short tries of the lock's first request, or the 120 s limit
    assert_nothing_half_written(store, before)
    text = flow_logs(state.state_details.flow_run_id)
    assert any(word in text for word in CAUSES), text[-3000:]


def test_ingest_whose_store_dies_mid_run_fails_in_time_and_writes_nothing(
        seaweed: str, prefect_harness: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store answers until the first chunk reads its first image (the lock is held, the
    ledger and labels loaded, incoming/ listed), then fails every request: the chunk task's
    tries all fail within the client limits, the flow fails with the cause logged."""
    from flows.ingest import ingest_flow

    store = new_bucket(seaweed)
    fill(store, incoming())
    before = {i.key: i.etag for i in store.list("")}
    trigger = f"GET /{store.bucket}/{layout.INCOMING}".encode()
    kinds = itertools.cycle(DEAD)
    dead: list[bool] = []

    def choose(head: bytes) -> str | None:
        if not dead and head.startswith(trigger):
            dead.append(True)
        return next(kinds) if dead else None

    started = time.monotonic()
    with Through(monkeypatch, proxy(seaweed, 0.0, DEAD, choose=choose), GIVE_UP) as faults:
        state = ingest_flow.with_options(timeout_seconds=600)(
            data_url=f"s3://{store.bucket}", return_state=True, **RUN_PARAMETERS)
    elapsed = time.monotonic() - started
    record("ingest at 100% from the first image read", faults,
           f"failed after {elapsed:.0f} s")
    assert dead, "the store never died: no image was read"
    assert state.is_failed()
    # The run's final state names what failed (an image read), not a lock release that
    # failed after it on the same dead store (that lock expires on its own).
    assert f"cannot read '{layout.INCOMING}" in str(state.message), state.message
    # Its limits: four tries of the chunk task (waits 2 + 10 + 30 s between them), each
    # ending once its requests have spent two short tries; far below the flow's timeout.
    assert elapsed < 400
    assert_nothing_half_written(store, before)
    text = flow_logs(state.state_details.flow_run_id)
    # The cause: which image could not be read, and the server's (or network's) answer.
    assert f"cannot read '{layout.INCOMING}" in text, text[-3000:]
    assert any(word in text for word in CAUSES), text[-3000:]


def test_a_failed_release_never_hides_the_runs_own_error(
        local_store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store dies inside the locked block: the block's error is what the run raises
    (its cause), not the release's; a release failure on its own still raises."""
    def dead(key: str) -> bytes:
        raise StorageError(f"cannot read {key!r}: the store is gone")

    with (pytest.raises(ConnectionError, match="the first image"),
          IngestLock(local_store, settle=0.01, wait=0)):
        monkeypatch.setattr(local_store, "get_bytes", dead)
        raise ConnectionError("the first image could not be read")
    monkeypatch.undo()
    assert local_store.exists(INGEST_LOCK_KEY)  # left behind: it expires on its own

    with (pytest.raises(StorageError, match="the store is gone"),
          IngestLock(local_store, settle=0.01, wait=0, key="state/other.lock.json")):
        monkeypatch.setattr(local_store, "get_bytes", dead)


def test_print_the_fault_table() -> None:
    """Last in the module: the faults injected by the tests above, and their outcome."""
    for name, injected in INJECTED.items():
        print(f"{name}: {injected}")
