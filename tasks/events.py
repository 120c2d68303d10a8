"""Prefect events the pipeline emits, so automations can react to what happened in the
bucket (a promoted model or new scans start ``bulk-scoring``: deployments/prefect.yaml) and
the UI's event feed shows it.

Resources are named ``malaria.model.<version>`` and ``malaria.bucket.<bucket>``; payloads
hold counts, versions and redacted URLs, never credentials. Emitting is a notice, not part of
the work: every helper logs and returns ``None`` rather than raise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from prefect.events import Event, emit_event

from malaria.core.settings import redact

log = logging.getLogger(__name__)

MODEL_PROMOTED = "malaria.model.promoted"
CELLS_UPLOADED = "malaria.cells.uploaded"
CELLS_INGESTED = "malaria.cells.ingested"
SCANS_UPLOADED = "malaria.scans.uploaded"
SCORING_DRIFT = "malaria.scoring.drift"
PARASITEMIA_CHANGED = "malaria.slide.parasitemia-changed"
# The events that make bulk-scoring run (the triggers in deployments/prefect.yaml).
SCORING_TRIGGERS = (MODEL_PROMOTED, SCANS_UPLOADED)
# A payload lists at most this many slides: an event stays small whatever was uploaded.
MAX_LISTED = 100


def bucket_resource(data_url: str | None, role: str | None = None) -> dict[str, str]:
    """``malaria.bucket.<bucket>`` for ``s3://bucket/prefix``; ``malaria.bucket.local`` for a
    folder. The URL (redacted) is a label, so automations may match on a prefix."""
    url = data_url or ""
    parts = urlsplit(url)
    name = parts.hostname if parts.scheme == "s3" and parts.hostname else "local"
    resource = {"prefect.resource.id": f"malaria.bucket.{name}",
                "prefect.resource.name": name, "malaria.data-url": redact(url)}
    if role:
        resource["prefect.resource.role"] = role
    return resource


def model_resource(version: str) -> dict[str, str]:
    return {"prefect.resource.id": f"malaria.model.{version}",
            "prefect.resource.name": f"model {version}"}


def _emit(event: str, resource: dict[str, str], payload: dict[str, Any],
          related: list[dict[str, str]] | None = None) -> Event | None:
    try:
        return emit_event(event=event, resource=resource, payload=payload, related=related)
    except Exception as error:  # EventTooLarge or a client problem: the work is done anyway
        log.warning("could not emit %s: %s", event, redact(str(error)))
        return None


def emit_model_promoted(version: str, reason: str, *, data_url: str | None = None,
                        previous: str | None = None, source: str = "gate") -> Event | None:
    """A model became champion (the gate, an approval, ``malaria models promote``)."""
    related = [bucket_resource(data_url, role="registry")] if data_url else None
    return _emit(MODEL_PROMOTED, model_resource(version),
                 {"version": version, "previous": previous, "reason": redact(reason),
                  "source": source}, related)


def emit_drift_flagged(version: str, message: str, *, cells: int, psi: float | None,
                       positive_rate: float | None, reference_positive_rate: float | None,
                       data_url: str | None = None) -> Event | None:
    """A scoring run's scores drifted from the champion's validation slides (drift.flagged):
    the server's notification automation forwards it (deployments/local.py)."""
    related = [bucket_resource(data_url, role="predictions")] if data_url else None
    return _emit(SCORING_DRIFT, model_resource(version),
                 {"version": version, "message": redact(message), "cells": int(cells),
                  "psi": _finite(psi), "positive_rate": _finite(positive_rate),
                  "reference_positive_rate": _finite(reference_positive_rate)}, related)


def _finite(value: float | None) -> float | None:
    # NaN (PSI with an empty bin) is not JSON: the payload says "unknown" instead.
    return value if value is not None and math.isfinite(value) else None


def emit_cells_ingested(data_url: str, counts: Mapping[str, int], run_id: str
                        ) -> Event | None:
    """An ingest run sorted incoming/ into dataset/ (counts per outcome)."""
    return _emit(CELLS_INGESTED, bucket_resource(data_url),
                 {"run_id": run_id, "counts": {k: int(v) for k, v in counts.items()}})


def emit_scans_uploaded(data_url: str, files: int, prefix: str,
                        slides: Sequence[str] = ()) -> Event | None:
    """New slide scans landed under ``prefix`` (scans/): they may be due for scoring."""
    listed = sorted(set(slides))
    return _emit(SCANS_UPLOADED, bucket_resource(data_url),
                 {"files": files, "prefix": prefix, "slides": listed[:MAX_LISTED],
                  "slide_count": len(listed)})


def emit_cells_uploaded(data_url: str, files: int, prefix: str) -> Event | None:
    """Labelled cells landed under ``prefix`` (incoming/) for the next ingest."""
    return _emit(CELLS_UPLOADED, bucket_resource(data_url),
                 {"files": files, "prefix": prefix})


def api_configured() -> bool:
    """Whether a Prefect API is named. Outside a flow run, emitting without one would start
    an ephemeral server just to drop the event."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def flush_events(timeout: float = 10.0) -> None:
    """Send what is queued before a short-lived command exits (events go out from a
    background worker)."""
    from prefect.events.worker import EventsWorker

    try:
        EventsWorker.drain_all(timeout=timeout)
    except Exception as error:  # the command's work is done; the event is best effort
        log.warning("could not send queued events: %s", redact(str(error)))
