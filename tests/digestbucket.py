"""A bucket holding one of everything the morning digest reads (shared by the digest's
tests with and without a Prefect server)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from malaria.core import layout
from malaria.ingest.manifest import ManifestRow, rows_to_csv
from malaria.io.store import Store, open_store
from malaria.registry.registry import ModelRegistry
from malaria.scoring.output import SlideSummary, summary_csv_bytes

LONG_AGO = "2020-01-01T00:00:00+00:00"


def digest_bucket(root: Path) -> Store:
    """Two models (one registered long ago) and a promotion; three slides scored (one long
    ago), one of them re-scored; one ingest run with three quarantined objects."""
    store = open_store(str(root))
    model = root.parent / "model.keras"
    model.write_bytes(b"not a real model")
    registry = ModelRegistry(store)
    registry.register("v-old", model, {"created_at": LONG_AGO}, {})
    registry.register("v-new", model, {}, {})
    registry.promote("v-new", reason="gate: better | AUC")
    now = datetime.now(UTC).isoformat(timespec="seconds")

    def row(slide: str, scored_at: str) -> SlideSummary:
        return SlideSummary(slide, 100, 5, 5.0, 0, 0.1, "v-new", scored_at, "fp")

    store.put_bytes(layout.PREDICTION_SUMMARY_KEY, summary_csv_bytes(
        [row("s1", now), row("s2", now), row("s3", LONG_AGO)]))
    store.put_bytes(layout.prediction_history_key("s1", "fp", "v-old"), b"old csv")
    rows = [ManifestRow("run-1", f"incoming/{i}.png", 1, "e", outcome, reason)
            for i, (outcome, reason) in enumerate([("accepted", ""),
                                                   ("quarantined", "unreadable_image"),
                                                   ("quarantined", "unreadable_image"),
                                                   ("quarantined", "no_label")])]
    store.put_bytes(layout.manifest_key("run-1"), rows_to_csv(rows))
    return store
