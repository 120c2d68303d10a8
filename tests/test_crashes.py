"""Crashes and retries (issue 13, point 3): the flow-run process is SIGKILLed at seeded random
points during ingest, training and scoring, run as the deployments run them (the flow in a
child process, against the shared Prefect test server and the session's SeaweedFS); a re-run
must converge to a fault-free run's outputs: nothing lost, nothing twice, training resumed from
its checkpoint. A Prefect retry of each writing task after it wrote (and before it returned)
must leave the outputs of one clean try.

A kill point is a count of store writes (put, copy, delete): the child dies right before its
``n``-th write. The fault-free run counts its writes ``W``; seed ``i`` of 3 draws ``n`` in the
``i``-th third of ``[1, W]``, so early, middle and late points are all covered.

Compared: every object's key and bytes, except fields stamped by design with a time or a run
id (ingest: ledger and sidecar ``run_id``, sidecar ``quarantined_at``, the per-run
``manifests/<run>.csv``; scoring: ``scored_at``; training: the version name and everything a
retrained model's numbers decide, see ``training_outputs``).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from malaria.core import layout
from malaria.io.s3 import S3Store
from malaria_dev.synthetic import bad_inputs, generate_cells, generate_scan_cells

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
WRITES = ("put_bytes", "put_file", "put_if_absent", "put_if_match", "copy", "delete")

CHILD = textwrap.dedent("""
    import itertools, json, os, signal, sys
    from malaria.io.s3 import S3Store

    pipeline, kill_at, parameters = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    count = itertools.count(1)  # next() is atomic: chunks and heartbeats write from threads

    def counted(real):
        def write(self, *args, **kwargs):
            if next(count) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # before this write; no cleanup at all
            return real(self, *args, **kwargs)
        return write

    for name in WRITES_HERE:
        setattr(S3Store, name, counted(getattr(S3Store, name)))
    if pipeline == "ingest":
        from flows.ingest import ingest_flow as run
    elif pipeline == "score":
        from flows.score import score_flow as run
    else:
        from flows.train import train_flow as run
    run(**parameters)
""").replace("WRITES_HERE", repr(WRITES))


# --------------------------------------------------------------------------- helpers


def fresh_bucket() -> S3Store:
    """Another empty bucket on the session's SeaweedFS (the environment points at it)."""
    store = S3Store(f"crash-{uuid.uuid4().hex[:12]}")
    store.ensure_bucket()
    return store


def put_all(store: S3Store, objects: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: store.put_bytes(*kv), objects.items()))


