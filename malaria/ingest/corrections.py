"""Label corrections: a reviewer's verdicts on cells already in dataset/.

A verdict file is a CSV under ``labels/corrections/`` with the columns key,label,reason,
reviewer (other columns are ignored, so the review template's hints may stay). ``key``
names a cell: its ``dataset/`` key, or the ``incoming/`` key it was ingested from (the
ledger maps that to where the cell is now, after any earlier correction). ``label`` is a
class (any synonym) or ``exclude``.

The ingest flow applies the waiting files, in key order, under the ingest lock and before
new incoming objects. Each row becomes one manifest row, with the reviewer, their reason
(``detail``) and ``verdict`` (the kept file and its line):

- another class: the cell is copied to ``dataset/<class>/<slide>/<file>`` and its old key
  deleted (``relabelled``);
- ``exclude``: the cell moves to ``quarantine/excluded/`` with a JSON sidecar (who, why)
  and leaves dataset/ (``excluded``);
- its own class: nothing moves (``unchanged``; so is a verdict an earlier run applied);
- anything else (unknown key, bad label, missing column or value, one cell twice in one
  file, an unreadable file): ``rejected``, with the reason and a detail. Never a crash.

The changes also form one ledger part, so later runs know the cell's new class (the original
incoming object stays ``already_ingested``; a re-upload of the same bytes under the new
class is a duplicate; excluded bytes stay out of dataset/). A changed dataset/ changes the
dataset manifest hash, so the next nightly training is not skipped as a repeat.

Writes go in this order: cells, the ledger part (the pointer), then each verdict file moves
to ``labels/corrections/applied/``. A run that dies before the ledger part is finished by
the next (a cell already at its target counts as moved); one that dies after it reads the
verdicts again as already applied (``unchanged``).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from malaria.core import layout
from malaria.core.csvsafe import escape_row, unescape_cell
from malaria.core.images import decode_rgb
from malaria.core.labels import CLASS_NAMES, canonical_class
from malaria.dataset.decode import to_square
from malaria.ingest.ledger import EXCLUDE, Ledger, content64, digest64
from malaria.ingest.manifest import (
    ACCEPTED,
    EXCLUDED,
    REJECTED,
    RELABELLED,
    RETRACTED,
    UNCHANGED,
    ManifestRow,
    read_rows,
    rows_to_csv,
)
from malaria.io.atomic import write_atomic
from malaria.io.store import ObjectInfo, ObjectNotFound, Store, WriteConflict, key_problem

VERDICT_COLUMNS = ("key", "label", "reason", "reviewer")
EXCLUDED_FOLDER = "excluded"  # quarantine/excluded/<file>
RELABEL_REASON = "label_correction"
CONFIRM_REASON = "label_confirmed"
ALREADY_APPLIED = "already_applied"
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


def corrections_ledger_key(run_id: str) -> str:
    """The ledger part of a run's corrections. It sorts right before the run's first chunk
    part ("-" < "."), so a replay of the ledger meets the corrections first, as the run
    applied them."""
    return layout.ingest_ledger_key(run_id, 0).removesuffix(".csv") + "-corrections.csv"


# ------------------------------------------------------------------------- verdict files


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


# ------------------------------------------------------------------ where each cell is now


@dataclass(frozen=True)
class Cell:
    key: str  # its dataset/ key now
    label: str
    slide: str
    sha256: str  # of the ingested bytes (the ledger's content id)
    source_key: str  # the incoming/ object it came from ("" when the ledger never saw it)


@dataclass
class DatasetIndex:
    """The ledger replayed into where each cell is, for resolving a verdict's key. Built
    only when verdict files wait (it reads every ledger part once more)."""

    cells: dict[str, Cell] = field(default_factory=dict)  # dataset key -> cell
    by_source: dict[str, str] = field(default_factory=dict)  # incoming key -> dataset key
    gone: dict[str, ManifestRow] = field(default_factory=dict)  # old key -> verdict row

    def record(self, row: ManifestRow) -> None:
        if row.outcome == ACCEPTED and row.dataset_key:
            self.cells[row.dataset_key] = Cell(row.dataset_key, row.label, row.slide,
                                               row.sha256, row.source_key)
            self.by_source[row.source_key] = row.dataset_key
        elif row.outcome == RETRACTED:
            self.cells.pop(row.dataset_key, None)
        elif row.outcome in (RELABELLED, EXCLUDED):
            cell = self.cells.pop(row.source_key, None)
            self.gone[row.source_key] = row
            if row.outcome == RELABELLED:
                origin = cell.source_key if cell else ""
                self.cells[row.dataset_key] = Cell(row.dataset_key, row.label, row.slide,
                                                   row.sha256, origin)
                self.gone.pop(row.dataset_key, None)  # moved back to a key it had left
                if origin:
                    self.by_source[origin] = row.dataset_key

    def resolve(self, key: str) -> tuple[Cell | None, ManifestRow | None]:
        """The cell ``key`` names now, and the last verdict row that moved or removed it
        when ``key`` is a place it has left (cell None: excluded, or unknown)."""
        if key.startswith(layout.INCOMING) and key in self.by_source:
            key = self.by_source[key]
        if key in self.cells:
            return self.cells[key], None
        via: ManifestRow | None = None
        seen: set[str] = set()
        while key in self.gone and key not in seen:
            seen.add(key)
            via = self.gone[key]
            if via.outcome == EXCLUDED:
                return None, via
            key = via.dataset_key
            if key in self.cells:
                return self.cells[key], via
        return None, via


def load_dataset_index(store: Store) -> DatasetIndex:
    index = DatasetIndex()
    for info in store.list(layout.INGEST_LEDGER):  # the order load_ledger replays in
        for row in read_rows(store.get_bytes(info.key)):
            index.record(row)
    return index


def _cell_outside_ledger(store: Store, key: str) -> Cell | None:
    """A ``dataset/<class>/<slide>/<file>`` object the ledger never saw (put there by hand):
    its content id is the hash of its bytes."""
    parts = key.removeprefix(layout.DATASET).split("/")
    if not key.startswith(layout.DATASET) or len(parts) != 3:
        return None
    class_name = canonical_class(parts[0])
    if class_name != parts[0]:
        return None
    try:
        data = store.get_bytes(key)
    except ObjectNotFound:
        return None
    return Cell(key, class_name, parts[1], hashlib.sha256(data).hexdigest(), "")


# ------------------------------------------------------------------------------ applying


@dataclass
class CorrectionsResult:
    rows: list[ManifestRow]  # one per verdict row (or per unreadable file), file order
    ledger_key: str | None  # None when nothing changed
    applied: dict[str, str] = field(default_factory=dict)  # verdict file -> kept copy

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row.outcome] = counts.get(row.outcome, 0) + 1
        return counts


class ApplyCorrections:
    """Apply every waiting verdict file (see the module docstring for the rules)."""

    def __init__(self, store: Store, ledger: Ledger, *, run_id: str, applied_at: datetime,
                 before_commit: Callable[[], None] | None = None) -> None:
        self.store = store
        # Read only until the changes are committed (recorded into it last), so a retried
        # attempt decides from the same state as the first.
        self.ledger = ledger
        self.run_id = run_id
        # The same for every attempt of the run, so the kept files' keys and each row's
        # ``verdict`` are too (a retry recognises what its first attempt did).
        self.applied_at = applied_at
        self.before_commit = before_commit
        self._used: dict[int, int] = {}  # target dataset keys chosen by this run -> content

    def run(self) -> CorrectionsResult:
        files = pending_verdict_files(self.store)
        if not files:
            return CorrectionsResult([], None)
        index = load_dataset_index(self.store)
        rows: list[ManifestRow] = []
        applied: dict[str, str] = {}
        for number, info in enumerate(files, start=1):
            name = info.key.removeprefix(layout.LABEL_CORRECTIONS)
            kept = layout.correction_applied_key(name, self.applied_at)
            if kept in applied.values():  # two names made the same safe name ("a b", "a_b")
                kept = layout.correction_applied_key(f"{number}-{name}", self.applied_at)
            applied[info.key] = kept
            rows += self._decide_file(info, kept, index)
        changes = [row for row in rows if row.outcome in (RELABELLED, EXCLUDED)]
        if self.before_commit is not None:
            self.before_commit()
        for row in changes:
            self._commit(row)
        ledger_key = None
        if changes:
            # The pointer: written after every cell it describes has moved.
            ledger_key = corrections_ledger_key(self.run_id)
            self.store.put_bytes(ledger_key, rows_to_csv(changes), content_type="text/csv")
        for source, kept in applied.items():
            # Kept, never edited: the manifest's ``verdict`` points at this copy.
            with contextlib.suppress(ObjectNotFound):  # moved by a failed earlier attempt
                self.store.copy(source, kept)
            self.store.delete(source)
        for row in changes:
            self.ledger.record(row)
        return CorrectionsResult(rows, ledger_key, applied)

    # Deciding: reads only.

    def _decide_file(self, info: ObjectInfo, kept: str,
                     index: DatasetIndex) -> list[ManifestRow]:
        try:
            parsed = parse_verdicts(self.store.get_bytes(info.key))
        except ObjectNotFound:
            parsed = VerdictFile([], unreadable="deleted between listing and reading")
        if parsed.unreadable or (parsed.missing_columns and not parsed.verdicts):
            detail = parsed.unreadable or (
                f"the file has no {', '.join(parsed.missing_columns)} column; a verdict "
                f"file needs {','.join(VERDICT_COLUMNS)}")
            reason = UNREADABLE_FILE if parsed.unreadable else MISSING_COLUMNS
            return [ManifestRow(self.run_id, info.key, info.size, info.etag, REJECTED,
                                reason=reason, detail=detail, verdict=kept)]
        rows = []
        ruled: dict[str, int] = {}  # this file's cells (by content: keys move) -> line
        for verdict in parsed.verdicts:
            row = self._decide(verdict, f"{kept}:{verdict.line}", index, ruled)
            # A later row sees the cell where it is now (a row an earlier attempt committed
            # is in the index already).
            if row.outcome in (RELABELLED, EXCLUDED) and index.gone.get(row.source_key) is not row:
                index.record(row)
            rows.append(row)
        return rows

    def _decide(self, verdict: Verdict, where: str, index: DatasetIndex,
                ruled: dict[str, int]) -> ManifestRow:
        row = ManifestRow(self.run_id, verdict.key, 0, "", REJECTED, label=verdict.label,
                          reviewer=verdict.reviewer, verdict=where)
        if verdict.problem:
            return self._reject(row, verdict.problem, verdict.detail)
        if key_problem(verdict.key) or not verdict.key.startswith(
                (layout.DATASET, layout.INCOMING)):
            return self._reject(row, UNKNOWN_KEY, "not a dataset/ or incoming/ key")
        cell, via = index.resolve(verdict.key)
        if via is not None and via.run_id == self.run_id and via.verdict == where:
            return via  # this verdict, committed by an earlier attempt of this run
        if cell is None and via is None and verdict.key.startswith(layout.DATASET):
            cell = _cell_outside_ledger(self.store, verdict.key)
        if cell is None:
            if via is not None:  # excluded earlier
                if verdict.label == EXCLUDE:
                    return self._unchanged(row, ALREADY_APPLIED, via, verdict)
                return self._reject(row, ALREADY_EXCLUDED,
                                    f"excluded by {via.reviewer} ({via.verdict}, run "
                                    f"{via.run_id}); an excluded cell stays out of dataset/")
            return self._reject(row, UNKNOWN_KEY, "no such cell in dataset/, and not an "
                                "incoming/ key the ledger knows")
        if cell.sha256 in ruled:
            return self._reject(row, REPEATED_KEY, f"this file rules on this cell already "
                                f"(line {ruled[cell.sha256]})")
        ruled[cell.sha256] = verdict.line
        row.slide, row.sha256, row.dataset_key = cell.slide, cell.sha256, cell.key
        if verdict.label == cell.label:
            if via is not None:
                return self._unchanged(row, ALREADY_APPLIED, via, verdict)
            return self._unchanged(row, CONFIRM_REASON, None, verdict)
        found = self.store.head(cell.key)
        row.source_key = cell.key
        row.size, row.etag = (found.size, found.etag) if found else (0, "")
        row.detail = verdict.reason
        if verdict.label == EXCLUDE:
            row.outcome, row.reason, row.label = EXCLUDED, EXCLUDED_FOLDER, cell.label
            row.dataset_key = ""  # it leaves dataset/
            row.quarantine_key = layout.quarantine_key(EXCLUDED_FOLDER, cell.key)
            done = found is None and self.store.exists(row.quarantine_key)
        else:
            row.outcome, row.reason = RELABELLED, RELABEL_REASON
            row.dataset_key = self._target(cell, verdict.label)
            done = found is None and self.store.exists(row.dataset_key)
        if found is None and not done:
            return self._reject(replace(row, outcome=REJECTED, dataset_key="",
                                        quarantine_key="", label=verdict.label),
                                UNKNOWN_KEY, f"{cell.key} is in the ledger but no longer in "
                                "dataset/")
        return row

    def _target(self, cell: Cell, label: str) -> str:
        """The cell's key in its new class folder; a short content tag when another cell
        already has that name there (as ingest names cells)."""
        content = content64(cell.sha256)
        name = PurePosixPath(cell.key).name
        key = layout.dataset_key(label, cell.slide, name)
        owner = self._used.get(digest64(key)) or self.ledger.dataset_keys.get(digest64(key))
        if owner is not None and owner != content:
            stem, dot, ext = name.rpartition(".")
            tagged = f"{stem}-{cell.sha256[:8]}.{ext}" if dot else f"{name}-{cell.sha256[:8]}"
            key = layout.dataset_key(label, cell.slide, tagged)
        self._used[digest64(key)] = content
        return key

    @staticmethod
    def _reject(row: ManifestRow, reason: str, detail: str) -> ManifestRow:
        row.outcome, row.reason, row.detail = REJECTED, reason, detail
        return row

    @staticmethod
    def _unchanged(row: ManifestRow, reason: str, via: ManifestRow | None,
                   verdict: Verdict) -> ManifestRow:
        row.outcome, row.reason = UNCHANGED, reason
        row.detail = verdict.reason if via is None else (
            f"{verdict.reason} (already applied: {via.outcome} by {via.reviewer}, "
            f"{via.verdict}, run {via.run_id})")
        return row

    # Committing: idempotent, so a retry or the next run can finish a half-done one.

    def _commit(self, row: ManifestRow) -> None:
        if row.outcome == RELABELLED:
            # Missing: an earlier attempt moved it already (checked when deciding).
            with contextlib.suppress(ObjectNotFound):
                self.store.copy(row.source_key, row.dataset_key)
        else:
            with contextlib.suppress(ObjectNotFound):
                self.store.copy(row.source_key, row.quarantine_key)
            self.store.put_bytes(row.quarantine_key + ".json", _sidecar(row),
                                 content_type="application/json")
        self.store.delete(row.source_key)


def _sidecar(row: ManifestRow) -> bytes:
    return json.dumps({
        "source_key": row.source_key, "reason": row.reason, "detail": row.detail,
        "reviewer": row.reviewer, "verdict": row.verdict, "run_id": row.run_id,
        "sha256": row.sha256, "label": row.label, "size": row.size,
        "quarantined_at": datetime.now(UTC).isoformat(),
    }, indent=2, ensure_ascii=False).encode()


def apply_corrections(store: Store, ledger: Ledger, *, run_id: str, applied_at: datetime,
                      before_commit: Callable[[], None] | None = None) -> CorrectionsResult:
    """Apply every verdict file waiting under ``labels/corrections/``; records the changes
    into ``ledger`` once they are committed."""
    return ApplyCorrections(store, ledger, run_id=run_id, applied_at=applied_at,
                            before_commit=before_commit).run()


# --------------------------------------------------------- for the reviewer (the CLI)


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
