"""Retention: `malaria gc` (alias `prune`) keeps the newest of each kind and anything younger
than its age limit, every checkpoint set a registered model came from, and any set a run may
still be writing; the ledger keeps every row."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from malaria.core import layout
from malaria.ingest.ledger import load_ledger
from malaria.ingest.manifest import ACCEPTED, RETRACTED, ManifestRow, rows_to_csv
from malaria.io.store import LocalStore
from malaria.registry import retention
from malaria.registry.registry import ModelRegistry
from malaria.registry.retention import Group, RetentionPolicy

DAY = 86400.0
NOW = time.time()
# Counts alone decide in most tests here: no age keeps anything.
NO_AGE = {"checkpoint_max_age_days": 0.0, "report_max_age_days": 0.0,
          "alert_max_age_days": 0.0}


def _put(store: LocalStore, key: str, age_days: float, data: bytes = b"x") -> None:
    """An object whose last-modified time is ``age_days`` ago."""
    store.put_bytes(key, data)
    stamp = NOW - age_days * DAY
    os.utime(store.root / key, (stamp, stamp))


def _checkpoint(store: LocalStore, run_key: str, age_days: float) -> str:
    prefix = layout.checkpoint_prefix(run_key)
    for name in ("last.keras", "best.weights.h5", "state.json"):
        _put(store, prefix + name, age_days)
    return prefix


def _register(store: LocalStore, tmp_path: Path, version: str, config: dict[str, object],
              manifest: str) -> None:
    model = tmp_path / "model.keras"
    model.write_bytes(b"not really a model")
    ModelRegistry(store).register(version, model, {"config": config,
                                                   "data_manifest_sha256": manifest}, {})


def test_plan_keeps_newest_protected_and_active_groups() -> None:
    now = datetime.now(UTC)

    def group(kind: str, name: str, age_days: float) -> Group:
        return Group(kind, name, (name + "f",), now - timedelta(days=age_days), 10)

    groups = [group(retention.CHECKPOINTS, f"checkpoints/c{i}/", 2 + i) for i in range(5)]
    groups += [group(retention.CHECKPOINTS, "checkpoints/running/", 0.1)]
    groups += [group(retention.REPORTS, f"reports/r{i}/", i) for i in range(4)]
    policy = RetentionPolicy(keep_checkpoints=2, keep_reports=1, **NO_AGE)
    pruning = retention.plan(groups, policy, protected={"checkpoints/c4/"}, now=now)
    deleted = {g.name for g in pruning.delete}
    # The running set is newest, so it takes one of the two places; c0 the other.
    assert deleted == {"checkpoints/c1/", "checkpoints/c2/", "checkpoints/c3/",
                       "reports/r1/", "reports/r2/", "reports/r3/"}
    reasons = {g.name: why for g, why in pruning.keep}
    assert reasons["checkpoints/c4/"] == retention.PROTECTED_REASON
    assert "not among the newest 1" in pruning.why["reports/r3/"]
    # Written within the grace period: kept even with no place left among the newest.
    tight = retention.plan(groups, RetentionPolicy(keep_checkpoints=0, **NO_AGE), now=now)
    assert "checkpoints/running/" not in {g.name for g in tight.delete}
    assert "in progress" in {g.name: why for g, why in tight.keep}["checkpoints/running/"]


def test_lineage_matches_the_trainers_checkpoint_prefix() -> None:
    from malaria.model.checkpoints import checkpoint_prefix
    from malaria.model.config import RetrainConfig

    config = RetrainConfig(arch="cellnet-tiny", input_size=48, epochs=3)
    record = {"config": asdict(config), "data_manifest_sha256": "ab" * 32}
    # Through JSON, as the record is stored (tuples become lists).
    import json

    record = json.loads(json.dumps(record))
    assert retention.lineage_checkpoint(record) == checkpoint_prefix(config, "ab" * 32)
    assert retention.lineage_checkpoint({"version": "old"}) is None


def test_prune_bucket_keeps_lineage_newest_and_running(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    config = {"arch": "cellnet-tiny", "epochs": 3}
    lineage = retention.lineage_checkpoint({"config": config, "data_manifest_sha256": "m1"})
    assert lineage is not None
    _register(store, tmp_path, "v1", config, "m1")
    old_model_set = _checkpoint(store, lineage.split("/")[1], age_days=90)
    sets = [_checkpoint(store, f"run{i}", age_days=10 + i) for i in range(4)]
    running = _checkpoint(store, "running", age_days=0.01)
    for i in range(5):
        _put(store, layout.report_key(f"nightly-{i}", "cells.gif"), age_days=i)
        _put(store, layout.alert_key(datetime(2026, 1, 1 + i, tzinfo=UTC), f"run{i}"), i)

    policy = RetentionPolicy(keep_checkpoints=2, keep_reports=2, keep_alerts=3, **NO_AGE)
    before = sorted(i.key for i in store.list())
    dry = retention.plan_bucket(store, policy)
    assert sorted(i.key for i in store.list()) == before  # planning changes nothing
    retention.apply(store, dry)
    left = {i.key for i in store.list()}
    groups = {layout.checkpoint_group(k) for k in left if k.startswith(layout.CHECKPOINTS)}
    # Newest two are the running set and run0; the model's set stays, however old.
    assert groups == {old_model_set, running, sets[0]}
    assert all(f"{s}state.json" in left for s in groups)  # whole sets, never half
    assert {layout.report_group(k) for k in left if k.startswith(layout.REPORTS)} == {
        layout.report_prefix("nightly-0"), layout.report_prefix("nightly-1")}
    assert len([k for k in left if k.startswith(layout.ALERTS)]) == 3
    assert ModelRegistry(store).versions() == ["v1"]  # records untouched


def test_a_set_that_grew_after_planning_is_left_alone(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    prefix = _checkpoint(store, "resumed", age_days=40)
    pruning = retention.plan_bucket(store, RetentionPolicy(keep_checkpoints=0, **NO_AGE))
    assert [g.name for g in pruning.delete] == [prefix]
    _put(store, prefix + "epoch-9.keras", age_days=0)  # a run resumed on it meanwhile
    retention.apply(store, pruning)
    assert store.exists(prefix + "last.keras")


def _row(run: str, key: str, sha: str, outcome: str = ACCEPTED) -> ManifestRow:
    return ManifestRow(run_id=run, source_key=key, size=1, etag=f"e-{key}", outcome=outcome,
                       label="Parasitized", sha256=sha, dataset_key=f"dataset/P/s/{key}")


def test_ledger_compaction_keeps_every_row_in_order(tmp_path: Path) -> None:
    from malaria.ingest.compaction import compact_ledger

    store = LocalStore(tmp_path / "bucket")
    sha = [f"{i:064x}" for i in range(6)]
    parts = [[_row("ingest-1", "a", sha[0]), _row("ingest-1", "b", sha[1])],
             [_row("ingest-2", "c", sha[2]), _row("ingest-2", "=cmd", sha[3])],
             [_row("ingest-3", "b", sha[1], outcome=RETRACTED)]]
    for index, rows in enumerate(parts):
        store.put_bytes(layout.ingest_ledger_key(f"ingest-2026010{index}T000000-aa", 0),
                        rows_to_csv(rows))
    before = load_ledger(store)
    # Every part but the newest, which the compacted part sorts right before.
    assert compact_ledger(store, max_parts=1, dry_run=True).merged == 2
    assert load_ledger(store).parts == 3  # a dry run merges nothing
    assert compact_ledger(store, max_parts=1, settle_s=0.0).merged == 2
    after = load_ledger(store)
    assert after.parts == 2
    assert (after.sources, after.content, after.dataset_keys) == (
        before.sources, before.content, before.dataset_keys)
    # A part written later sorts after the merged one, so it still replays last.
    later = layout.ingest_ledger_key("ingest-20260201T000000-bb", 0)
    assert sorted([later, *(i.key for i in store.list(layout.INGEST_LEDGER))])[-1] == later
    assert compact_ledger(store, max_parts=5).merged == 0


def test_cache_prune_keeps_recent_images_and_the_champion(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old, fresh = cache / "64" / "ab" / "old.npy", cache / "64" / "cd" / "new.npy"
    for path, age in ((old, 60), (fresh, 1)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 100)
        os.utime(path, (NOW - age * DAY, NOW - age * DAY))
    for age, version in enumerate(["v5", "v4", "v3", "champ"]):
        folder = cache / "models" / "reg" / version
        folder.mkdir(parents=True)
        (folder / "model.keras").write_bytes(b"m")
        os.utime(folder, (NOW - age * DAY, NOW - age * DAY))
    pruning = retention.plan_cache(cache, RetentionPolicy(keep_cached_models=1),
                                   keep_versions=["champ"], now=NOW)
    assert sorted(p.name for p in pruning.delete) == ["old.npy", "v3", "v4"]
    retention.apply_cache(pruning)
    assert fresh.exists() and not old.exists()
    assert sorted(p.name for p in (cache / "models" / "reg").iterdir()) == ["champ", "v5"]


def test_cli_prune_dry_run_then_prune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from malaria_cli.main import main

    store = LocalStore(tmp_path / "bucket")
    for i in range(3):
        _checkpoint(store, f"run{i}", age_days=10 + i)
    monkeypatch.setenv("MALARIA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MALARIA_CACHE_DIR", str(tmp_path / "cache"))
    args = ["prune", "--data-url", store.url, "--keep-checkpoints", "1", "--max-age-days", "0"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete    2" in out
    assert len({layout.checkpoint_group(i.key) for i in store.list()}) == 3
    assert main(args) == 0
    assert {layout.checkpoint_group(i.key) for i in store.list()} == {
        layout.checkpoint_prefix("run0")}