@contextmanager
def counting_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count the store writes of an in-process run (the fault-free one)."""
    count = itertools.count(1)
    seen = [0]

    def counted(real: Callable[..., Any]) -> Callable[..., Any]:
        def write(self: S3Store, *args: Any, **kwargs: Any) -> Any:
            seen[0] = next(count)
            return real(self, *args, **kwargs)
        return write

    with monkeypatch.context() as patch:
        for name in WRITES:
            patch.setattr(S3Store, name, counted(getattr(S3Store, name)))
        yield seen


def kill_points(writes: int) -> list[int]:
    """One seeded point in each third of ``[1, writes]``."""
    points = []
    for seed in SEEDS:
        rng = random.Random(seed)
        low = 1 + seed * writes // len(SEEDS)
        high = max(low, (seed + 1) * writes // len(SEEDS))
        points.append(rng.randint(low, high))
    return points


def killed_run(pipeline: str, kill_at: int, parameters: dict[str, Any]) -> int:
    """The flow run in a child process that SIGKILLs itself before write ``kill_at``."""
    from prefect.settings import PREFECT_API_URL

    print(f"crash point: {pipeline} killed before store write {kill_at}")  # shown with -s

    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    child = subprocess.Popen([sys.executable, "-c", CHILD, pipeline, str(kill_at),
                              json.dumps(parameters)], env=env, cwd=ROOT)
    try:
        child.wait(timeout=300)
    finally:
        child.kill()
    return child.returncode


def objects(store: S3Store, prefix: str = "") -> dict[str, bytes]:
    return {info.key: store.get_bytes(info.key) for info in store.list(prefix)}


def without(payload: Any, fields: set[str]) -> Any:
    if isinstance(payload, dict):
        return {k: without(v, fields) for k, v in payload.items() if k not in fields}
    if isinstance(payload, list):
        return [without(v, fields) for v in payload]
    return payload


def csv_rows(data: bytes, drop: set[str]) -> list[dict[str, str]]:
    frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    return frame.drop(columns=[c for c in frame.columns if c in drop]).to_dict("records")


# ---------------------------------------------------------------------------- ingest


def ingest_outputs(store: S3Store) -> dict[str, Any]:
    """Everything ingest leaves, minus its run stamps: dataset/ and quarantine/ byte for byte
    (sidecars without run id and time), the ledger as one multiset of rows without run id."""
    found: dict[str, Any] = {}
    ledger: list[tuple[tuple[str, str], ...]] = []
    for key, data in objects(store).items():
        if key.startswith(layout.INCOMING) or key.startswith(layout.MANIFESTS):
            continue  # the input; the per-run audit trail, one object per run by design
        if key.startswith(layout.INGEST_LEDGER):
            ledger += [tuple(sorted(r.items())) for r in csv_rows(data, {"run_id"})]
        elif key.startswith(layout.QUARANTINE) and key.endswith(".json"):
            found[key] = without(json.loads(data), {"run_id", "quarantined_at"})
        else:
            found[key] = data
    found["ledger"] = sorted(ledger)
    return found


def ingest_input() -> dict[str, bytes]:
    uploads = {f"incoming/{c.class_name}/{c.file_name}": c.data
               for c in generate_cells(40, slides=4, seed=31)}
    uploads.update({f"incoming/{b.key}": b.data for b in bad_inputs()})
    return uploads


def test_ingest_killed_at_random_points_converges(seaweed_bucket: S3Store, prefect_harness: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.ingest import ingest_flow

    uploads = ingest_input()
    put_all(seaweed_bucket, uploads)
    parameters = {"chunk_size": 16, "concurrency": 4}
    with counting_writes(monkeypatch) as writes:
        clean = ingest_flow(data_url=seaweed_bucket.url, **parameters)
    assert clean["balanced"] and clean["listed"] == len(uploads)
    expected = ingest_outputs(seaweed_bucket)
    reads = [dict(row) for row in expected["ledger"] if dict(row)["outcome"] != "retracted"]
    assert sorted(r["source_key"] for r in reads) == sorted(uploads)  # each once

    for kill_at in kill_points(writes[0]):
        store = fresh_bucket()
        put_all(store, uploads)
        assert killed_run("ingest", kill_at, {"data_url": store.url, **parameters}) == -9
        rerun = ingest_flow(data_url=store.url, **parameters)
        assert rerun["balanced"] and rerun["listed"] == len(uploads)
        assert ingest_outputs(store) == expected, f"killed before write {kill_at}"
        assert not store.exists(layout.INGEST_LOCK_KEY)
        again = ingest_flow(data_url=store.url, **parameters)
        assert again["already_ingested"] == len(uploads)


# --------------------------------------------------------------------------- scoring

SCAN_SLIDES = {"601": 7, "602": 5, "603": 4}


def scan_input() -> dict[str, bytes]:
    return {layout.scan_key(slide, cell.file_name): cell.data
            for slide, n in SCAN_SLIDES.items()
            for cell in generate_scan_cells(n, slide_id=int(slide), seed=5)}


def scoring_outputs(store: S3Store) -> dict[str, Any]:
    """predictions/ and the scoring state without the ``scored_at`` stamps; leases and parts
    must be gone after a finished run."""
    found: dict[str, Any] = {}
    for key, data in objects(store).items():
        if key.startswith(layout.SCANS):
            continue
        if key.endswith(".csv"):
            found[key] = csv_rows(data, {"scored_at"})
        elif key.endswith(".json"):
            found[key] = without(json.loads(data), {"scored_at"})
        else:
            found[key] = data
    return found


def test_scoring_killed_at_random_points_converges(
        seaweed_bucket: S3Store, prefect_harness: None, tiny_model: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.score import score_flow

    scans = scan_input()
    put_all(seaweed_bucket, scans)
    parameters = {"model_path": str(tiny_model), "shard_size": 3, "parallel_shards": 1,
                  "lease_settle_s": 0.05}
    with counting_writes(monkeypatch) as writes:
        clean = score_flow(data_url=seaweed_bucket.url, **parameters)
    assert sorted(clean["slides_scored"]) == sorted(SCAN_SLIDES)
    expected = scoring_outputs(seaweed_bucket)
    for slide, n in SCAN_SLIDES.items():
        assert len(expected[layout.prediction_key(slide)]) == n
    assert not [k for k in expected if "/parts/" in k or "/leases/" in k]

    for kill_at in kill_points(writes[0]):
        store = fresh_bucket()
        put_all(store, scans)
        assert killed_run("score", kill_at, {"data_url": store.url, **parameters}) == -9
        rerun = score_flow(data_url=store.url, **parameters)
        assert rerun["slides_busy"] == []  # the dead run's leases were broken at once
        assert scoring_outputs(store) == expected, f"killed before write {kill_at}"
        assert score_flow(data_url=store.url, **parameters)["slides_scored"] == []


def test_a_retried_score_shard_after_its_write_changes_nothing(
        seaweed_bucket: S3Store, prefect_harness: None, tiny_model: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The worst point for a retry: the shard's part is written, then the task fails."""
    import flows.score
    import tasks.scoring
    from flows.score import score_flow

    scans = scan_input()
    parameters = {"model_path": str(tiny_model), "shard_size": 3, "parallel_shards": 1,
                  "lease_settle_s": 0.05}
    put_all(seaweed_bucket, scans)
    score_flow(data_url=seaweed_bucket.url, **parameters)
    expected = scoring_outputs(seaweed_bucket)

    store = fresh_bucket()
    put_all(store, scans)
    real = tasks.scoring.score_shard
    calls: list[Any] = []

    def written_then_failed(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        calls.append(result)
        if len(calls) == 1:
            raise ConnectionError("injected: lost after the part was written")
        return result

    monkeypatch.setattr(tasks.scoring, "score_shard", written_then_failed)
    monkeypatch.setattr(flows.score, "score_shard_task", flows.score.score_shard_task.with_options(
        retries=1, retry_delay_seconds=0))
    report = score_flow(data_url=store.url, **parameters)
    assert not calls[0].resumed and calls[1].resumed  # the retry found its part
    assert (calls[1].slide, calls[1].index) == (calls[0].slide, calls[0].index)
    # The report counts the retried shard as resumed (found written), not scored twice.
    assert report["shards_resumed"] == 1 and report["shards_scored"] == len(calls) - 2
    assert scoring_outputs(store) == expected


# -------------------------------------------------------------------------- training

TRAIN_OPTIONS: dict[str, Any] = {"arch": "cellnet-tiny", "input_size": 32, "epochs": 3,
                                 "batch_size": 32, "tta": False, "min_auc": 0.0,
                                 "min_accuracy": 0.0}


def train_input() -> dict[str, bytes]:
    return {layout.dataset_key(c.class_name, str(c.slide_id), c.file_name): c.data
            for c in generate_cells(160, slides=8, seed=6)}


def training_outputs(store: S3Store) -> dict[str, Any]:
    """What a training run leaves, where a resumed run must match a fault-free one.

    A resumed fit is reseeded per epoch and TensorFlow's CPU kernels are not bit-exact, so
    weights, metric values, plots and the model file's bytes are not compared; the version
    name and ``created_at`` are stamps. Compared: which objects exist (one version, its files,
    the champion and its one promotion, one complete checkpoint set), and the record's data
    and settings: data manifest hash, slides, cell counts, config, epochs run."""
    found: dict[str, Any] = {}
    versions = sorted({k.split("/")[1] for k in objects(store, layout.MODELS)
                       if k != layout.CHAMPION_KEY})
    found["versions"] = len(versions)
    for version in versions:
        prefix = layout.model_prefix(version)
        found["files"] = sorted(k[len(prefix):] for k in objects(store, prefix))
        record = json.loads(store.get_bytes(prefix + "metrics.json"))
        found["record"] = {k: record[k] for k in ("data_manifest_sha256", "slides", "cells",
                                                  "config", "architecture", "input_size")}
        found["epochs_run"] = record["training"]["epochs_run"]
    champion = json.loads(store.get_bytes(layout.CHAMPION_KEY))
    found["champion"] = (champion["version"] in versions,
                         [e["action"] for e in champion["history"]])
    checkpoints = objects(store, layout.CHECKPOINTS)
    pointers = [k for k in checkpoints if k.endswith(layout.CHECKPOINT_POINTER_FILE)]
    found["checkpoint_pointers"] = len(pointers)
    pointer = json.loads(checkpoints[pointers[0]])
    found["checkpoint_epoch"] = pointer["epoch"]
    found["checkpoint_objects"] = len(checkpoints) == 1 + len(pointer["files"])
    return found


def pointer_epoch(store: S3Store) -> int:
    """The epoch of the last complete checkpoint set in the bucket (0: none)."""
    pointers = [k for k in objects(store, layout.CHECKPOINTS)
                if k.endswith(layout.CHECKPOINT_POINTER_FILE)]
    return json.loads(store.get_bytes(pointers[0]))["epoch"] if pointers else 0


@pytest.fixture
def resumed_from(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``resumed_from_epoch`` of every in-process training call."""
    import malaria.model.candidate as candidate

    real = candidate.train_candidate
    seen: list[int] = []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        seen.append(result.resumed_from_epoch)
        return result

    monkeypatch.setattr(candidate, "train_candidate", recorded)
    return seen


def test_training_killed_at_random_points_resumes_and_converges(
        seaweed_bucket: S3Store, prefect_harness: None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, resumed_from: list[int]) -> None:
    from flows.train import train_flow

    cells = train_input()
    put_all(seaweed_bucket, cells)
    with counting_writes(monkeypatch) as writes:
        clean = train_flow(data_url=seaweed_bucket.url, cache_dir=str(tmp_path / "clean"),
                           **TRAIN_OPTIONS)
    assert clean["promoted"] and resumed_from == [0]
    expected = training_outputs(seaweed_bucket)
    assert expected["versions"] == 1 and expected["checkpoint_epoch"] == 3

    resumes: list[tuple[int, int]] = []
    for seed, kill_at in zip(SEEDS, kill_points(writes[0]), strict=True):
        store = fresh_bucket()
        put_all(store, cells)
        cache = str(tmp_path / f"cache-{seed}")
        assert killed_run("train", kill_at, {"data_url": store.url, "cache_dir": cache,
                                             **TRAIN_OPTIONS}) == -9
        saved = pointer_epoch(store)
        resumed_from.clear()
        rerun = train_flow(data_url=store.url, cache_dir=cache, **TRAIN_OPTIONS)
        assert rerun["promoted"]
        # Resumed from the last complete set the killed run left, never from a torn one.
        assert resumed_from == [saved], f"killed before write {kill_at}"
        assert training_outputs(store) == expected, f"killed before write {kill_at}"
        resumes.append((kill_at, saved))
    # The seeded points cover a resume mid-training, not only before or after it.
    assert any(0 < epoch < TRAIN_OPTIONS["epochs"] for _, epoch in resumes), resumes


def test_a_retried_register_after_its_write_registers_one_version(
        seaweed_bucket: S3Store, prefect_harness: None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """register-candidate's retry after metrics.json landed must not register the model a
    second time under another version name."""
    import flows.train
    import tasks.training
    from flows.train import train_flow
    from malaria.registry.registry import ModelRegistry

    put_all(seaweed_bucket, train_input())
    real = ModelRegistry.register
    tries: list[str] = []

    def written_then_failed(self: ModelRegistry, version: str, *args: Any, **kwargs: Any
                            ) -> str:
        key = real(self, version, *args, **kwargs)
        tries.append(version)
        if len(tries) == 1:
            raise ConnectionError("injected: lost after metrics.json was written")
        return key

    monkeypatch.setattr(tasks.training.ModelRegistry, "register", written_then_failed)
    monkeypatch.setattr(flows.train, "register_candidate",
                        flows.train.register_candidate.with_options(retries=1,
                                                                    retry_delay_seconds=0))
    result = train_flow(data_url=seaweed_bucket.url, cache_dir=str(tmp_path / "cache"),
                        **TRAIN_OPTIONS)
    registry = ModelRegistry(seaweed_bucket)
    assert tries and registry.versions() == [tries[0]] == [result["version"]]
    assert registry.champion_version() == result["version"]
    outputs = training_outputs(seaweed_bucket)
    assert outputs["versions"] == 1 and outputs["champion"] == (True, ["promote"])
