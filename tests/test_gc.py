"""`malaria gc` and the weekly `gc` flow: retention by age and count, ledger compaction that
leaves the same ledger whatever moment it dies at, and the records no collection touches."""

from __future__ import annotations

import os
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from malaria.core import layout
from malaria.ingest import compaction
from malaria.ingest.compaction import COMPACTION_INTENT_KEY, compact_ledger, part_keys
from malaria.ingest.corrections import corrections_ledger_key, load_dataset_index
from malaria.ingest.ledger import Ledger, load_ledger
from malaria.ingest.lock import INGEST_LOCK_KEY, IngestLock
from malaria.ingest.manifest import (
    ACCEPTED,
    DUPLICATE,
    EXCLUDED,
    LABEL_CONFLICT,
    QUARANTINED,
    RELABELLED,
    RETRACTED,
    ManifestRow,
    read_rows,
    rows_to_csv,
)
from malaria.io.store import LocalStore
from malaria.registry import retention
from malaria.registry.lineage import LineageRow
from malaria.registry.registry import ModelRegistry
from malaria.registry.retention import Group, PrunePlan, RetentionPolicy

DAY = 86400.0
NOW = time.time()
# Every count 0, every age 0, no grace: whatever may go, goes.
AGGRESSIVE = RetentionPolicy(keep_checkpoints=0, checkpoint_max_age_days=0.0, keep_reports=0,
                             report_max_age_days=0.0, keep_alerts=0, alert_max_age_days=0.0,
                             max_ledger_parts=0, active_grace_s=0.0, cache_max_age_days=0.0,
                             keep_cached_models=0)


def _put(store: LocalStore, key: str, age_days: float, data: bytes = b"x") -> None:
    store.put_bytes(key, data)
    stamp = NOW - age_days * DAY
    os.utime(store.root / key, (stamp, stamp))


def _state(ledger: Ledger) -> tuple[object, ...]:
    return ledger.sources, ledger.content, ledger.dataset_keys, ledger.reviewed


def _index(store: LocalStore) -> tuple[object, ...]:
    index = load_dataset_index(store)
    return index.cells, index.by_source, index.gone


def _rows(store: LocalStore) -> list[ManifestRow]:
    return [row for key in part_keys(store) for row in read_rows(store.get_bytes(key))]


def _sha(n: int) -> str:
    return f"{n:064x}"


def _accepted(run: str, key: str, n: int, label: str = "Parasitized") -> ManifestRow:
    return ManifestRow(run_id=run, source_key=f"incoming/{key}", size=1, etag=f"e{n}",
                       outcome=ACCEPTED, label=label, slide="s", sha256=_sha(n),
                       dataset_key=f"dataset/{label}/s/{key}")


def _verdict(run: str, row: ManifestRow, outcome: str, label: str = "") -> ManifestRow:
    """A label correction on ``row``'s cell: relabelled to ``label``, or excluded."""
    moved = row.dataset_key.replace(row.label, label) if outcome == RELABELLED else ""
    return ManifestRow(run_id=run, source_key=row.dataset_key, size=1, etag="", outcome=outcome,
                       label=label, slide="s", sha256=row.sha256, dataset_key=moved)


def _ledger_with_corrections(store: LocalStore) -> int:
    """Three runs: chunk parts, then runs whose corrections part relabels and excludes cells
    of earlier runs (it sorts before their chunk parts), and a retraction. Returns rows."""
    r1, r2, r3 = ("ingest-20260101T000000-aa", "ingest-20260102T000000-bb",
                  "ingest-20260103T000000-cc")
    a, b, c = _accepted(r1, "a.png", 1), _accepted(r1, "b.png", 2), _accepted(r1, "c.png", 3)
    parts = {
        layout.ingest_ledger_key(r1, 0): [a, b],
        layout.ingest_ledger_key(r1, 1): [c, ManifestRow(r1, "incoming/bad.png", 1, "e9",
                                                         QUARANTINED, reason="decode")],
        corrections_ledger_key(r2): [_verdict(r2, a, RELABELLED, "Uninfected"),
                                     _verdict(r2, b, EXCLUDED)],
        layout.ingest_ledger_key(r2, 0): [
            _accepted(r2, "d.png", 4),
            ManifestRow(r2, "incoming/dup.png", 1, "e10", DUPLICATE, sha256=_sha(4)),
            ManifestRow(r2, "incoming/c2.png", 1, "e11", QUARANTINED, reason=LABEL_CONFLICT,
                        sha256=_sha(3), label="Uninfected"),
            ManifestRow(r2, "incoming/c.png", 1, "e3", RETRACTED, sha256=_sha(3),
                        dataset_key=c.dataset_key)],
        # A run whose only part is its corrections: moves a's cell back.
        corrections_ledger_key(r3): [_verdict(r3, _verdict(r2, a, RELABELLED, "Uninfected"),
                                              RELABELLED, "Parasitized")],
    }
    for key, rows in parts.items():
        store.put_bytes(key, rows_to_csv(rows))
    return sum(len(rows) for rows in parts.values())


