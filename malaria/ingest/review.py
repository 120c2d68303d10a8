"""For the reviewer (``malaria labels review``): the cells a registered model contradicts
most confidently, written out as a verdict-file template with thumbnails."""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from malaria.core import layout
from malaria.core.csvsafe import escape_row
from malaria.core.images import decode_rgb
from malaria.dataset.decode import to_square
from malaria.ingest.verdicts import VERDICT_COLUMNS
from malaria.io.atomic import write_atomic
from malaria.io.store import ObjectNotFound, Store, key_problem


@dataclass(frozen=True)
class ReviewCell:
    key: str
    slide: str
    label: str
    probability: float  # the model's P(parasitized)


def cells_to_review(record: Mapping[str, Any], limit: int | None = None) -> list[ReviewCell]:
    """The cells a registered model contradicts most confidently (its ``label_review``,
    worst first). The record is bucket data: entries that are not a cell are skipped."""
    entries = record.get("label_review")
    cells = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            continue
        try:
            probability = float(entry.get("probability", float("nan")))
        except (TypeError, ValueError):
            probability = float("nan")
        cells.append(ReviewCell(entry["key"], str(entry.get("slide", "")),
                                str(entry.get("label", "")), probability))
    return cells if limit is None else cells[:max(0, limit)]


def thumbnail_png(data: bytes, side: int = 128) -> bytes:
    """A cell as a square PNG of ``side`` px (padded as the model sees it, not stretched)."""
    buffer = io.BytesIO()
    Image.fromarray(to_square(decode_rgb(data), side)).save(buffer, format="PNG")
    return buffer.getvalue()


REVIEW_COLUMNS = (*VERDICT_COLUMNS, "current_label", "slide", "p_parasitized", "thumbnail")


def write_review(store: Store, cells: Iterable[ReviewCell], out: Path, *,
                 side: int = 128) -> Path:
    """``out/review.csv`` (key,label,reason,reviewer to fill in, then hints that ingest
    ignores) and ``out/thumbnails/NN-<file>.png``; returns the CSV's path. A cell no
    longer in the bucket (corrected since) gets no thumbnail."""
    out = Path(out)
    lines = [list(REVIEW_COLUMNS)]
    for number, cell in enumerate(cells, start=1):
        thumbnail = ""
        if key_problem(cell.key) is None and cell.key.startswith(layout.DATASET):
            # A thumbnail is a help, not a must: a cell that will not read or decode has none.
            with contextlib.suppress(ObjectNotFound, OSError, ValueError,
                                     Image.DecompressionBombError):
                png = thumbnail_png(store.get_bytes(cell.key), side)
                name = layout.safe_file_name(PurePosixPath(cell.key).name).rsplit(".", 1)[0]
                thumbnail = f"thumbnails/{number:02d}-{name}.png"
                write_atomic(out / thumbnail, png)
        lines.append(escape_row([cell.key, "", "", "", cell.label, cell.slide,
                                 f"{cell.probability:.4f}", thumbnail]))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    path = out / "review.csv"
    write_atomic(path, buffer.getvalue())
    return path
