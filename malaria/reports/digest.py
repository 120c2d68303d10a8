"""The morning digest's bucket part: what the registry, the prediction summary and the ingest
manifests say about a window of time, and the digest rendered as markdown. No Prefect here:
``flows/digest.py`` adds the flow runs from the Prefect API, the artifact and the webhook.
A source that cannot be read leaves the rest of the digest and is listed under "Not read".
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from malaria.core import layout
from malaria.core.csvsafe import unescape_record
from malaria.core.settings import redact
from malaria.ingest.manifest import QUARANTINED, read_rows
from malaria.io.store import ObjectNotFound, Store
from malaria.registry.registry import ModelRegistry


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
    history = layout.prediction_history_prefix()
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
