"""Verdict files: a reviewer's CSV of label verdicts (key,label,reason,reviewer), read
without ever raising (a bad row is that row's ``problem``) and uploaded for the next ingest
run to apply (:mod:`malaria.ingest.corrections`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass, replace

from malaria.core import layout
from malaria.core.csvsafe import unescape_cell
from malaria.core.labels import CLASS_NAMES, canonical_class
from malaria.ingest.ledger import EXCLUDE
from malaria.io.store import ObjectInfo, Store, WriteConflict, key_problem

VERDICT_COLUMNS = ("key", "label", "reason", "reviewer")
MAX_TEXT = 500  # a reason or reviewer longer than this is cut: a manifest cell, not a report

# Why a verdict row was not applied.
UNREADABLE_FILE = "unreadable_file"
MISSING_COLUMNS = "missing_columns"
MISSING_VALUE = "missing_value"
BAD_LABEL = "bad_label"
UNKNOWN_KEY = "unknown_key"
REPEATED_KEY = "repeated_key"
ALREADY_EXCLUDED = "already_excluded"


class VerdictFileError(ValueError):
    """A verdict file that cannot be uploaded as it is (``malaria labels apply``)."""



@dataclass(frozen=True)
class Verdict:
    """One row of a verdict file; ``problem`` (a rejection reason) when it cannot apply."""

    line: int
    key: str
    label: str  # a class name or EXCLUDE; as written when ``problem`` is set
    reason: str
    reviewer: str
    problem: str = ""
    detail: str = ""


@dataclass(frozen=True)
class VerdictFile:
    verdicts: list[Verdict]
    missing_columns: tuple[str, ...] = ()
    unreadable: str = ""  # why the file cannot be read at all ("" when it can)


def verdict_label(text: str) -> str | None:
    """A class name, EXCLUDE, or None for anything else."""
    return EXCLUDE if text.strip().lower() == EXCLUDE else canonical_class(text)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"


def parse_verdicts(data: bytes) -> VerdictFile:
    """Read a verdict file. Nothing here raises: a problem of one row is that row's
    ``problem``, a problem of the whole file is ``unreadable``. Blank rows are skipped."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return VerdictFile([], unreadable="not UTF-8 text")
    reader = csv.reader(io.StringIO(text, newline=""))
    verdicts: list[Verdict] = []
    columns: dict[str, int] | None = None
    missing: tuple[str, ...] = ()
    try:
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            if columns is None:
                names = [cell.strip().lower() for cell in cells]
                columns = {name: names.index(name) for name in VERDICT_COLUMNS if name in names}
                missing = tuple(name for name in VERDICT_COLUMNS if name not in columns)
                continue
            # Cells as our template wrote them (formula-safe), read back as typed.
            values = {name: unescape_cell(cells[i].strip()) if i < len(cells) else ""
                      for name, i in columns.items()}
            verdicts.append(_verdict(reader.line_num, values, missing))
    except csv.Error as error:  # a half-read file must not half-apply
        return VerdictFile([], unreadable=f"not a CSV file: {error}")
    if columns is None:
        return VerdictFile([], unreadable="empty: no header and no rows")
    return VerdictFile(verdicts, missing)


def _verdict(line: int, values: Mapping[str, str], missing: tuple[str, ...]) -> Verdict:
    key = values.get("key", "").lstrip("/")
    written = values.get("label", "")
    reason, reviewer = _clip(values.get("reason", "")), _clip(values.get("reviewer", ""))
    base = Verdict(line, key, written, reason, reviewer)
    if missing:
        return replace(base, problem=MISSING_COLUMNS, detail=(
            f"the file has no {', '.join(missing)} column; a verdict file needs "
            f"{','.join(VERDICT_COLUMNS)}"))
    empty = [name for name in VERDICT_COLUMNS if not values.get(name, "")]
    if empty:
        return replace(base, problem=MISSING_VALUE, detail=f"no {', '.join(empty)} given")
    label = verdict_label(written)
    if label is None:
        return replace(base, problem=BAD_LABEL, detail=(
            f"unknown label {_clip(written)!r}: a class ({', '.join(CLASS_NAMES)} or a "
            f"synonym) or {EXCLUDE!r}"))
    return replace(base, label=label)


def pending_verdict_files(store: Store) -> list[ObjectInfo]:
    """Verdict files waiting under ``labels/corrections/`` (not ``applied/``), key order."""
    return [info for info in store.list(layout.LABEL_CORRECTIONS)
            if not info.key.startswith(layout.LABEL_CORRECTIONS_APPLIED)
            and info.key.lower().endswith(".csv") and key_problem(info.key) is None]



def upload_verdicts(store: Store, data: bytes, name: str) -> str:
    """Put a verdict file under ``labels/corrections/`` for the next ingest run; returns its
    key. Refuses a file without the four columns, and a name already waiting there."""
    parsed = parse_verdicts(data)
    if parsed.unreadable:
        raise VerdictFileError(f"{name}: {parsed.unreadable}")
    if parsed.missing_columns:
        raise VerdictFileError(f"{name}: no {', '.join(parsed.missing_columns)} column; a "
                               f"verdict file needs {','.join(VERDICT_COLUMNS)}")
    file_name = layout.safe_file_name(name)
    if not file_name.lower().endswith(".csv"):
        file_name += ".csv"  # ingest reads only .csv files there
    key = f"{layout.LABEL_CORRECTIONS}{file_name}"
    try:
        store.put_if_absent(key, data, content_type="text/csv")
    except WriteConflict:
        raise VerdictFileError(f"{store.uri(key)} is waiting to be applied already: upload "
                               "under another name") from None
    return key
