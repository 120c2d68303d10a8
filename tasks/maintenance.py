"""Prefect task around malaria.registry.retention.run_gc: logs and an artifact, nothing
more (``malaria gc`` runs the same function)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from malaria.core.defaults import GC_FLOW_TIMEOUT_S, GC_LOCK_WAIT_S
from malaria.io.store import open_store
from malaria.registry.retention import RetentionPolicy, run_gc


# One retry: every step re-plans from what is there, so a second attempt after a store
# error deletes only what still qualifies, and compaction finishes or redoes its own work.
@task(name="garbage-collect", retries=1, retry_delay_seconds=30, cache_policy=NO_CACHE,
      timeout_seconds=GC_FLOW_TIMEOUT_S)
def collect_garbage(data_url: str, policy: RetentionPolicy, *, dry_run: bool = False,
                    cache_dir: str | None = None,
                    lock_wait_s: float = GC_LOCK_WAIT_S) -> dict[str, Any]:
    logger = get_run_logger()
    report = run_gc(open_store(data_url), policy, dry_run=dry_run,
                    cache_dir=Path(cache_dir) if cache_dir else None, lock_wait_s=lock_wait_s)
    lines = report.lines()
    for line in lines:
        logger.info("%s", line)
    if report.ledger_skipped:  # not a failure: the next collection compacts it
        logger.warning("ingest ledger left for next time: %s", report.ledger_skipped)
    title = "Garbage collection (dry run)" if dry_run else "Garbage collection"
    create_markdown_artifact(key="gc-summary", description="What retention deleted and kept",
                             markdown=f"# {title}\n\n```\n" + "\n".join(lines) + "\n```\n")
    return report.summary()
