"""Prefect tasks around malaria.ingest: retries, logs and artifacts, nothing more."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun

from malaria.core.defaults import (
    INGEST_CHUNK_TIMEOUT_S,
    INGEST_LOCK_WAIT_S,
    INGEST_REPORT_TIMEOUT_S,
    INGEST_STATE_TIMEOUT_S,
)
from malaria.core.labels import LabelEntry
from malaria.core.settings import redact
from malaria.ingest.chunk import ChunkResult, IngestChunk
from malaria.ingest.corrections import CorrectionsResult, apply_corrections
from malaria.ingest.ledger import Ledger, load_labels, load_ledger
from malaria.ingest.lock import IngestLock, IngestLockBusy, IngestLockLost, describe
from malaria.ingest.manifest import REJECTED, IngestSummary, ManifestWriter
from malaria.io.store import ObjectInfo, open_store


@contextmanager
def ingest_lock(data_url: str, *, label: str,
                wait_s: float = INGEST_LOCK_WAIT_S) -> Iterator[IngestLock]:
    """Hold the bucket's ingest lock (malaria.ingest.lock) for the block: held by the flow's
    process, which lives as long as the run, not by a task."""
    logger = get_run_logger()

    def waiting(holder: dict[str, Any]) -> None:
        logger.warning("another ingest run holds the ingest lock: %s; waiting up to %g s",
                       describe(holder), wait_s)

    try:
        with IngestLock(open_store(data_url), label=label, wait=wait_s,
                        on_wait=waiting) as lock:
            logger.info("holding the ingest lock %s", lock.store.uri(lock.key))
            yield lock
    except IngestLockBusy as busy:  # the run stops here, having written nothing
        logger.error("%s", busy)
        raise


@task(name="load-ingest-state", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      timeout_seconds=INGEST_STATE_TIMEOUT_S)
def load_ingest_state(data_url: str) -> tuple[Ledger, dict[str, LabelEntry]]:
    store = open_store(data_url)
    ledger = load_ledger(store)
    labels = load_labels(store)
    get_run_logger().info(
        "ledger: %d parts, %d objects already ingested; %d labelled keys from labels/",
        ledger.parts, len(ledger.sources), len(labels))
    return ledger, labels


def retry_unless_lock_lost(_task: Task[..., Any], _task_run: TaskRun,
                           state: State[Any]) -> bool:
    """Another run holds the ingest lock now: a retry would write beside it, so stop."""
    return not isinstance(state.data, IngestLockLost)


# A chunk is idempotent (same input -> same objects under the same keys, and the ledger
# is only updated once the chunk has committed), so retrying a chunk after a network error,
# a timeout or a crash gives the outcome of a first try.
@task(name="ingest-chunk", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE,
      task_run_name="ingest-chunk-{chunk_index}", timeout_seconds=INGEST_CHUNK_TIMEOUT_S,
      retry_condition_fn=retry_unless_lock_lost)
def ingest_chunk(data_url: str, objects: list[ObjectInfo], chunk_index: int, ledger: Ledger,
                 labels: dict[str, LabelEntry], run_id: str, concurrency: int,
                 before_commit: Callable[[], None] | None = None) -> ChunkResult:
    worker = IngestChunk(open_store(data_url, pool_size=max(concurrency, 10)), ledger, labels,
                         run_id=run_id, concurrency=concurrency, before_commit=before_commit)
    result = worker.run(objects, chunk_index)
    counts: dict[str, int] = {}
    for row in result.rows:
        counts[row.outcome] = counts.get(row.outcome, 0) + 1
    get_run_logger().info("chunk %d: %d objects: %s", chunk_index, len(objects),
                          ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return result


# Idempotent like a chunk (see malaria.ingest.corrections): a retry finishes what the first
# attempt began, and the ledger is only updated once the changes are committed.
@task(name="apply-label-corrections", retries=3, retry_delay_seconds=[2, 10, 30],
      cache_policy=NO_CACHE, timeout_seconds=INGEST_CHUNK_TIMEOUT_S,
      retry_condition_fn=retry_unless_lock_lost)
def apply_label_corrections(data_url: str, ledger: Ledger, run_id: str, applied_at: datetime,
                            before_commit: Callable[[], None] | None = None
                            ) -> CorrectionsResult:
    result = apply_corrections(open_store(data_url), ledger, run_id=run_id,
                               applied_at=applied_at, before_commit=before_commit)
    logger = get_run_logger()
    if result.applied:
        logger.info("label corrections: %d verdict files, %d rows: %s", len(result.applied),
                    len(result.rows), ", ".join(f"{k} {v}" for k, v in
                                                sorted(result.counts().items())))
    for row in result.rows:
        if row.outcome == REJECTED:
            logger.warning("verdict %s not applied (%s): %s", row.verdict, row.reason,
                           row.detail)
    return result


@task(name="publish-ingest-report", retries=2, cache_policy=NO_CACHE,
      timeout_seconds=INGEST_REPORT_TIMEOUT_S)
def publish_ingest_report(data_url: str, summary: IngestSummary, manifest: ManifestWriter,
                          manifest_key: str) -> None:
    store = open_store(data_url)
    manifest.upload(store, manifest_key)
    summary.manifest_key = manifest_key
    create_table_artifact(
        table=summary.table(), key="ingest-counts",
        description=f"Ingest {summary.run_id}: counts by outcome and quarantine reason")
    create_markdown_artifact(
        key="ingest-summary",
        markdown=(
            f"# Ingest {summary.run_id}\n\n"
            f"- {summary.invariant_line()}\n"
            f"- chunks committed: {summary.chunks}\n"
            f"- {summary.corrections_line()}\n"
            f"- manifest: `{store.uri(manifest_key)}`\n"
            + "".join(f"- quarantined as `{reason}`: {count}\n"
                      for reason, count in sorted(summary.reasons.items()))
        ),
        description="Ingest run summary")
    logger = get_run_logger()
    logger.info(redact(summary.invariant_line()))
    if not summary.balanced:
        raise RuntimeError(f"ingest accounting does not balance: {summary.invariant_line()}")