class CrashingStore(LocalStore):
    """A local store whose process 'dies' (raises) at a chosen write or delete."""

    crash_on_put: str | None = None
    deletes_before_crash: int | None = None

    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        if key == self.crash_on_put:
            raise SystemExit("crash while writing the compacted part")
        super().put_file(key, path, content_type=content_type)

    def delete(self, key: str) -> None:
        if key.startswith(layout.INGEST_LEDGER) and self.deletes_before_crash is not None:
            if self.deletes_before_crash == 0:
                raise SystemExit("crash between two deletes")
            self.deletes_before_crash -= 1
        super().delete(key)


# ------------------------------------------------------------------------ ledger compaction


def test_compaction_keeps_the_state_and_corrections_order(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    rows = _ledger_with_corrections(store)
    before, index = _state(load_ledger(store)), _index(store)
    # The corrections part of a run replays before its chunk parts, as the run applied it.
    keys = part_keys(store)
    assert keys.index(corrections_ledger_key("ingest-20260102T000000-bb")) < keys.index(
        layout.ingest_ledger_key("ingest-20260102T000000-bb", 0))
    result = compact_ledger(store, max_parts=1, settle_s=0.0)
    # The newest part (a run's corrections, its only part) stays; the compacted part sorts
    # right before it and after all it merged.
    newest = corrections_ledger_key("ingest-20260103T000000-cc")
    assert result.merged == 4 and result.compacted_key is not None
    assert part_keys(store) == [result.compacted_key, newest]
    assert len(_rows(store)) == rows  # every row once
    assert _state(load_ledger(store)) == before
    assert _index(store) == index
    assert not store.exists(COMPACTION_INTENT_KEY) and not store.exists(INGEST_LOCK_KEY)
    # A compacted part and the newest: nothing to merge however low the limit.
    assert compact_ledger(store, max_parts=0, settle_s=0.0).merged == 0


@pytest.mark.parametrize("deletes", range(4))
def test_a_crash_between_deletes_leaves_the_same_ledger(tmp_path: Path, deletes: int) -> None:
    """Dies after writing the compacted part and ``deletes`` deletes: the ledger loads to the
    same state, parts and compacted part together; the next compaction finishes the job."""
    store = CrashingStore(tmp_path / "bucket")
    rows = _ledger_with_corrections(store)
    before, index = _state(load_ledger(store)), _index(store)
    store.deletes_before_crash = deletes
    with pytest.raises(SystemExit):
        compact_ledger(store, max_parts=1, settle_s=0.0)
    store.deletes_before_crash = None
    assert store.exists(COMPACTION_INTENT_KEY)
    assert len(part_keys(store)) == 6 - deletes  # the compacted part and what was left
    assert _state(load_ledger(store)) == before  # duplicates replay to the same state
    assert _index(store) == index  # and so does the corrections' replay of the ledger
    finished = compact_ledger(store, max_parts=1, settle_s=0.0)
    assert finished.finished == 4 - deletes
    assert len(part_keys(store)) == 2 and len(_rows(store)) == rows  # no row twice
    assert _state(load_ledger(store)) == before and _index(store) == index
    assert not store.exists(COMPACTION_INTENT_KEY)


def test_a_crash_while_writing_the_compacted_part_changes_nothing(tmp_path: Path) -> None:
    store = CrashingStore(tmp_path / "bucket")
    _ledger_with_corrections(store)
    keys, before = part_keys(store), _state(load_ledger(store))
    store.crash_on_put = layout.ingest_ledger_compacted_key(keys[-1])
    with pytest.raises(SystemExit):
        compact_ledger(store, max_parts=1, settle_s=0.0)
    store.crash_on_put = None
    assert part_keys(store) == keys and _state(load_ledger(store)) == before
    assert compact_ledger(store, max_parts=1, settle_s=0.0).merged == 4
    assert _state(load_ledger(store)) == before


def _random_rows(rng: random.Random, run: str, count: int) -> list[ManifestRow]:
    """Rows over a few keys and contents, so that later rows overwrite earlier ones."""
    out = []
    for _ in range(count):
        key, n = f"k{rng.randrange(6)}.png", rng.randrange(5)
        kind = rng.choice([ACCEPTED, ACCEPTED, DUPLICATE, QUARANTINED, RETRACTED, RELABELLED,
                           EXCLUDED, "conflict"])
        label = rng.choice(["Parasitized", "Uninfected"])
        if kind in (RELABELLED, EXCLUDED):
            out.append(_verdict(run, _accepted(run, key, n, label), kind,
                                "Uninfected" if label == "Parasitized" else "Parasitized"))
        elif kind == "conflict":
            out.append(ManifestRow(run, f"incoming/{key}", 1, f"e{n}", QUARANTINED,
                                   reason=LABEL_CONFLICT, sha256=_sha(n)))
        elif kind == RETRACTED:
            out.append(ManifestRow(run, f"incoming/{key}", 1, f"e{n}", RETRACTED,
                                   sha256=_sha(n), dataset_key=f"dataset/{label}/s/{key}"))
        else:
            row = _accepted(run, key, n, label)
            out.append(row if kind == ACCEPTED else ManifestRow(
                run, row.source_key, 1, row.etag, kind, sha256=row.sha256))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_every_crash_point_loads_to_the_same_state(tmp_path: Path, seed: int) -> None:
    """Random ledgers (corrections parts included) killed after each delete in turn."""
    rng = random.Random(seed)
    rows_by_key: dict[str, list[ManifestRow]] = {}
    for day in range(1, 5):
        run = f"ingest-202601{day:02d}T000000-{seed:02d}"
        if rng.random() < 0.6:
            rows_by_key[corrections_ledger_key(run)] = _random_rows(rng, run, 4)
        for chunk in range(rng.randrange(0 if rows_by_key else 2, 3)):
            rows_by_key[layout.ingest_ledger_key(run, chunk)] = _random_rows(rng, run, 5)
    merged = len(rows_by_key)  # all but the newest part, added last
    last = "ingest-20260109T000000-zz"
    rows_by_key[layout.ingest_ledger_key(last, 0)] = _random_rows(rng, last, 5)
    total = sum(len(rows) for rows in rows_by_key.values())
    for deletes in range(merged):
        store = CrashingStore(tmp_path / f"bucket-{deletes}")
        for key, rows in rows_by_key.items():
            store.put_bytes(key, rows_to_csv(rows))
        before = _state(load_ledger(store))
        store.deletes_before_crash = deletes
        with pytest.raises(SystemExit):
            compact_ledger(store, max_parts=1, settle_s=0.0)
        assert _state(load_ledger(store)) == before, f"crash after {deletes} deletes"
        store.deletes_before_crash = None
        compact_ledger(store, max_parts=1, settle_s=0.0)
        assert _state(load_ledger(store)) == before and len(_rows(store)) == total


def test_compaction_holds_the_ingest_lock_and_waits_for_an_ingest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "bucket")
    _ledger_with_corrections(store)
    keys = part_keys(store)
    # An ingest run holds the lock: compaction waits, then leaves the ledger as it is.
    with IngestLock(store, label="ingest run", settle=0.0):
        report = retention.run_gc(store, AGGRESSIVE, lock_wait_s=0.2, settle_s=0.0)
    assert "ingest run" in report.ledger_skipped and report.ledger is None
    assert part_keys(store) == keys
    assert any("left for next time" in line for line in report.lines())
    # Once free, compaction runs holding it: written while the lock is ours.
    seen: list[str] = []
    merge = compaction.merge_parts

    def watching(*args: object) -> None:
        seen.append(store.get_bytes(INGEST_LOCK_KEY).decode())
        merge(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(compaction, "merge_parts", watching)
    assert retention.run_gc(store, AGGRESSIVE, settle_s=0.0).ledger is not None
    assert len(seen) == 1 and "malaria gc: ledger compaction" in seen[0]
    assert len(part_keys(store)) == 2


# ------------------------------------------------------------------------ the policy


def test_a_group_goes_only_beyond_the_count_and_past_the_age() -> None:
    now = datetime.now(UTC)
    groups = [Group(retention.REPORTS, f"reports/r{age}/", (f"reports/r{age}/a.gif",),
                    now - timedelta(days=age), 1) for age in (1, 5, 20, 40, 60)]
    pruning = retention.plan(groups, RetentionPolicy(keep_reports=2, report_max_age_days=30),
                             now=now)
    assert {g.name for g in pruning.delete} == {"reports/r40/", "reports/r60/"}
    reasons = {g.name: why for g, why in pruning.keep}
    assert reasons["reports/r20/"] == "younger than 30 days"
    assert reasons["reports/r1/"] == "among the newest 2"
    assert "60.0 days ago (limit 30)" in pruning.why["reports/r60/"]
    # Old but among the newest: a quiet month does not empty a kind.
    quiet = retention.plan(groups[3:], RetentionPolicy(keep_reports=2, report_max_age_days=30),
                           now=now)
    assert not quiet.delete


def test_apply_refuses_a_plan_that_names_a_record(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    store.put_bytes("models/v1/model.keras", b"m")
    store.put_bytes("reports/r/a.gif", b"g")
    bad = Group(retention.REPORTS, "reports/r/", ("reports/r/a.gif", "models/v1/model.keras"),
                datetime.now(UTC), 2)
    with pytest.raises(retention.RetentionError):
        retention.apply(store, PrunePlan(delete=[bad]))
    assert store.exists("models/v1/model.keras") and store.exists("reports/r/a.gif")


def _register(store: LocalStore, tmp_path: Path, version: str, manifest: str) -> str:
    model = tmp_path / f"{version}.keras"
    model.write_bytes(b"not really a model")
    config = {"arch": "cellnet-tiny", "epochs": 3}
    lineage = [LineageRow(f"dataset/Parasitized/s/{version}.png", "e", "Parasitized", "s",
                          "train")]
    ModelRegistry(store).register(version, model, {"config": config,
                                                   "data_manifest_sha256": manifest}, {},
                                  lineage=lineage)
    prefix = retention.lineage_checkpoint({"config": config, "data_manifest_sha256": manifest})
    assert prefix is not None
    return prefix


def _checkpoint(store: LocalStore, prefix: str, age_days: float) -> None:
    for name in ("LATEST.json", "sets/0123456789abcdef/last.keras"):
        _put(store, prefix + name, age_days)


def test_aggressive_gc_never_touches_lineage_or_reported_results(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    registry = ModelRegistry(store)
    lineages = {v: _register(store, tmp_path, v, f"m-{v}") for v in ("v1", "v2", "v3")}
    registry.promote("v1", reason="first")
    registry.promote("v2", reason="better")  # champion v2; v1 stays in the history
    for prefix in lineages.values():
        _checkpoint(store, prefix, age_days=400)
    for run in ("old-a", "old-b"):
        _checkpoint(store, layout.checkpoint_prefix(run), age_days=400)
    records = {
        "predictions/slide1.csv", layout.PREDICTION_SUMMARY_KEY,
        layout.prediction_history_key("slide1", "f" * 16, "v1"),
        layout.manifest_key("ingest-20250101T000000-aa"),
        layout.correction_applied_key("verdicts.csv", datetime(2025, 1, 1, tzinfo=UTC)),
        "labels/extra.csv", "dataset/Parasitized/s/a.png", "quarantine/decode/x.png",
        "scans/slide1/c.png", "incoming/new.png",
    }
    for key in records:
        _put(store, key, age_days=400)
    for i in range(3):
        _put(store, layout.report_key(f"nightly-{i}", "cells.gif"), age_days=400)
        _put(store, layout.alert_key(datetime(2025, 1, 1 + i, tzinfo=UTC), f"r{i}"), 400)
    _ledger_with_corrections(store)
    ledger_before = _state(load_ledger(store))
    kept = {i.key: store.get_bytes(i.key) for i in store.list()
            if i.key.startswith((layout.MODELS, layout.PREDICTIONS, layout.MANIFESTS,
                                 layout.LABELS, layout.DATASET, layout.QUARANTINE,
                                 layout.SCANS, layout.INCOMING))
            or layout.checkpoint_group(i.key) in lineages.values()}
    assert layout.lineage_key("v2") in kept and layout.CHAMPION_KEY in kept
    assert records <= set(kept)

    dry = retention.run_gc(store, AGGRESSIVE, dry_run=True, settle_s=0.0)
    assert dry.bucket.summary()[retention.CHECKPOINTS]["delete"] == 2
    assert len(part_keys(store)) == 5  # a dry run changes nothing
    report = retention.run_gc(store, AGGRESSIVE, settle_s=0.0,
                              cache_dir=tmp_path / "cache")
    assert report.protected_versions == ["v1", "v2", "v3"]
    left = {i.key for i in store.list()}
    for key, data in kept.items():  # every record and every lineage set, byte for byte
        assert key in left, key
        assert store.get_bytes(key) == data
    assert {layout.checkpoint_group(k) for k in left if k.startswith(layout.CHECKPOINTS)} == (
        set(lineages.values()))
    assert not any(k.startswith((layout.REPORTS, layout.ALERTS)) for k in left)
    assert len(part_keys(store)) == 2 and _state(load_ledger(store)) == ledger_before
    assert [r.key for r in registry.get_lineage("v2")] == ["dataset/Parasitized/s/v2.png"]
    assert registry.champion_version() == "v2"


def test_a_model_registered_after_planning_keeps_its_set(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    config = {"arch": "cellnet-tiny", "epochs": 3}
    prefix = retention.lineage_checkpoint({"config": config, "data_manifest_sha256": "m-late"})
    assert prefix is not None
    _checkpoint(store, prefix, age_days=400)
    pruning = retention.plan_bucket(store, AGGRESSIVE)
    assert [g.name for g in pruning.delete] == [prefix]
    _register(store, tmp_path, "late", "m-late")  # the gate registered it meanwhile
    assert retention.apply(store, pruning) == 0
    assert store.exists(layout.checkpoint_pointer_key(prefix))


# ------------------------------------------------------------------------ the command, the flow


def test_cli_gc_dry_run_says_what_and_why_and_prune_is_an_alias(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from malaria_cli.main import main

    store = LocalStore(tmp_path / "bucket")
    for i in range(3):
        _checkpoint(store, layout.checkpoint_prefix(f"run{i}"), age_days=40 + i)
    _checkpoint(store, layout.checkpoint_prefix("recent"), age_days=5)
    monkeypatch.setenv("MALARIA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MALARIA_CACHE_DIR", str(tmp_path / "cache"))
    before = sorted(i.key for i in store.list())
    args = ["--data-url", store.url, "--keep", "2", "--checkpoint-max-age-days", "30"]
    assert main(["gc", "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing was changed" in out
    assert "would delete    2" in out
    assert "would delete checkpoints/run1/ (2 objects): not among the newest 2" in out
    assert "41.0 days ago (limit 30)" in out
    assert sorted(i.key for i in store.list()) == before
    assert main(["prune", *args]) == 0
    assert "deleted checkpoints/run2/" in capsys.readouterr().out
    assert {layout.checkpoint_group(i.key) for i in store.list()} == {
        layout.checkpoint_prefix("recent"), layout.checkpoint_prefix("run0")}


def test_gc_defaults_are_declared_once() -> None:
    from malaria.core import defaults

    policy = RetentionPolicy()
    assert (policy.keep_checkpoints, policy.checkpoint_max_age_days, policy.keep_reports,
            policy.max_ledger_parts, policy.cache_max_age_days) == (
        defaults.GC_KEEP_CHECKPOINTS, defaults.GC_CHECKPOINT_MAX_AGE_DAYS,
        defaults.GC_KEEP_REPORTS, defaults.GC_MAX_LEDGER_PARTS, defaults.GC_CACHE_MAX_AGE_DAYS)


def test_weekly_gc_flow_runs_the_same_collection(tmp_path: Path,
                                                 prefect_harness: None) -> None:
    from flows.maintenance import gc_flow

    store = LocalStore(tmp_path / "bucket")
    _checkpoint(store, layout.checkpoint_prefix("old"), age_days=400)
    _put(store, layout.report_key("nightly-old", "cells.gif"), age_days=400)
    _put(store, "predictions/slide1.csv", age_days=400)
    result = gc_flow(data_url=store.url, keep_checkpoints=0, checkpoint_max_age_days=0.0,
                     keep_reports=0, report_max_age_days=0.0, prune_cache=False)
    assert result["deleted_objects"] == 3
    assert set(result["deleted"]) == {layout.checkpoint_prefix("old"),
                                      layout.report_prefix("nightly-old")}
    assert [i.key for i in store.list()] == ["predictions/slide1.csv"]
