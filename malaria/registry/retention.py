"""Retention: what ``malaria prune`` may delete from the bucket and the local caches.

Nothing else prunes, so without this checkpoints/, reports/, alerts/, the ingest ledger's
parts and the local caches only grow. The policy (``plan``) is pure: it takes what is there
and what is protected, and says what goes. The rest reads the store, applies a plan, and
compacts the ledger.

Per kind, whole groups go or stay (a checkpoint set or a run's reports never half-deleted):

``checkpoints/<run key>/``  keep the newest ``keep_checkpoints``; always keep a set that a
                            registered model (the champion included) was trained from (its
                            lineage: the run key is the hash of the record's ``config`` and
                            ``data_manifest_sha256``), and a set written to within
                            ``active_grace_s`` (a training run may be in progress: it
                            uploads every epoch)
``reports/<run>/``          keep the newest ``keep_reports`` runs
``alerts/<time>-<run>.json`` keep the newest ``keep_alerts``
``state/ingest/`` parts     never deleted without their rows: past ``max_ledger_parts`` they
                            are merged into one part (under the ingest lock, so no ingest
                            runs meanwhile), then the merged parts are deleted
local caches                decoded images untouched for ``cache_max_age_days``; downloaded
                            models except the champion's and the newest ``keep_cached_models``

models/, dataset/, manifests/, predictions/ and quarantine/ are records, never pruned here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from malaria.core import layout
from malaria.io.store import Store

CHECKPOINTS = "checkpoints"
REPORTS = "reports"
ALERTS = "alerts"
KINDS = (CHECKPOINTS, REPORTS, ALERTS)


@dataclass(frozen=True)
class RetentionPolicy:
    keep_checkpoints: int = 3
    keep_reports: int = 14
    keep_alerts: int = 200
    max_ledger_parts: int = 200
    # Longer than a training fit may run between two epochs' uploads.
    active_grace_s: float = 24 * 3600.0
    cache_max_age_days: float = 30.0
    keep_cached_models: int = 3

    def keep(self, kind: str) -> int:
        return {CHECKPOINTS: self.keep_checkpoints, REPORTS: self.keep_reports,
                ALERTS: self.keep_alerts}[kind]


@dataclass(frozen=True)
class Group:
    """Objects deleted or kept together: one checkpoint set, one run's reports, one alert."""

    kind: str
    name: str  # the prefix (or the key, for an alert)
    keys: tuple[str, ...]
    newest: datetime
    size: int


@dataclass
class PrunePlan:
    delete: list[Group] = field(default_factory=list)
    keep: list[tuple[Group, str]] = field(default_factory=list)  # with the reason

    def deleted_keys(self) -> list[str]:
        return [key for group in self.delete for key in group.keys]

    def summary(self) -> dict[str, dict[str, int]]:
        out = {kind: {"delete": 0, "keep": 0, "bytes_freed": 0} for kind in KINDS}
        for group in self.delete:
            out[group.kind]["delete"] += 1
            out[group.kind]["bytes_freed"] += group.size
        for group, _ in self.keep:
            out[group.kind]["keep"] += 1
        return out


# ------------------------------------------------------------------------ the pure policy


def plan(groups: Iterable[Group], policy: RetentionPolicy, *, protected: Iterable[str] = (),
         now: datetime | None = None) -> PrunePlan:
    """Which groups go: per kind all but the newest ``policy.keep(kind)``, never a protected
    one (a model's lineage), never a checkpoint set written to within the grace period."""
    now = now or datetime.now(UTC)
    protected = set(protected)
    active_since = now - timedelta(seconds=policy.active_grace_s)
    result = PrunePlan()
    by_kind: dict[str, list[Group]] = {}
    for group in groups:
        by_kind.setdefault(group.kind, []).append(group)
    for kind, members in by_kind.items():
        members.sort(key=lambda g: (g.newest, g.name), reverse=True)
        for rank, group in enumerate(members):
            if group.name in protected:
                result.keep.append((group, "referenced by a registered model"))
            elif kind == CHECKPOINTS and group.newest >= active_since:
                result.keep.append((group, "written recently: a run may be in progress"))
            elif rank < policy.keep(kind):
                result.keep.append((group, f"among the newest {policy.keep(kind)}"))
            else:
                result.delete.append(group)
    return result


def lineage_checkpoint(record: Mapping[str, Any]) -> str | None:
    """The checkpoint prefix a registered model was trained from, or None for a record
    without its training identity. The same hash as
    ``malaria.model.checkpoints.checkpoint_id`` (kept here so the registry needs no Keras;
    a test holds the two together)."""
    config, manifest = record.get("config"), record.get("data_manifest_sha256")
    if not isinstance(config, dict) or not isinstance(manifest, str):
        return None
    identity = json.dumps({"config": config, "data": manifest}, sort_keys=True)
    return layout.checkpoint_prefix(hashlib.sha256(identity.encode()).hexdigest()[:16])


# ------------------------------------------------------------------------ the bucket


