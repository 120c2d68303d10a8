"""Ingest: validate labelled uploads under ``incoming/``, de-duplicate them by content and sort
them into ``dataset/<class>/<slide>/<file>``; everything else goes to ``quarantine/<reason>/``.

How a run works, and why:
- The listing is streamed and cut into chunks (``chunk_size`` objects or ``chunk_bytes``,
  whichever comes first), so memory holds one chunk of images, however large the bucket.
- Chunks are committed one after another (each one concurrent inside): de-duplication
  decisions then depend only on the key order, so a run is deterministic.
- What has been ingested is recorded in a ledger in the bucket (``state/ingest/``), one small
  CSV per committed chunk, written after the chunk's objects (pointer last). A re-run loads
  it and reports every object whose (key, ETag) it holds as ``already_ingested`` without
  downloading it. A run killed half-way re-does at most its last chunk, and rewriting the
  same objects under the same keys changes nothing.
- Memory for the ledger is a few dozen bytes per object ever ingested (two 64-bit digests per
  row in dicts); the images themselves are never held beyond one chunk.

Invariant of every run: listed = accepted + duplicate + quarantined + already_ingested.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from malaria.core import layout
from malaria.core.images import (
    CONTENT_TYPES,
    DEFAULT_LIMITS,
    ImageLimits,
    ValidatedImage,
    check_size,
    validate_image,
)
from malaria.core.labels import (
    CLASS_NAMES,
    UNKNOWN_SLIDE,
    LabelEntry,
    class_from_key,
    merge_labels,
    parse_labels_csv,
    slide_from_name,
)
from malaria.io.store import ObjectInfo, ObjectNotFound, Store

log = logging.getLogger(__name__)

ACCEPTED = "accepted"
DUPLICATE = "duplicate"
QUARANTINED = "quarantined"
ALREADY_INGESTED = "already_ingested"
RETRACTED = "retracted"  # an earlier accepted object moved to quarantine by a label conflict
OUTCOMES = (ACCEPTED, DUPLICATE, QUARANTINED, ALREADY_INGESTED)

LABEL_CONFLICT = "label_conflict"
_CONFLICT = "conflict"  # ledger state of a content hash seen under two labels


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


MANIFEST_COLUMNS = [f.name for f in fields(ManifestRow)]


def _digest64(*parts: str) -> int:
    return int.from_bytes(
        hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest(), "big")


def _content64(sha256_hex: str) -> int:
    return int(sha256_hex[:16], 16)


@dataclass
class Ledger:
    """What earlier runs ingested, loaded from ``state/ingest/``."""

    sources: set[int] = field(default_factory=set)          # digest(source key, etag)
    content: dict[int, str] = field(default_factory=dict)   # sha256[:64 bits] -> label | conflict
    dataset_keys: dict[int, int] = field(default_factory=dict)  # digest(dataset key) -> content
    parts: int = 0

    def record(self, row: ManifestRow) -> None:
        if row.outcome == RETRACTED:
            self.content[_content64(row.sha256)] = _CONFLICT
            self.dataset_keys.pop(_digest64(row.dataset_key), None)
            return
        self.sources.add(_digest64(row.source_key, row.etag))
        if not row.sha256:
            return
        content = _content64(row.sha256)
        if row.reason == LABEL_CONFLICT:
            self.content[content] = _CONFLICT
        elif row.outcome == ACCEPTED:
            self.content[content] = row.label
            self.dataset_keys[_digest64(row.dataset_key)] = content

    def knows(self, info: ObjectInfo) -> bool:
        return _digest64(info.key, info.etag) in self.sources


def load_ledger(store: Store) -> Ledger:
    ledger = Ledger()
    for info in store.list(layout.INGEST_LEDGER):
        for row in _read_rows(store.get_bytes(info.key)):
            ledger.record(row)
        ledger.parts += 1
    return ledger


def _read_rows(data: bytes) -> Iterator[ManifestRow]:
    for record in csv.DictReader(io.StringIO(data.decode("utf-8"))):
        values = {name: record.get(name, "") for name in MANIFEST_COLUMNS}
        values["size"] = int(values["size"] or 0)
        values["width"] = int(values["width"] or 0)
        values["height"] = int(values["height"] or 0)
        yield ManifestRow(**values)  # type: ignore[arg-type]


def rows_to_csv(rows: Iterable[ManifestRow], *, header: bool = True) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    return buffer.getvalue().encode("utf-8")


def load_labels(store: Store) -> dict[str, LabelEntry]:
    """All labels CSVs under ``labels/``, merged (keys relative to ``incoming/``)."""
    tables = {info.key: parse_labels_csv(store.get_bytes(info.key), source=info.key)
              for info in store.list(layout.LABELS) if info.key.lower().endswith(".csv")}
    return merge_labels(tables)


def iter_chunks(objects: Iterable[ObjectInfo], *, chunk_size: int = 500,
                chunk_bytes: int = 256 * 1024 * 1024) -> Iterator[list[ObjectInfo]]:
    """Cut a listing stream into chunks bounded by count and by bytes to download."""
    chunk: list[ObjectInfo] = []
    total = 0
    for info in objects:
        if chunk and (len(chunk) >= chunk_size or total + info.size > chunk_bytes):
            yield chunk
            chunk, total = [], 0
        chunk.append(info)
        total += info.size
    if chunk:
        yield chunk


# ------------------------------------------------------------------------------ one chunk


@dataclass
class _Item:
    info: ObjectInfo
    row: ManifestRow
    data: bytes | None = None
    validated: ValidatedImage | None = None
    write_data: bytes | None = None


@dataclass
class ChunkResult:
    rows: list[ManifestRow]
    retracted: list[ManifestRow]
    ledger_key: str | None


class IngestChunk:
    """Validate, de-duplicate and commit one chunk of ``incoming/`` objects."""

    def __init__(self, store: Store, ledger: Ledger, labels: dict[str, LabelEntry], *,
                 run_id: str, limits: ImageLimits = DEFAULT_LIMITS,
                 concurrency: int = 16) -> None:
        self.store = store
        self.ledger = ledger
        self.labels = labels
        self.run_id = run_id
        self.limits = limits
        self.concurrency = concurrency

    def run(self, objects: list[ObjectInfo], chunk_index: int) -> ChunkResult:
        items = [_Item(info, ManifestRow(self.run_id, info.key, info.size, info.etag, outcome=""))
                 for info in objects]
        pending = [item for item in items if not self._settle_without_download(item)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            list(pool.map(self._fetch_and_validate, pending))
            retractions = self._decide(pending)
            list(pool.map(self._commit, items))
            list(pool.map(self._retract, retractions))
        fresh = [item.row for item in items if item.row.outcome != ALREADY_INGESTED]
        ledger_key = None
        if fresh or retractions:
            # The ledger part is the pointer: written last, after every object it describes.
            ledger_key = layout.ingest_ledger_key(self.run_id, chunk_index)
            self.store.put_bytes(ledger_key, rows_to_csv([*fresh, *retractions]),
                                 content_type="text/csv")
        for row in [*fresh, *retractions]:
            self.ledger.record(row)
        return ChunkResult(rows=[item.row for item in items], retracted=retractions,
                           ledger_key=ledger_key)

    # Step 1: what can be settled from the listing alone.
    def _settle_without_download(self, item: _Item) -> bool:
        row = item.row
        if self.ledger.knows(item.info):
            row.outcome = ALREADY_INGESTED
            return True
        relative = item.info.key.removeprefix(layout.INCOMING)
        entry = self.labels.get(relative)
        folder_label = class_from_key(relative)
        file_name = PurePosixPath(relative).name
        row.slide = (entry.slide if entry and entry.slide else None) or slide_from_name(
            file_name) or UNKNOWN_SLIDE
        if entry and folder_label and entry.label != folder_label:
            row.label = entry.label
            self._quarantine(row, LABEL_CONFLICT,
                             f"labels file says {entry.label}, folder says {folder_label}")
            return False
        row.label = entry.label if entry else (folder_label or "")
        sized = check_size(item.info.size, self.limits)
        if sized is not None:
            self._quarantine(row, sized.reason or "", sized.detail)
            return True
        if not row.label:
            self._quarantine(row, "no_label",
                             f"not under a class folder ({', '.join(CLASS_NAMES)} or a synonym)"
                             " and not in a labels file")
            return True
        return False

    # Step 2 (concurrent): download, hash, decode.
    def _fetch_and_validate(self, item: _Item) -> None:
        try:
            item.data = self.store.get_bytes(item.info.key)
        except ObjectNotFound:
            self._quarantine(item.row, "missing_object", "deleted between listing and reading")
            return
        item.row.sha256 = hashlib.sha256(item.data).hexdigest()
        if item.row.outcome:  # already quarantined (label conflict with a labels file)
            return
        validated = validate_image(item.data, self.limits)
        item.validated = validated
        row = item.row
        row.format, row.width, row.height = validated.format, validated.width, validated.height
        row.converted_from = validated.converted_from or ""
        if not validated.accepted:
            self._quarantine(row, validated.reason or "", validated.detail)

    # Step 3 (sequential, key order): de-duplicate and name.
    def _decide(self, items: list[_Item]) -> list[ManifestRow]:
        retractions: list[ManifestRow] = []
        accepted_here: dict[int, _Item] = {}
        used_names: dict[int, int] = {}
        for item in items:
            row = item.row
            if row.outcome:
                continue
            content = _content64(row.sha256)
            earlier = accepted_here.get(content)
            known = earlier.row.label if earlier else self.ledger.content.get(content)
            if known == _CONFLICT or (known and known != row.label):
                self._quarantine(row, LABEL_CONFLICT,
                                 f"the same content is also labelled {known}")
                if earlier is not None:
                    self._quarantine(earlier.row, LABEL_CONFLICT,
                                     f"the same content is also labelled {row.label}")
                    accepted_here.pop(content)
                elif known != _CONFLICT:
                    retractions.append(self._retraction(row))
                self.ledger.content[content] = _CONFLICT
                continue
            if known:
                row.outcome = DUPLICATE
                row.duplicate_of = earlier.row.dataset_key if earlier else f"sha256:{row.sha256}"
                continue
            row.outcome = ACCEPTED
            row.dataset_key = self._dataset_key(item, content, used_names)
            accepted_here[content] = item
        return retractions

    def _dataset_key(self, item: _Item, content: int, used: dict[int, int]) -> str:
        validated = item.validated
        name = layout.safe_file_name(PurePosixPath(item.info.key).name)
        if validated and validated.converted_png is not None:
            name = f"{name.rsplit('.', 1)[0]}.png"
        key = layout.dataset_key(item.row.label, item.row.slide, name)
        owner = used.get(_digest64(key)) or self.ledger.dataset_keys.get(_digest64(key))
        if owner is not None and owner != content:
            # Two different cells with one name in one slide folder: keep both.
            stem, dot, ext = name.rpartition(".")
            tagged = f"{stem}-{item.row.sha256[:8]}.{ext}" if dot else f"{name}-{item.row.sha256[:8]}"
            key = layout.dataset_key(item.row.label, item.row.slide, tagged)
        used[_digest64(key)] = content
        return key

    def _retraction(self, row: ManifestRow) -> ManifestRow:
        """The copy accepted by an earlier chunk or run must leave the training set."""
        earlier_key = self._find_dataset_key(row.sha256)
        return ManifestRow(
            run_id=self.run_id, source_key=earlier_key, size=0, etag="", outcome=RETRACTED,
            reason=LABEL_CONFLICT, detail=f"{row.source_key} has the same content, labelled "
            f"{row.label}", sha256=row.sha256, dataset_key=earlier_key,
            quarantine_key=layout.quarantine_key(LABEL_CONFLICT, earlier_key),
        )

    def _find_dataset_key(self, sha256: str) -> str:
        # Rare (label conflicts only), so scanning the ledger beats holding every key in memory.
        for info in self.store.list(layout.INGEST_LEDGER):
            for row in _read_rows(self.store.get_bytes(info.key)):
                if row.sha256 == sha256 and row.outcome == ACCEPTED:
                    return row.dataset_key
        return ""

    # Step 4 (concurrent): write.
    def _commit(self, item: _Item) -> None:
        row = item.row
        if row.outcome == ACCEPTED:
            assert item.data is not None and item.validated is not None
            converted = item.validated.converted_png
            content_type = "image/png" if converted else CONTENT_TYPES.get(row.format)
            self.store.put_bytes(row.dataset_key, converted or item.data,
                                 content_type=content_type, metadata={"sha256": row.sha256})
        elif row.outcome == QUARANTINED:
            if item.data is not None:
                self.store.put_bytes(row.quarantine_key, item.data)
            elif row.reason != "missing_object":
                self.store.copy(row.source_key, row.quarantine_key)
            self._write_sidecar(row)

    def _retract(self, row: ManifestRow) -> None:
        if not row.dataset_key:
            return
        # Missing means an interrupted earlier attempt already moved it.
        with contextlib.suppress(ObjectNotFound):
            self.store.copy(row.dataset_key, row.quarantine_key)
        self._write_sidecar(row)
        self.store.delete(row.dataset_key)

    def _quarantine(self, row: ManifestRow, reason: str, detail: str) -> None:
        row.outcome = QUARANTINED
        row.reason = reason
        row.detail = detail
        row.dataset_key = ""
        row.quarantine_key = layout.quarantine_key(reason, row.source_key)

    def _write_sidecar(self, row: ManifestRow) -> None:
        sidecar = {
            "source_key": row.source_key,
            "reason": row.reason,
            "detail": row.detail,
            "run_id": self.run_id,
            "sha256": row.sha256,
            "label": row.label,
            "size": row.size,
            "quarantined_at": datetime.now(UTC).isoformat(),
        }
        self.store.put_bytes(row.quarantine_key + ".json",
                             json.dumps(sidecar, indent=2, ensure_ascii=False).encode(),
                             content_type="application/json")


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

    def add(self, result: ChunkResult) -> None:
        self.chunks += 1
        self.listed += len(result.rows)
        self.retracted += len(result.retracted)
        for row in result.rows:
            self.outcomes[row.outcome] += 1
            if row.outcome == QUARANTINED:
                self.reasons[row.reason] += 1

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


def ingest(store: Store, *, run_id: str | None = None, chunk_size: int = 500,
           concurrency: int = 16, limits: ImageLimits = DEFAULT_LIMITS,
           on_chunk: Callable[[int, ChunkResult], None] | None = None) -> IngestSummary:
    """Run a whole ingest in-process (the flow wires the same steps as Prefect tasks)."""
    run_id = run_id or new_run_id()
    ledger = load_ledger(store)
    labels = load_labels(store)
    summary = IngestSummary(run_id=run_id)
    manifest = ManifestWriter()
    try:
        worker = IngestChunk(store, ledger, labels, run_id=run_id, limits=limits,
                             concurrency=concurrency)
        for index, chunk in enumerate(iter_chunks(store.list(layout.INCOMING),
                                                  chunk_size=chunk_size)):
            result = worker.run(chunk, index)
            manifest.add([*result.rows, *result.retracted])
            summary.add(result)
            if on_chunk:
                on_chunk(index, result)
        summary.manifest_key = layout.manifest_key(run_id)
        manifest.upload(store, summary.manifest_key)
    finally:
        manifest.close()
    return summary
