"""The prediction CSV, finalizing a slide (parts -> ``predictions/<slide>.csv`` -> marker)
and the per-slide ``summary.csv`` rebuilt from the markers."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from malaria.core.csvsafe import escape_record, escape_row, unescape_record
from malaria.core.labels import PARASITIZED
from malaria.evaluation.drift import probability_histogram
from malaria.io.store import ObjectInfo, ObjectNotFound, get_json, put_json
from malaria.scoring.due import marker_id, marker_names
from malaria.scoring.paths import ScoringError, ScoringPaths

if TYPE_CHECKING:
    from malaria.scoring.model import ModelRef
    from malaria.scoring.shards import SlidePlan

log = logging.getLogger(__name__)

PREDICTION_COLUMNS: tuple[str, ...] = (
    "key", "slide", "cell_file", "probability", "predicted_class", "threshold",
    "model_version", "scored_at", "error",
)
SUMMARY_COLUMNS: tuple[str, ...] = (
    "slide", "cells_scored", "parasitized", "parasitemia_pct", "unreadable",
    "mean_probability", "model_version", "scored_at", "scan_fingerprint",
)
_HEADER = ",".join(PREDICTION_COLUMNS) + "\r\n"  # what csv.writer writes for the header


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def csv_text(rows: Iterable[Sequence[str]]) -> str:
    """A prediction CSV (or one shard's part of it): the header, then ``rows``, each cell
    made formula-safe (:mod:`malaria.core.csvsafe`: a slide or file name is bucket data)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # "\r\n" line ends, RFC 4180; pandas reads it as is
    writer.writerow(PREDICTION_COLUMNS)
    writer.writerows(escape_row(row) for row in rows)
    return buffer.getvalue()


def read_prediction_rows(text: str) -> list[dict[str, str]]:
    """The rows of a prediction CSV (or part), or of ``summary.csv``, as they were before
    their cells were made formula-safe."""
    return [unescape_record(row) for row in csv.DictReader(io.StringIO(text, newline=""))]


def summary_csv_bytes(rows: Sequence[SlideSummary]) -> bytes:
    """``summary.csv``: one row per slide, cells formula-safe (``None`` is an empty cell)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)  # "\r\n": a CR is quoted
    writer.writeheader()
    writer.writerows(escape_record(r.to_dict()) for r in rows)
    return buffer.getvalue().encode()


def _summary_shows(data: bytes) -> tuple[set[tuple[str, str, str]], int]:
    """(slide, fingerprint, version) of each row of a ``summary.csv``, and its row count;
    ``ValueError`` for a file that is not one."""
    rows = read_prediction_rows(data.decode())
    if rows and not {"slide", "scan_fingerprint", "model_version"} <= set(rows[0]):
        raise ValueError("foreign columns")
    return {(r["slide"], r["scan_fingerprint"], r["model_version"]) for r in rows}, len(rows)


@dataclass(frozen=True)
class SlideSummary:
    slide: str
    cells_scored: int
    parasitized: int
    parasitemia_pct: float | None
    unreadable: int
    mean_probability: float | None
    model_version: str
    scored_at: str
    scan_fingerprint: str
    # The slide's scores binned as drift bins them: this run's drift check needs no second
    # read of the CSVs. Not a summary column (a rebuilt summary has none).
    probability_counts: tuple[int, ...] = field(default=(), compare=False, repr=False)
    # The scoring this one replaces, when the slide had one: its model version, scan
    # fingerprint, parasitemia and where its CSV is kept (not a summary column).
    previous: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def parasitemia_shift(self) -> float | None:
        """Points the parasitemia moved from the scoring this one replaces (None: no earlier
        scoring, or either is undefined)."""
        before = (self.previous or {}).get("parasitemia_pct")
        if before is None or self.parasitemia_pct is None:
            return None
        return round(self.parasitemia_pct - float(before), 3)

    @classmethod
    def from_rows(cls, slide: str, rows: Sequence[dict[str, str]], version: str,
                  fp: str) -> SlideSummary:
        probabilities = [float(r["probability"]) for r in rows if not r["error"]]
        parasitized = sum(1 for r in rows if r["predicted_class"] == PARASITIZED)
        scored = len(probabilities)
        return cls(
            slide=slide,
            cells_scored=scored,
            parasitized=parasitized,
            parasitemia_pct=round(100.0 * parasitized / scored, 3) if scored else None,
            unreadable=len(rows) - scored,
            mean_probability=round(float(np.mean(probabilities)), 6) if scored else None,
            model_version=version,
            scored_at=max((r["scored_at"] for r in rows), default=utc_now()),
            scan_fingerprint=fp,
            probability_counts=tuple(probability_histogram(probabilities)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The summary columns (what a marker and ``summary.csv`` hold)."""
        return {name: getattr(self, name) for name in SUMMARY_COLUMNS}


def finalize_slide(paths: ScoringPaths, ref: ModelRef, plan: SlidePlan) -> SlideSummary:
    """Concatenate the slide's parts into ``predictions/<slide>.csv`` (one whole PUT), then
    write the marker, then clear the parts. Refuses unless every cell is there exactly
    once."""
    out = paths.out_store()
    texts = []
    for shard in plan.shards:
        key = paths.part_key(shard, ref.version)
        try:
            text = out.get_bytes(key).decode()
        except ObjectNotFound as error:
            raise ScoringError(f"slide {plan.slide}: shard {shard.name} has no part {key}"
                               ) from error
        if not text.startswith(_HEADER):
            raise ScoringError(f"part {key} does not start with the prediction header")
        texts.append(text[len(_HEADER):])
    body = _HEADER + "".join(texts)
    rows = read_prediction_rows(body)  # unescaped: the keys as listed
    expected = [c.key for s in plan.shards for c in s.cells]
    if [r["key"] for r in rows] != expected:
        raise ScoringError(f"slide {plan.slide}: the parts do not hold each of its "
                           f"{len(expected)} cells exactly once ({len(rows)} rows)")
    summary = SlideSummary.from_rows(plan.slide, rows, ref.version, plan.fingerprint)
    # The CSV a lab may have read is copied aside before it is replaced.
    previous = keep_previous_scoring(paths, plan.slide, plan.fingerprint, ref.version)
    summary = replace(summary, previous=previous)
    out.put_bytes(paths.prediction_key(plan.slide), body.encode(), content_type="text/csv")
    marker = paths.marker_key(plan.slide, plan.fingerprint, ref.version)
    put_json(out, marker, {**summary.to_dict(), "cells": len(rows),
                           "shards": len(plan.shards), "threshold": ref.threshold,
                           "predictions": paths.prediction_key(plan.slide),
                           "previous": previous})
    # Pointer written: older markers and every part of the slide are now garbage.
    for info in list(out.list(paths.marker_prefix(plan.slide))):
        if info.key != marker:
            out.delete(info.key)
    for info in list(out.list(paths.parts_prefix(plan.slide))):
        out.delete(info.key)
    return summary


def keep_previous_scoring(paths: ScoringPaths, slide: str, fingerprint: str,
                          version: str) -> dict[str, Any] | None:
    """Copy the slide's current predictions CSV to its history key, keyed by the model
    version and scan fingerprint that made it (from its marker), unless it is already there;
    return what it was. Idempotent: a run killed after the copy copies nothing again, and a
    CSV of this very scoring (a run killed between the CSV and its marker) is not history.
    """
    out = paths.out_store()
    try:
        current = out.get_bytes(paths.prediction_key(slide))
    except ObjectNotFound:
        return None
    earlier = [m for m in out.list(paths.marker_prefix(slide))
               if marker_id(m) != (fingerprint, version)]
    if earlier:
        latest = max(earlier, key=lambda i: (i.last_modified, i.key))
        old_fp, old_version = marker_id(latest)
        try:
            record = get_json(out, latest.key)
        except (ObjectNotFound, ValueError):
            record = {}
    else:
        # No marker of another scoring: either the CSV is this scoring's (killed before its
        # marker) or its marker was lost. Its rows say which model wrote it.
        versions = {r.get("model_version", "") for r in read_prediction_rows(current.decode())}
        if versions == {version}:
            return None
        old_fp, old_version, record = "unmarked", "-".join(sorted(versions)) or "unknown", {}
    key = paths.history_key(slide, old_fp, old_version)
    if not out.exists(key):
        out.put_bytes(key, current, content_type="text/csv")
    return {"model_version": old_version, "scan_fingerprint": old_fp,
            "parasitemia_pct": record.get("parasitemia_pct"),
            "scored_at": record.get("scored_at"), "history_key": key}


def _slide_order(slide: str) -> tuple[int, int, str]:
    return (0, int(slide), "") if slide.isdigit() else (1, 0, slide)


def rebuild_summary(paths: ScoringPaths, *, concurrency: int = 16
                    ) -> tuple[bool, list[SlideSummary]]:
    """Rewrite ``predictions/summary.csv`` whole when it does not show exactly the latest
    marker of every slide; return (written, rows)."""
    out = paths.out_store()
    latest: dict[str, ObjectInfo] = {}
    for slide, infos in marker_names(paths, out).items():
        latest[slide] = max(infos, key=lambda i: (i.last_modified, i.key))
    expected = {(s, *marker_id(i)) for s, i in latest.items()}
    try:
        # Read as text and unescaped: the values the markers hold (pandas would turn a
        # slide "1.50" into 1.5, and a formula-safe "'=x" is the slide "=x").
        shown, count = _summary_shows(out.get_bytes(paths.summary_key))
        if shown == expected and count == len(expected):
            return False, []
    except ObjectNotFound:
        if not expected:
            return False, []
    except (KeyError, ValueError, csv.Error):  # unreadable or foreign columns: rebuild it
        log.warning("%s is unreadable; rebuilding it", paths.summary_key)
    slides = sorted(latest, key=_slide_order)
    with ThreadPoolExecutor(concurrency) as pool:
        records = list(pool.map(lambda s: get_json(out, latest[s].key), slides))
    rows = [SlideSummary(**{k: r.get(k) for k in SUMMARY_COLUMNS}) for r in records]
    out.put_bytes(paths.summary_key, summary_csv_bytes(rows), content_type="text/csv")
    return True, rows
