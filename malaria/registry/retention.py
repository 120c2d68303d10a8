"""Retention: what ``malaria gc`` (alias ``malaria prune``) and the weekly ``gc`` flow may
delete from the bucket and the local caches.

Nothing else prunes, so without this checkpoints/, reports/, alerts/, the ingest ledger's
parts and the local caches only grow. The policy (``plan``) is pure: it takes what is there
and what is protected, and says what goes and why. The rest reads the store, applies a plan,
and compacts the ledger (:mod:`malaria.ingest.compaction`); :func:`run_gc` does all of it.

Per kind, whole groups go or stay (a checkpoint set or a run's reports never half-deleted).
A group goes only when it is beyond the newest ``keep_<kind>`` AND older than
``<kind>_max_age_days`` (defaults: malaria.core.defaults, ``GC_*``):

``checkpoints/<run key>/``  never a set that a registered model (the champion and every
                            version in champion.json's history included) was trained from
                            (its lineage: the run key is the hash of the record's ``config``
                            and ``data_manifest_sha256``), nor a set written to within
                            ``active_grace_s`` (a training run may be in progress)
``reports/<run>/``          a run's pictures
``alerts/<time>-<run>.json`` one failure alert
``state/ingest/`` parts     never deleted without their rows: past ``max_ledger_parts`` they
                            are merged into one part under the ingest lock
local caches                decoded images untouched for ``cache_max_age_days``; downloaded
                            models except the champion's and the newest ``keep_cached_models``

models/ (records, model files, lineage.csv, champion.json), dataset/, manifests/ (the audit
trail), predictions/ (history included), labels/ (applied verdict files included),
quarantine/, incoming/ and scans/ are never candidates; :func:`apply` refuses to delete
anything outside the three kinds' prefixes even if a plan named it.
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

from malaria.core import defaults, layout
from malaria.ingest.compaction import CompactionResult, compact_ledger
from malaria.ingest.lock import IngestLockBusy
from malaria.io.store import Store

CHECKPOINTS = "checkpoints"
REPORTS = "reports"
ALERTS = "alerts"
KINDS = (CHECKPOINTS, REPORTS, ALERTS)
KIND_PREFIXES = {CHECKPOINTS: layout.CHECKPOINTS, REPORTS: layout.REPORTS,
                 ALERTS: layout.ALERTS}
# Records: a belt to the plan's braces, checked on every delete.
NEVER_PRUNED = (layout.MODELS, layout.DATASET, layout.MANIFESTS, layout.PREDICTIONS,
                layout.LABELS, layout.LABEL_CORRECTIONS_APPLIED, layout.QUARANTINE,
                layout.INCOMING, layout.SCANS, layout.INGEST_LEDGER)
PROTECTED_REASON = "lineage of a registered model"


class RetentionError(RuntimeError):
    """A plan named an object retention must never delete: nothing more was deleted."""


@dataclass(frozen=True)
class RetentionPolicy:
    keep_checkpoints: int = defaults.GC_KEEP_CHECKPOINTS
    checkpoint_max_age_days: float = defaults.GC_CHECKPOINT_MAX_AGE_DAYS
    keep_reports: int = defaults.GC_KEEP_REPORTS
    report_max_age_days: float = defaults.GC_REPORT_MAX_AGE_DAYS
    keep_alerts: int = defaults.GC_KEEP_ALERTS
    alert_max_age_days: float = defaults.GC_ALERT_MAX_AGE_DAYS
    max_ledger_parts: int = defaults.GC_MAX_LEDGER_PARTS
    active_grace_s: float = defaults.GC_ACTIVE_GRACE_S
    cache_max_age_days: float = defaults.GC_CACHE_MAX_AGE_DAYS
    keep_cached_models: int = defaults.GC_KEEP_CACHED_MODELS

    def keep(self, kind: str) -> int:
        return {CHECKPOINTS: self.keep_checkpoints, REPORTS: self.keep_reports,
                ALERTS: self.keep_alerts}[kind]

    def max_age_days(self, kind: str) -> float:
        return {CHECKPOINTS: self.checkpoint_max_age_days, REPORTS: self.report_max_age_days,
                ALERTS: self.alert_max_age_days}[kind]


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
    why: dict[str, str] = field(default_factory=dict)  # deleted group name -> the reason

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
    """Which groups go, and why: per kind those beyond the newest ``policy.keep(kind)`` and
    older than ``policy.max_age_days(kind)``; never a protected one (a model's lineage),
    never a checkpoint set written to within the grace period."""
    now = now or datetime.now(UTC)
    protected = set(protected)
    active_since = now - timedelta(seconds=policy.active_grace_s)
    result = PrunePlan()
    by_kind: dict[str, list[Group]] = {}
    for group in groups:
        by_kind.setdefault(group.kind, []).append(group)
    for kind, members in by_kind.items():
        members.sort(key=lambda g: (g.newest, g.name), reverse=True)
        keep, max_age = policy.keep(kind), policy.max_age_days(kind)
        for rank, group in enumerate(members):
            age_days = (now - group.newest).total_seconds() / 86400
            if group.name in protected:
                result.keep.append((group, PROTECTED_REASON))
            elif kind == CHECKPOINTS and group.newest >= active_since:
                result.keep.append((group, "written recently: a run may be in progress"))
            elif rank < keep:
                result.keep.append((group, f"among the newest {keep}"))
            elif age_days < max_age:
                result.keep.append((group, f"younger than {max_age:g} days"))
            else:
                result.delete.append(group)
                result.why[group.name] = (f"not among the newest {keep}, last written "
                                          f"{age_days:.1f} days ago (limit {max_age:g})")
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


def record_checkpoints(record: Mapping[str, Any]) -> set[str]:
    """Every checkpoint prefix a record points to: its lineage hash, and a
    ``checkpoint_prefix`` it names outright (should a trainer record one)."""
    found = {prefix for prefix in (lineage_checkpoint(record),) if prefix}
    named = record.get("checkpoint_prefix")
    if isinstance(named, str) and (group := layout.checkpoint_group(named.rstrip("/") + "/")):
        found.add(group)
    return found


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


def protected_versions(store: Store) -> list[str]:
    """Every registered version, and every version champion.json's history names (one
    whose record went missing protects nothing, but is still reported as protected)."""
    from malaria.registry.registry import ModelRegistry

    registry = ModelRegistry(store)
    history = [str(event["version"]) for event in (registry.champion() or {}).get("history", [])
               if isinstance(event, dict) and event.get("version")]
    return sorted({*registry.versions(), *history})


def protected_prefixes(store: Store) -> set[str]:
    """The checkpoint sets every registered model's record points to (the champion's and
    its history's included). A record that cannot be read stops the collection (raises)
    rather than leave a lineage unprotected."""
    from malaria.registry.registry import ModelRegistry, UnknownVersion

    registry = ModelRegistry(store)
    prefixes: set[str] = set()
    for version in protected_versions(store):
        try:
            record = registry.get(version)
        except UnknownVersion:  # named in the history, record gone: nothing to hash
            continue
        prefixes |= record_checkpoints(record)
    return prefixes


def plan_bucket(store: Store, policy: RetentionPolicy, *,
                now: datetime | None = None) -> PrunePlan:
    return plan(bucket_groups(store), policy, protected=protected_prefixes(store), now=now)


def deletable(key: str) -> bool:
    """Under checkpoints/, reports/ or alerts/, and under no record prefix."""
    return (key.startswith(tuple(KIND_PREFIXES.values()))
            and not key.startswith(NEVER_PRUNED))


def apply(store: Store, pruning: PrunePlan) -> int:
    """Delete the plan's groups, oldest first; returns the objects deleted. A checkpoint
    set is re-listed first: one that gained an object since the plan (a run resumed on it)
    is left alone, and so is one a model registered since the plan points to. Raises
    ``RetentionError`` (deleting nothing) when the plan names a key outside the kinds."""
    outside = [key for key in pruning.deleted_keys() if not deletable(key)]
    if outside:
        raise RetentionError(f"refusing to delete {len(outside)} objects outside "
                             f"{', '.join(KIND_PREFIXES.values())}: {outside[:5]}")
    protected = (protected_prefixes(store)
                 if any(g.kind == CHECKPOINTS for g in pruning.delete) else set())
    deleted = 0
    for group in sorted(pruning.delete, key=lambda g: g.newest):
        keys = group.keys
        if group.kind == CHECKPOINTS:
            if group.name in protected:
                continue
            now_there = {i.key for i in store.list(group.name)}
            if now_there - set(keys):
                continue
        for key in keys:
            store.delete(key)
            deleted += 1
    return deleted


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


# ------------------------------------------------------------------------ all of it


@dataclass
class GcReport:
    """What one collection did (or, on a dry run, would do), for a person and for a flow."""

    dry_run: bool
    policy: RetentionPolicy
    bucket: PrunePlan
    deleted_objects: int = 0
    ledger: CompactionResult | None = None
    ledger_skipped: str = ""  # why the ledger was left for next time (an ingest held it)
    cache: CachePlan | None = None
    cache_dir: str = ""
    protected_versions: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        verb = "would delete" if self.dry_run else "deleted"
        out = []
        for kind, counts in self.bucket.summary().items():
            out.append(f"{kind:12s} keep {counts['keep']:4d}, {verb} {counts['delete']:4d} "
                       f"({counts['bytes_freed'] / 1e6:.1f} MB)")
        for group in sorted(self.bucket.delete, key=lambda g: (g.kind, g.name)):
            out.append(f"  {verb} {group.name} ({len(group.keys)} objects): "
                       f"{self.bucket.why.get(group.name, '')}")
        for group, reason in self.bucket.keep:
            if not reason.startswith(("among the newest", "younger than")):
                out.append(f"  kept {group.name}: {reason}")
        if self.protected_versions:
            out.append(f"protected    models {', '.join(self.protected_versions)} and their "
                       "lineage; models/, dataset/, manifests/, predictions/, labels/ untouched")
        if self.ledger is not None:
            out.append(f"ledger       {self.ledger.line(self.dry_run)}")
        elif self.ledger_skipped:
            out.append(f"ledger       left for next time: {self.ledger_skipped}")
        if self.cache is not None:
            out.append(f"local cache  {verb} {len(self.cache.delete)} entries "
                       f"({self.cache.bytes_freed / 1e6:.1f} MB) under {self.cache_dir}")
        return out

    def summary(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "bucket": self.bucket.summary(),
                "deleted": {g.name: self.bucket.why.get(g.name, "") for g in self.bucket.delete},
                "deleted_objects": self.deleted_objects,
                "ledger": self.ledger.line(self.dry_run) if self.ledger else None,
                "ledger_skipped": self.ledger_skipped,
                "cache_entries": len(self.cache.delete) if self.cache else 0,
                "protected_versions": self.protected_versions}


def run_gc(store: Store, policy: RetentionPolicy, *, dry_run: bool = False,
           cache_dir: Path | None = None, lock_wait_s: float = defaults.GC_LOCK_WAIT_S,
           settle_s: float | None = None, now: datetime | None = None) -> GcReport:
    """One collection, as ``malaria gc`` and the weekly ``gc`` flow run it: prune the
    bucket's checkpoints, reports and alerts, compact the ingest ledger, and (given
    ``cache_dir``) trim the local caches. An ingest holding the lock past ``lock_wait_s``
    leaves the ledger for next time; it fails nothing else."""
    from malaria.registry.registry import ModelRegistry

    pruning = plan_bucket(store, policy, now=now)
    report = GcReport(dry_run=dry_run, policy=policy, bucket=pruning,
                      protected_versions=protected_versions(store))
    if not dry_run:
        report.deleted_objects = apply(store, pruning)
    try:
        report.ledger = compact_ledger(store, max_parts=policy.max_ledger_parts,
                                       dry_run=dry_run, lock_wait_s=lock_wait_s,
                                       settle_s=settle_s)
    except IngestLockBusy as busy:
        report.ledger_skipped = str(busy)
    if cache_dir is not None:
        champion = ModelRegistry(store).champion_version()
        report.cache_dir = str(cache_dir)
        report.cache = plan_cache(cache_dir, policy,
                                  keep_versions=[champion] if champion else [])
        if not dry_run:
            apply_cache(report.cache)
    return report


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
