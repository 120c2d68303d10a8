"""Label corrections: a reviewer's verdicts on cells already in dataset/, applied.

A verdict file (read by :mod:`malaria.ingest.verdicts`) is a CSV under
``labels/corrections/`` with the columns key,label,reason,reviewer (other columns are
ignored, so the review template's hints may stay). ``key`` names a cell: its ``dataset/``
key, or the ``incoming/`` key it was ingested from (the ledger maps that to where the cell
is now, after any earlier correction). ``label`` is a class (any synonym) or ``exclude``.

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
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import PurePosixPath

from malaria.core import layout
from malaria.core.labels import canonical_class
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
from malaria.ingest.verdicts import (
    ALREADY_EXCLUDED,
    MISSING_COLUMNS,
    REPEATED_KEY,
    UNKNOWN_KEY,
    UNREADABLE_FILE,
    VERDICT_COLUMNS,
    Verdict,
    VerdictFile,
    parse_verdicts,
    pending_verdict_files,
)
from malaria.io.store import ObjectInfo, ObjectNotFound, Store, key_problem

EXCLUDED_FOLDER = "excluded"  # quarantine/excluded/<file>
RELABEL_REASON = "label_correction"
CONFIRM_REASON = "label_confirmed"
ALREADY_APPLIED = "already_applied"


def corrections_ledger_key(run_id: str) -> str:
    """The ledger part of a run's corrections. It sorts right before the run's first chunk
    part ("-" < "."), so a replay of the ledger meets the corrections first, as the run
    applied them."""
    return layout.ingest_ledger_key(run_id, 0).removesuffix(".csv") + "-corrections.csv"



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
