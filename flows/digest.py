"""The morning digest: what the pipeline did in the last 24 hours, as a markdown artifact
(``morning-digest``) and, when `malaria deploy` saved the webhook block, one webhook post.

- flow runs by state and by deployment (the Prefect API);
- models registered and promotions/rollbacks (the registry in the bucket);
- slides scored (``predictions/summary.csv``) and re-scored slides whose earlier CSV was kept
  (``predictions/history/``);
- objects quarantined by reason, from the ingest manifests written in the window.

The bucket reading and the rendering are in ``malaria.reports.digest`` (no Prefect); this
flow adds the runs from the API and wires them to the artifact and the webhook. It never
fails on one missing source: that section says so.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterExpectedStartTime
from prefect.client.schemas.sorting import FlowRunSort

from malaria.core import defaults
from malaria.core.settings import data_url as resolve_data_url
from malaria.core.settings import redact
from malaria.io.store import open_store
from malaria.reports.digest import Digest, bucket_sections, render
from tasks.notify import post_to_webhook, use_credentials_block

ARTIFACT_KEY = "morning-digest"
PAGE = 200


# ---------------------------------------------------------------------------- Prefect API


def runs_section(digest: Digest) -> None:
    """Runs expected to start in the window (so scheduled-but-late runs count too)."""
    window = FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(
        after_=digest.since, before_=digest.until))
    with get_client(sync_client=True) as client:
        names = {}
        offset = 0
        while True:
            runs = client.read_flow_runs(flow_run_filter=window, sort=FlowRunSort.ID_DESC,
                                         limit=PAGE, offset=offset)
            for run in runs:
                state = run.state.name if run.state else "Unknown"
                digest.runs_by_state[state] += 1
                if run.deployment_id and run.deployment_id not in names:
                    try:
                        names[run.deployment_id] = client.read_deployment(
                            run.deployment_id).name
                    except Exception:  # deleted since: the id says which
                        names[run.deployment_id] = str(run.deployment_id)
                name = names.get(run.deployment_id, "(no deployment)") \
                    if run.deployment_id else "(no deployment)"
                digest.runs_by_deployment.setdefault(name, Counter())[state] += 1
            if len(runs) < PAGE:
                break
            offset += PAGE


@flow(name="digest", description="The last 24 hours of the pipeline, every morning.",
      timeout_seconds=defaults.ALERT_FLOW_TIMEOUT_S)
def digest_flow(data_url: str | None = None, hours: float = 24.0) -> dict[str, Any]:
    logger = get_run_logger()
    until = datetime.now(UTC)
    digest = Digest(since=until - timedelta(hours=hours), until=until)
    try:
        runs_section(digest)
    except Exception as error:
        digest.problems.append(f"flow runs: {redact(str(error))}")
    try:
        use_credentials_block()
        bucket_sections(open_store(resolve_data_url(data_url)), digest)
    except Exception as error:
        digest.problems.append(f"bucket: {redact(str(error))}")
    markdown = render(digest)
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=markdown,
                             description="The pipeline's last 24 hours")
    counts = digest.counts()
    undelivered = post_to_webhook({"text": markdown, "kind": "morning-digest",
                                   "since": digest.since.isoformat(),
                                   "until": digest.until.isoformat(), "counts": counts})
    if undelivered and undelivered != "not configured":
        logger.warning("digest not delivered to the webhook: %s", undelivered)
    logger.info("digest: %s", counts)
    return {**counts, "webhook": undelivered or "delivered", "problems": digest.problems}
