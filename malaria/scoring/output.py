"""The prediction CSV, finalizing a slide (parts -> ``predictions/<slide>.csv`` -> marker)
and the per-slide ``summary.csv`` rebuilt from the markers."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    out.put_bytes(paths.prediction_key(plan.slide), body.encode(), content_type="text/csv")
    marker = paths.marker_key(plan.slide, plan.fingerprint, ref.version)
    put_json(out, marker, {**summary.to_dict(), "cells": len(rows),
                           "shards": len(plan.shards), "threshold": ref.threshold,
                           "predictions": paths.prediction_key(plan.slide)})
    # Pointer written: older markers and every part of the slide are now garbage.
    for info in list(out.list(paths.marker_prefix(plan.slide))):
        if info.key != marker:
            out.delete(info.key)
    for info in list(out.list(paths.parts_prefix(plan.slide))):
        out.delete(info.key)
    return summary


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
