"""Maintenance: the weekly ``gc`` flow (deployment ``weekly-gc``) runs retention, the same
``run_gc`` as ``malaria gc``: old checkpoints, reports, alerts and cache entries go by age
and count, the ingest ledger is compacted, and no model's lineage or reported result is
touched (malaria.registry.retention)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from malaria.core import defaults
from malaria.core.settings import cache_dir as resolve_cache_dir
from malaria.core.settings import data_url as resolve_data_url
from malaria.registry.retention import RetentionPolicy
from tasks.maintenance import collect_garbage
from tasks.notify import use_credentials_block


@flow(name="gc", description="Prune old checkpoints, reports, alerts and local caches by age "
      "and count, and compact the ingest ledger; never a model's lineage or a reported result.",
      timeout_seconds=defaults.GC_FLOW_TIMEOUT_S)
def gc_flow(data_url: str | None = None, dry_run: bool = False,
            keep_checkpoints: int = defaults.GC_KEEP_CHECKPOINTS,
            checkpoint_max_age_days: float = defaults.GC_CHECKPOINT_MAX_AGE_DAYS,
            keep_reports: int = defaults.GC_KEEP_REPORTS,
            report_max_age_days: float = defaults.GC_REPORT_MAX_AGE_DAYS,
            keep_alerts: int = defaults.GC_KEEP_ALERTS,
            alert_max_age_days: float = defaults.GC_ALERT_MAX_AGE_DAYS,
            max_ledger_parts: int = defaults.GC_MAX_LEDGER_PARTS,
            cache_max_age_days: float = defaults.GC_CACHE_MAX_AGE_DAYS,
            keep_cached_models: int = defaults.GC_KEEP_CACHED_MODELS,
            prune_cache: bool = True,
            lock_wait_s: float = defaults.GC_LOCK_WAIT_S) -> dict[str, Any]:
    policy = RetentionPolicy(
        keep_checkpoints=keep_checkpoints, checkpoint_max_age_days=checkpoint_max_age_days,
        keep_reports=keep_reports, report_max_age_days=report_max_age_days,
        keep_alerts=keep_alerts, alert_max_age_days=alert_max_age_days,
        max_ledger_parts=max_ledger_parts, cache_max_age_days=cache_max_age_days,
        keep_cached_models=keep_cached_models)
    # The cache trimmed is this worker's own (the scoring pool's decoded images and models).
    use_credentials_block()  # a named AwsCredentials block, else the environment
    return collect_garbage(resolve_data_url(data_url), policy, dry_run=dry_run,
                           cache_dir=resolve_cache_dir() if prune_cache else None,
                           lock_wait_s=lock_wait_s)
