"""What became of each object a run read (:class:`ManifestRow`), the run's manifest CSV and
its counts (:class:`IngestSummary`: listed = accepted + duplicate + quarantined +
already_ingested). A run's label corrections (malaria.ingest.corrections) are rows of the
same manifest, counted apart: they change cells already ingested, not objects listed."""

from __future__ import annotations

import csv
import hashlib
import io
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from malaria.core.csvsafe import escape_record, unescape_record
from malaria.io.store import Store

if TYPE_CHECKING:
    from malaria.ingest.chunk import ChunkResult

ACCEPTED = "accepted"
DUPLICATE = "duplicate"
QUARANTINED = "quarantined"
ALREADY_INGESTED = "already_ingested"
RETRACTED = "retracted"  # an earlier accepted object moved to quarantine by a label conflict
OUTCOMES = (ACCEPTED, DUPLICATE, QUARANTINED, ALREADY_INGESTED)
# A reviewer's verdict on an ingested cell (malaria.ingest.corrections): moved to another
# class, removed from dataset/, confirmed as it is, or not applied (the reason says why).
RELABELLED = "relabelled"
EXCLUDED = "excluded"
UNCHANGED = "unchanged"
REJECTED = "rejected"
CORRECTION_OUTCOMES = (RELABELLED, EXCLUDED, UNCHANGED, REJECTED)

LABEL_CONFLICT = "label_conflict"


@dataclass
class ManifestRow:
    """One object read by a run, and what became of it."""

    run_id: str
    source_key: str
    size: int
    etag: str
    outcome: str
    reason: str = ""
    detail: str = ""
    label: str = ""
    slide: str = ""
    sha256: str = ""
    dataset_key: str = ""
    duplicate_of: str = ""
    quarantine_key: str = ""
    format: str = ""
    width: int = 0
    height: int = 0
    converted_from: str = ""
    # Label corrections only: who gave the verdict, and where (verdict file:line).
    reviewer: str = ""
    verdict: str = ""


MANIFEST_COLUMNS = [f.name for f in fields(ManifestRow)]


def read_rows(data: bytes) -> Iterator[ManifestRow]:
    """The rows :func:`rows_to_csv` was given (its formula-safe cells unescaped)."""
    for record in csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")):
        record = unescape_record(record)
        values = {name: record.get(name, "") for name in MANIFEST_COLUMNS}
        values["size"] = int(values["size"] or 0)
        values["width"] = int(values["width"] or 0)
        values["height"] = int(values["height"] or 0)
        yield ManifestRow(**values)  # type: ignore[arg-type]


def rows_to_csv(rows: Iterable[ManifestRow], *, header: bool = True) -> bytes:
    """Manifest (or ledger part) rows as CSV. Keys, slides and details are bucket data and a
    person opens manifests in a spreadsheet: every cell is formula-safe
    (:mod:`malaria.core.csvsafe`). "\r\n" line ends, so a value holding a CR is quoted
    (with "\n" alone the csv module leaves it bare and the file no longer reads back)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\r\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow(escape_record(asdict(row)))
    return buffer.getvalue().encode("utf-8")


# ------------------------------------------------------------------------------- a whole run


@dataclass
class IngestSummary:
    run_id: str
    listed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    retracted: int = 0
    chunks: int = 0
    manifest_key: str = ""
    corrections: Counter[str] = field(default_factory=Counter)  # outcome -> verdict rows
    rejections: Counter[str] = field(default_factory=Counter)  # reason -> rejected verdicts

    def add(self, result: ChunkResult) -> None:
        self.chunks += 1
        self.listed += len(result.rows)
        self.retracted += len(result.retracted)
        for row in result.rows:
            self.outcomes[row.outcome] += 1
            if row.outcome == QUARANTINED:
                self.reasons[row.reason] += 1

    def add_corrections(self, rows: Iterable[ManifestRow]) -> None:
        for row in rows:
            self.corrections[row.outcome] += 1
            if row.outcome == REJECTED:
                self.rejections[row.reason] += 1

    def corrections_line(self) -> str:
        if not self.corrections:
            return "label corrections: none"
        return "label corrections: " + ", ".join(
            f"{outcome} {self.corrections[outcome]}" for outcome in CORRECTION_OUTCOMES
            if self.corrections[outcome])

    @property
    def balanced(self) -> bool:
        return self.listed == sum(self.outcomes[o] for o in OUTCOMES)

    def invariant_line(self) -> str:
        o = self.outcomes
        verdict = "holds" if self.balanced else "VIOLATED"
        return (f"listed {self.listed} = accepted {o[ACCEPTED]} + duplicates {o[DUPLICATE]} + "
                f"quarantined {o[QUARANTINED]} + already-ingested {o[ALREADY_INGESTED]} "
                f"({verdict})")

    def table(self) -> list[dict[str, object]]:
        """Counts by outcome and quarantine reason, for reports."""
        table: list[dict[str, object]] = [
            {"outcome": outcome, "reason": "", "count": self.outcomes[outcome]}
            for outcome in OUTCOMES
        ]
        table += [{"outcome": QUARANTINED, "reason": reason, "count": count}
                  for reason, count in sorted(self.reasons.items())]
        if self.retracted:
            table.append({"outcome": RETRACTED, "reason": LABEL_CONFLICT,
                          "count": self.retracted})
        table.append({"outcome": "listed", "reason": "", "count": self.listed})
        # After "listed": verdict rows are not objects listed, so they stay out of its sum.
        table += [{"outcome": outcome, "reason": "label_correction", "count": count}
                  for outcome in (RELABELLED, EXCLUDED, UNCHANGED)
                  if (count := self.corrections[outcome])]
        table += [{"outcome": REJECTED, "reason": reason, "count": count}
                  for reason, count in sorted(self.rejections.items())]
        return table


class ManifestWriter:
    """Accumulates a run's manifest on local disk (not in memory) and uploads it whole."""

    def __init__(self) -> None:
        # Kept open for the whole run; close() removes it.
        self._file = tempfile.NamedTemporaryFile(mode="w+b", suffix=".csv", delete=False)  # noqa: SIM115
        self._file.write(rows_to_csv([]))

    def add(self, rows: Iterable[ManifestRow]) -> None:
        self._file.write(rows_to_csv(rows, header=False))

    def upload(self, store: Store, key: str) -> None:
        self._file.flush()
        store.put_file(key, Path(self._file.name), content_type="text/csv")

    def close(self) -> None:
        self._file.close()
        Path(self._file.name).unlink(missing_ok=True)


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"ingest-{now:%Y%m%dT%H%M%S}-{hashlib.sha256(str(now).encode()).hexdigest()[:6]}"

