"""Prefect tasks around malaria.ingest: retries, logs and artifacts, nothing more."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from malaria.core.labels import LabelEntry
from malaria.core.settings import redact
from malaria.ingest.chunk import ChunkResult, IngestChunk
from malaria.ingest.ledger import Ledger, load_labels, load_ledger
from malaria.ingest.manifest import IngestSummary, ManifestWriter
from malaria.io.store import ObjectInfo, open_store


@task(name="load-ingest-state", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def load_ingest_state(data_url: str) -> tuple[Ledger, dict[str, LabelEntry]]:
    store = open_store(data_url)
    ledger = load_ledger(store)
    labels = load_labels(store)
    get_run_logger().info(
        "ledger: %d parts, %d objects already ingested; %d labelled keys from labels/",
        ledger.parts, len(ledger.sources), len(labels))
    return ledger, labels


# A chunk is idempotent (same input -> same objects under the same keys), so retrying a
# chunk after a network error or a crash is safe.
@task(name="ingest-chunk", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE,
      task_run_name="ingest-chunk-{chunk_index}")
def ingest_chunk(data_url: str, objects: list[ObjectInfo], chunk_index: int, ledger: Ledger,
                 labels: dict[str, LabelEntry], run_id: str, concurrency: int) -> ChunkResult:
    worker = IngestChunk(open_store(data_url, pool_size=max(concurrency, 10)), ledger, labels,
                         run_id=run_id, concurrency=concurrency)
    result = worker.run(objects, chunk_index)
    counts: dict[str, int] = {}
    for row in result.rows:
        counts[row.outcome] = counts.get(row.outcome, 0) + 1
    get_run_logger().info("chunk %d: %d objects: %s", chunk_index, len(objects),
                          ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return result


@task(name="publish-ingest-report", retries=2, cache_policy=NO_CACHE)
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
            f"- manifest: `{store.uri(manifest_key)}`\n"
            + "".join(f"- quarantined as `{reason}`: {count}\n"
                      for reason, count in sorted(summary.reasons.items()))
        ),
        description="Ingest run summary")
    logger = get_run_logger()
    logger.info(redact(summary.invariant_line()))
    if not summary.balanced:
        raise RuntimeError(f"ingest accounting does not balance: {summary.invariant_line()}")
