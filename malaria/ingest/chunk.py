"""One chunk of ``incoming/`` objects: validate, de-duplicate against the ledger and commit
(dataset/ or quarantine/ objects first, the chunk's ledger part last)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import TypeVar

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

# Quarantine reasons for names that cannot become keys (checked before anything is written).
UNSAFE_KEY = "unsafe_key"
UNSAFE_SLIDE = "unsafe_slide"
OVERRULED_BY_REVIEW = "overruled_by_review"  # bytes a reviewer moved or excluded, uploaded again
# Quarantined without a copy: the source is gone, or its key cannot be read safely.
_NO_COPY = ("missing_object", UNSAFE_KEY)
MAX_SLIDE_LENGTH = 100
# How long the chunk's thread blocks at a time while its pool works: a Prefect task timeout
# is an exception sent to this thread, which Python raises only between bytecodes.
_WAIT_SLICE_S = 0.5
_T = TypeVar("_T")


def unsafe_key(key: str) -> str | None:
    """Why ``key`` cannot be read or copied safely (None when it can): an empty, ``.`` or
    ``..`` segment escapes or collapses in a local folder and on some S3 servers."""
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            return f"the key has a {segment!r} segment" if segment else \
                "the key has an empty segment"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "the key holds a control character"
    return None


def unsafe_slide(slide: str) -> str | None:
    """Why ``slide`` cannot be one folder of ``dataset/<class>/<slide>/`` (None when it can):
    training reads exactly one folder level there."""
    if slide in (".", ".."):
        return f"slide {slide!r} is not a folder name"
    if "/" in slide or "\\" in slide:
        return f"slide {slide!r} holds a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in slide):
        return f"slide {slide!r} holds a control character"
    if len(slide) > MAX_SLIDE_LENGTH:
        return f"slide name longer than {MAX_SLIDE_LENGTH} characters"
    return None


def _run_all(pool: ThreadPoolExecutor, work: Callable[[_T], None],
             items: Sequence[_T]) -> None:
    """``work`` on every item in ``pool``; the first failure raises and cancels what has not
    started. Waits in short slices so that a task timeout interrupts a stalled store."""
    futures: list[Future[None]] = [pool.submit(work, item) for item in items]
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=_WAIT_SLICE_S, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()
    except BaseException:
        for future in futures:
            future.cancel()
        raise


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
                 concurrency: int = INGEST_CONCURRENCY,
                 before_commit: Callable[[], None] | None = None) -> None:
        self.store = store
        # Read only until the chunk has committed (``run`` records into it last), so a
        # retried chunk decides from the same state as its first attempt.
        self.ledger = ledger
        self.labels = labels
        self.run_id = run_id
        self.limits = limits
        self.concurrency = concurrency
        # Called after the decisions, before the first write (the ingest lock's check).
        self.before_commit = before_commit

    def run(self, objects: list[ObjectInfo], chunk_index: int) -> ChunkResult:
        items = [_Item(info, ManifestRow(self.run_id, info.key, info.size, info.etag, outcome=""))
                 for info in objects]
        pending = [item for item in items if not self._settle_without_download(item)]
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            _run_all(pool, self._fetch_and_validate, pending)
            retractions = self._decide(pending)
            if self.before_commit is not None:
                self.before_commit()
            _run_all(pool, self._commit, items)
            _run_all(pool, self._retract, retractions)
        except Exception:
            # A failed request: let those in flight end (the client's timeouts bound them),
            # so that none of them lands while the retry runs.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        except BaseException:
            # A timeout or a cancellation (sent to this thread): the store may be stalled,
            # so do not wait for it.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
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
        # Names that cannot become keys go to quarantine one object at a time, before
        # anything is read or written: a poison object must not fail the whole chunk.
        bad_key = unsafe_key(item.info.key)
        if bad_key is not None:
            self._quarantine(row, UNSAFE_KEY, bad_key)
            return True
        relative = item.info.key.removeprefix(layout.INCOMING)
        entry = self.labels.get(relative)
        folder_label = class_from_key(relative)
        file_name = PurePosixPath(relative).name
        row.slide = (entry.slide if entry and entry.slide else None) or slide_from_name(
            file_name) or UNKNOWN_SLIDE
        bad_slide = unsafe_slide(row.slide)
        if bad_slide is not None:
            row.label = entry.label if entry else (folder_label or "")
            self._quarantine(row, UNSAFE_SLIDE, f"{bad_slide} (the labels file's slide column)"
                             if entry and entry.slide else bad_slide)
            return True
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
        # Conflicts found in this chunk: kept here, not in the shared ledger, until the chunk
        # commits (``Ledger.record``). Marked in the ledger, a retried attempt would read
        # the conflict as old news and never retract the copy an earlier chunk accepted.
        conflicts: set[int] = set()
        for item in items:
            row = item.row
            if row.outcome:
                continue
            content = content64(row.sha256)
            earlier = accepted_here.get(content)
            ruled = self.ledger.reviewed.get(content)
            if ruled is not None and earlier is None and content not in conflicts:
                # A reviewer's verdict outranks an upload: the same bytes again under the
                # overruled class (or an excluded cell again) are not a label conflict.
                if ruled == row.label:
                    row.outcome, row.duplicate_of = DUPLICATE, f"sha256:{row.sha256}"
                else:
                    self._quarantine(row, OVERRULED_BY_REVIEW,
                                     f"a reviewer ruled this content {ruled}")
                continue
            known = (earlier.row.label if earlier else
                     CONFLICT if content in conflicts else self.ledger.content.get(content))
            if known == CONFLICT or (known and known != row.label):
                self._quarantine(row, LABEL_CONFLICT,
                                 f"the same content is also labelled {known}")
                if earlier is not None:
                    self._quarantine(earlier.row, LABEL_CONFLICT,
                                     f"the same content is also labelled {row.label}")
                    accepted_here.pop(content)
                elif known != CONFLICT:
                    retractions.append(self._retraction(row))
                conflicts.add(content)
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
            elif row.reason not in _NO_COPY:
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