def bucket_groups(store: Store) -> list[Group]:
    """checkpoints/, reports/ and alerts/ as groups."""
    found: dict[tuple[str, str], list[Any]] = {}
    sources = ((CHECKPOINTS, layout.CHECKPOINTS, layout.checkpoint_group),
               (REPORTS, layout.REPORTS, layout.report_group),
               (ALERTS, layout.ALERTS, lambda key: key))
    for kind, prefix, group_of in sources:
        for info in store.list(prefix):
            name = group_of(info.key)
            if name:
                found.setdefault((kind, name), []).append(info)
    return [Group(kind=kind, name=name, keys=tuple(sorted(i.key for i in infos)),
                  newest=max(_aware(i.last_modified) for i in infos),
                  size=sum(i.size for i in infos))
            for (kind, name), infos in sorted(found.items())]


def protected_prefixes(store: Store) -> set[str]:
    """The checkpoint sets every registered model's record points to."""
    from malaria.registry.registry import ModelRegistry

    registry = ModelRegistry(store)
    prefixes = set()
    for version in registry.versions():
        prefix = lineage_checkpoint(registry.get(version))
        if prefix:
            prefixes.add(prefix)
    return prefixes


def plan_bucket(store: Store, policy: RetentionPolicy, *,
                now: datetime | None = None) -> PrunePlan:
    return plan(bucket_groups(store), policy, protected=protected_prefixes(store), now=now)


def apply(store: Store, pruning: PrunePlan) -> int:
    """Delete the plan's groups, oldest first; returns the objects deleted. A checkpoint
    set is re-listed first: one that gained an object since the plan (a run resumed on it)
    is left alone."""
    deleted = 0
    for group in sorted(pruning.delete, key=lambda g: g.newest):
        keys = group.keys
        if group.kind == CHECKPOINTS:
            now_there = {i.key for i in store.list(group.name)}
            if now_there - set(keys):
                continue
        for key in keys:
            store.delete(key)
            deleted += 1
    return deleted


def compact_ledger(store: Store, policy: RetentionPolicy, *, dry_run: bool = False,
                   lock_wait_s: float = 60.0, settle_s: float | None = None) -> int:
    """Merge the ingest ledger's parts into one when there are more than
    ``max_ledger_parts``; returns how many parts were (or would be) merged, 0 for none.
    Holds the ingest lock, so no ingest reads or writes the ledger meanwhile; raises
    ``IngestLockBusy`` when an ingest holds it longer than ``lock_wait_s``. ``settle_s``:
    the lock's settle time (its default unless given; tests on one local folder use 0)."""
    from malaria.ingest.lock import IngestLock
    from malaria.ingest.manifest import read_rows, rows_to_csv

    def parts() -> list[str]:
        return sorted(i.key for i in store.list(layout.INGEST_LEDGER))

    if len(parts()) <= policy.max_ledger_parts:
        return 0
    if dry_run:
        return len(parts())
    extra = {} if settle_s is None else {"settle": settle_s}
    with IngestLock(store, label="malaria prune: ledger compaction", wait=lock_wait_s,
                    **extra):
        keys = parts()
        if len(keys) <= policy.max_ledger_parts:
            return 0
        # Rows in list order (the order load_ledger replays them in), written as one part.
        rows = [row for key in keys for row in read_rows(store.get_bytes(key))]
        merged_key = layout.ingest_ledger_compacted_key(keys[-1])
        store.put_bytes(merged_key, rows_to_csv(rows), content_type="text/csv")
        for key in keys:  # only after the merged part is in place
            if key != merged_key:
                store.delete(key)
        return len(keys)


# ------------------------------------------------------------------------ local caches


@dataclass
class CachePlan:
    delete: list[Path] = field(default_factory=list)
    bytes_freed: int = 0


def plan_cache(folder: Path, policy: RetentionPolicy, *, keep_versions: Iterable[str] = (),
               now: float | None = None) -> CachePlan:
    """Decoded images (``<size>/<xx>/<id>.npy``) not modified for ``cache_max_age_days``,
    and downloaded model folders (``models/<registry>/<version>/``) beyond the newest
    ``keep_cached_models``, except ``keep_versions`` (the champion)."""
    now = time.time() if now is None else now
    folder = Path(folder)
    result = CachePlan()
    if not folder.is_dir():
        return result
    cutoff = now - policy.cache_max_age_days * 86400
    for path in folder.glob("[0-9]*/*/*.npy"):
        stat = path.stat()
        if stat.st_mtime < cutoff:
            result.delete.append(path)
            result.bytes_freed += stat.st_size
    keep = set(keep_versions)
    for registry in (folder / "models").glob("*"):
        versions = sorted((p for p in registry.iterdir() if p.is_dir()),
                          key=lambda p: p.stat().st_mtime, reverse=True)
        for rank, version in enumerate(versions):
            if version.name in keep or rank < policy.keep_cached_models:
                continue
            result.delete.append(version)
            result.bytes_freed += sum(f.stat().st_size for f in version.rglob("*") if f.is_file())
    return result


def apply_cache(pruning: CachePlan) -> int:
    for path in pruning.delete:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(pruning.delete)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
