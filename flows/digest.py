"""The morning digest: what the pipeline did in the last 24 hours, as a markdown artifact
(``morning-digest``) and, when `malaria deploy` saved the webhook block, one webhook post.

- flow runs by state and by deployment (the Prefect API);
- models registered and promotions/rollbacks (the registry in the bucket);
- slides scored (``predictions/summary.csv``) and re-scored slides whose earlier CSV was kept
  (``predictions/history/``);
- objects quarantined by reason, from the ingest manifests written in the window.

The bucket reading is plain functions (no Prefect); the flow wires them to the API, the
artifact and the webhook. It never fails on one missing source: that section says so.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterExpectedStartTime
from prefect.client.schemas.sorting import FlowRunSort

from malaria.core import defaults, layout
from malaria.core.csvsafe import unescape_record
from malaria.core.settings import data_url as resolve_data_url
from malaria.core.settings import redact
from malaria.ingest.manifest import QUARANTINED, read_rows
from malaria.io.store import ObjectNotFound, Store, open_store
from malaria.registry.registry import ModelRegistry
from tasks.notify import post_to_webhook, use_credentials_block

ARTIFACT_KEY = "morning-digest"
PAGE = 200


@dataclass
class Digest:
    since: datetime
    until: datetime
    runs_by_state: Counter[str] = field(default_factory=Counter)
    runs_by_deployment: dict[str, Counter[str]] = field(default_factory=dict)
    registered: list[str] = field(default_factory=list)
    promotions: list[dict[str, Any]] = field(default_factory=list)
    champion: str | None = None
    slides_scored: list[dict[str, str]] = field(default_factory=list)
    rescored: list[str] = field(default_factory=list)
    manifests: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, Any]:
        return {"runs": dict(self.runs_by_state), "models_registered": len(self.registered),
                "promotions": len(self.promotions), "slides_scored": len(self.slides_scored),
                "parasitemia_changes": len(self.rescored), "ingest_runs": self.manifests,
                "quarantined": sum(self.quarantined.values())}


def _when(value: Any) -> datetime | None:
    """An ISO time from the bucket (naive ones are UTC), or None."""
    if isinstance(value, datetime):
        when = value
    else:
        try:
            when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _inside(value: Any, since: datetime, until: datetime) -> bool:
    when = _when(value)
    return when is not None and since <= when <= until


# ------------------------------------------------------------------ the bucket, no Prefect


def registry_section(store: Store, digest: Digest) -> None:
    registry = ModelRegistry(store)
    for version in registry.versions():
        record = registry.get(version)
        if _inside(record.get("created_at"), digest.since, digest.until):
            digest.registered.append(version)
    champion = registry.champion() or {}
    digest.champion = champion.get("version")
    digest.promotions = [
        {k: entry.get(k) for k in ("action", "version", "previous", "at", "reason")}
        for entry in champion.get("history", [])
        if _inside(entry.get("at"), digest.since, digest.until)]


def scoring_section(store: Store, digest: Digest) -> None:
    try:
        text = store.get_bytes(layout.PREDICTION_SUMMARY_KEY).decode("utf-8")
    except ObjectNotFound:
        text = ""
    for record in csv.DictReader(io.StringIO(text, newline="")):
        record = unescape_record(record)
        if _inside(record.get("scored_at"), digest.since, digest.until):
            digest.slides_scored.append(record)
    # A re-scored slide keeps its earlier CSV under history/<slide>/: one object per change.
    history = f"{layout.PREDICTIONS}history/"
    digest.rescored = sorted({info.key[len(history):].split("/", 1)[0]
                              for info in store.list(history)
                              if _inside(info.last_modified, digest.since, digest.until)})


def quarantine_section(store: Store, digest: Digest) -> None:
    for info in store.list(layout.MANIFESTS):
        if not info.key.endswith(".csv") or not _inside(info.last_modified, digest.since,
                                                        digest.until):
            continue
        digest.manifests += 1
        digest.quarantined.update(row.reason or "unknown" for row in
                                  read_rows(store.get_bytes(info.key))
                                  if row.outcome == QUARANTINED)


def bucket_sections(store: Store, digest: Digest) -> None:
    for name, section in (("registry", registry_section), ("scoring", scoring_section),
                          ("quarantine", quarantine_section)):
        try:
            section(store, digest)
        except Exception as error:  # one unreadable source leaves the rest of the digest
            digest.problems.append(f"{name}: {redact(str(error))}")


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    head = list(header)
    return [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}",
            *(f"| {' | '.join(str(c) for c in row)} |" for row in rows)]


def render(digest: Digest) -> str:
    span = f"{digest.since:%Y-%m-%d %H:%M} to {digest.until:%Y-%m-%d %H:%M} UTC"
    runs = sum(digest.runs_by_state.values())
    lines = [f"# Morning digest, {span}", "",
             f"- flow runs: {runs} ("
             + (", ".join(f"{n} {s}" for s, n in sorted(digest.runs_by_state.items()))
                or "none") + ")",
             f"- models registered: {len(digest.registered)}; promotions and rollbacks: "
             f"{len(digest.promotions)}; champion now: `{digest.champion or 'none'}`",
             f"- slides scored: {len(digest.slides_scored)}; parasitemia changes "
             f"(re-scored slides): {len(digest.rescored)}",
             f"- ingest runs: {digest.manifests}; quarantined: "
             f"{sum(digest.quarantined.values())}", ""]
    if digest.runs_by_deployment:
        states = sorted(digest.runs_by_state)
        lines += ["## Flow runs", "", *_table(
            ["deployment", *states],
            ([name, *(counts.get(s, 0) for s in states)]
             for name, counts in sorted(digest.runs_by_deployment.items()))), ""]
    if digest.registered or digest.promotions:
        lines += ["## Models", "", f"Registered: {', '.join(digest.registered) or 'none'}", ""]
        if digest.promotions:
            lines += _table(["action", "version", "previous", "at", "reason"],
                            ([p["action"], p["version"], p["previous"], p["at"],
                              str(p["reason"] or "").replace("|", "/")]
                             for p in digest.promotions))
            lines.append("")
    if digest.slides_scored:
        lines += ["## Slides scored", "", *_table(
            ["slide", "cells", "parasitemia %", "model", "re-scored"],
            ([r.get("slide"), r.get("cells_scored"), r.get("parasitemia_pct"),
              r.get("model_version"), "yes" if r.get("slide") in digest.rescored else ""]
             for r in digest.slides_scored)), ""]
    if digest.quarantined:
        lines += ["## Quarantined", "", *_table(["reason", "objects"],
                                                 sorted(digest.quarantined.items())), ""]
    if digest.problems:
        lines += ["## Not read", "", *(f"- {p}" for p in digest.problems), ""]
    return "\n".join(lines)


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
