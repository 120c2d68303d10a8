"""One chunk of ``incoming/`` objects: validate, de-duplicate against the ledger and commit
(dataset/ or quarantine/ objects first, the chunk's ledger part last)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath

from malaria.core import layout
from malaria.core.defaults import INGEST_CHUNK_SIZE, INGEST_CONCURRENCY
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
    slide_from_name,
)
from malaria.ingest.ledger import CONFLICT, Ledger, content64, digest64
from malaria.ingest.manifest import (
    ACCEPTED,
    ALREADY_INGESTED,
    DUPLICATE,
    LABEL_CONFLICT,
    QUARANTINED,
    RETRACTED,
    ManifestRow,
    read_rows,
    rows_to_csv,
)
from malaria.io.store import ObjectInfo, ObjectNotFound, Store


def iter_chunks(objects: Iterable[ObjectInfo], *, chunk_size: int = INGEST_CHUNK_SIZE,
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
                 concurrency: int = INGEST_CONCURRENCY) -> None:
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
            content = content64(row.sha256)
            earlier = accepted_here.get(content)
            known = earlier.row.label if earlier else self.ledger.content.get(content)
            if known == CONFLICT or (known and known != row.label):
                self._quarantine(row, LABEL_CONFLICT,
                                 f"the same content is also labelled {known}")
                if earlier is not None:
                    self._quarantine(earlier.row, LABEL_CONFLICT,
                                     f"the same content is also labelled {row.label}")
                    accepted_here.pop(content)
                elif known != CONFLICT:
                    retractions.append(self._retraction(row))
                self.ledger.content[content] = CONFLICT
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
        owner = used.get(digest64(key)) or self.ledger.dataset_keys.get(digest64(key))
        if owner is not None and owner != content:
            # Two different cells with one name in one slide folder: keep both.
            stem, dot, ext = name.rpartition(".")
            tagged = f"{stem}-{item.row.sha256[:8]}.{ext}" if dot else f"{name}-{item.row.sha256[:8]}"
            key = layout.dataset_key(item.row.label, item.row.slide, tagged)
        used[digest64(key)] = content
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
            for row in read_rows(self.store.get_bytes(info.key)):
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

