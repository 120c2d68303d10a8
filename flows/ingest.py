"""Ingest flow: apply reviewers' label corrections, then validate labelled uploads in
incoming/ and sort them into dataset/.

The one ingest orchestrator: the nightly flow, ``malaria ingest`` and ``benchmarks.ingest``
run it. How a run stays deterministic, resumable and idempotent: see malaria.ingest.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from malaria.core import layout
from malaria.core.defaults import (
    INGEST_CHUNK_SIZE,
    INGEST_CONCURRENCY,
    INGEST_LOCK_WAIT_S,
    INGEST_RUN_TIMEOUT_S,
)
from malaria.core.settings import data_url as resolve_data_url
from malaria.ingest.chunk import iter_chunks
from malaria.ingest.manifest import OUTCOMES, IngestSummary, ManifestWriter, new_run_id
from malaria.io.store import open_store, put_json
from tasks.events import emit_cells_ingested
from tasks.ingest import (
    apply_label_corrections,
    ingest_chunk,
    ingest_lock,
    load_ingest_state,
    publish_ingest_report,
)
from tasks.notify import use_credentials_block


def ingest_run_name() -> str:
    """``ingest-<UTC time it was due>``: says what ran and when, in the UI's run lists."""
    return f"ingest-{flow_run.get_scheduled_start_time():%Y%m%dT%H%M%SZ}"


@flow(name="ingest", description="Apply reviewers' label corrections, then validate, "
      "de-duplicate and sort labelled cell images from incoming/ into "
      "dataset/<class>/<slide>/, quarantining bad files with a reason.",
      flow_run_name=ingest_run_name, timeout_seconds=INGEST_RUN_TIMEOUT_S)
def ingest_flow(data_url: str | None = None, chunk_size: int = INGEST_CHUNK_SIZE,
                concurrency: int = INGEST_CONCURRENCY,
                lock_wait_s: float = INGEST_LOCK_WAIT_S,
                run_id: str | None = None) -> dict[str, object]:
    """``run_id``: the caller's name for this run (nightly reads the run's counts from
    ``manifests/<run_id>.summary.json``); a new one by default."""
    use_credentials_block()  # a named AwsCredentials block, else the environment
    data_url = resolve_data_url(data_url)
    started = datetime.now(UTC)
    run_id = run_id or new_run_id(started)
    logger = get_run_logger()
    logger.info("ingest run %s on %s", run_id, data_url)

    summary = IngestSummary(run_id=run_id)
    manifest = ManifestWriter()
    try:
        # One writer at a time, whoever started it (see malaria.ingest.lock): the ledger is
        # loaded under the lock, so no run decides with a ledger another run is changing.
        with ingest_lock(data_url, label=f"{run_id} (flow run {flow_run.get_id()})",
                         wait_s=lock_wait_s) as lock:
            ledger, labels = load_ingest_state(data_url)
            # Reviewers' verdicts first: they rule on cells already in dataset/, and the
            # chunks then decide with the corrected ledger.
            corrections = apply_label_corrections(data_url, quote(ledger), run_id, started,
                                                  before_commit=quote(lock.verify))
            manifest.add(corrections.rows)
            summary.add_corrections(corrections.rows)
            # Chunks run one after another so de-duplication is decided in key order; the
            # concurrency is inside each chunk.
            listing = open_store(data_url).list(layout.INCOMING)
            for index, chunk in enumerate(iter_chunks(listing, chunk_size=chunk_size)):
                result = ingest_chunk(data_url, chunk, index, quote(ledger), quote(labels),
                                      run_id, concurrency, before_commit=quote(lock.verify))
                manifest.add([*result.rows, *result.retracted])
                summary.add(result)
            publish_ingest_report(data_url, quote(summary), quote(manifest),
                                  layout.manifest_key(run_id))
    finally:
        manifest.close()
    logger.info(summary.invariant_line())
    # For automations and the event feed: what this run sorted (counts only).
    emit_cells_ingested(data_url, {"listed": summary.listed, **summary.outcomes}, run_id)
    counts: dict[str, object] = {
        "run_id": run_id, "listed": summary.listed,
        **{outcome: summary.outcomes[outcome] for outcome in OUTCOMES},
        "reasons": dict(summary.reasons), "retracted": summary.retracted,
        "corrections": dict(summary.corrections),
        "manifest": layout.manifest_key(run_id), "balanced": summary.balanced}
    put_json(open_store(data_url), layout.manifest_summary_key(run_id), counts)
    return counts
