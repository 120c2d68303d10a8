"""Ingest flow: validate labelled uploads in incoming/ and sort them into dataset/.

The one ingest orchestrator: the nightly flow, ``malaria ingest`` and ``benchmarks.ingest``
run it. How a run stays deterministic, resumable and idempotent: see malaria.ingest.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.utilities.annotations import quote

from malaria.core import layout
from malaria.core.defaults import INGEST_CHUNK_SIZE, INGEST_CONCURRENCY
from malaria.core.settings import data_url as resolve_data_url
from malaria.ingest.chunk import iter_chunks
from malaria.ingest.manifest import OUTCOMES, IngestSummary, ManifestWriter, new_run_id
from malaria.io.store import open_store
from tasks.ingest import ingest_chunk, load_ingest_state, publish_ingest_report


@flow(name="ingest", description="Validate, de-duplicate and sort labelled cell images "
      "from incoming/ into dataset/<class>/<slide>/, quarantining bad files with a reason.")
def ingest_flow(data_url: str | None = None, chunk_size: int = INGEST_CHUNK_SIZE,
                concurrency: int = INGEST_CONCURRENCY) -> dict[str, object]:
    data_url = resolve_data_url(data_url)
    run_id = new_run_id()
    logger = get_run_logger()
    logger.info("ingest run %s on %s", run_id, data_url)

    ledger, labels = load_ingest_state(data_url)
    summary = IngestSummary(run_id=run_id)
    manifest = ManifestWriter()
    try:
        # Chunks run one after another so de-duplication is decided in key order; the
        # concurrency is inside each chunk.
        listing = open_store(data_url).list(layout.INCOMING)
        for index, chunk in enumerate(iter_chunks(listing, chunk_size=chunk_size)):
            result = ingest_chunk(data_url, chunk, index, quote(ledger), quote(labels),
                                  run_id, concurrency)
            manifest.add([*result.rows, *result.retracted])
            summary.add(result)
        publish_ingest_report(data_url, quote(summary), quote(manifest),
                              layout.manifest_key(run_id))
    finally:
        manifest.close()
    logger.info(summary.invariant_line())
    return {"run_id": run_id, "listed": summary.listed,
            **{outcome: summary.outcomes[outcome] for outcome in OUTCOMES},
            "reasons": dict(summary.reasons), "retracted": summary.retracted,
            "manifest": layout.manifest_key(run_id), "balanced": summary.balanced}
