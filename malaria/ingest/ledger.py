"""What earlier runs ingested (the ledger under ``state/ingest/``, one CSV part per committed
chunk, plus one per run that applied label corrections) and the labels files under
``labels/``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from malaria.core import layout
from malaria.core.labels import LabelEntry, merge_labels, parse_labels_csv
from malaria.ingest.manifest import (
    ACCEPTED,
    EXCLUDED,
    LABEL_CONFLICT,
    RELABELLED,
    RETRACTED,
    ManifestRow,
    read_rows,
)
from malaria.io.store import ObjectInfo, Store

CONFLICT = "conflict"  # ledger state of a content hash seen under two labels
EXCLUDE = "exclude"  # a reviewer's verdict that removes a cell (malaria.ingest.corrections)


def digest64(*parts: str) -> int:
    return int.from_bytes(
        hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest(), "big")


def content64(sha256_hex: str) -> int:
    return int(sha256_hex[:16], 16)


@dataclass
class Ledger:
    """What earlier runs ingested, loaded from ``state/ingest/``."""

    sources: set[int] = field(default_factory=set)          # digest(source key, etag)
    content: dict[int, str] = field(default_factory=dict)   # sha256[:64 bits] -> label | conflict
    dataset_keys: dict[int, int] = field(default_factory=dict)  # digest(dataset key) -> content
    # Content a reviewer ruled on -> its class or EXCLUDE: few entries, the last verdict wins.
    reviewed: dict[int, str] = field(default_factory=dict)
    parts: int = 0

    def record(self, row: ManifestRow) -> None:
        if row.outcome in (RELABELLED, EXCLUDED):
            # A verdict row: source_key is the cell's old dataset key, not an incoming/ object.
            content = content64(row.sha256)
            self.dataset_keys.pop(digest64(row.source_key), None)
            if row.outcome == RELABELLED:
                self.content[content] = row.label
                self.reviewed[content] = row.label
                self.dataset_keys[digest64(row.dataset_key)] = content
            else:
                # CONFLICT keeps re-uploads of these bytes out of dataset/ (quarantined,
                # nothing to retract) without any change to the chunk's rules.
                self.content[content] = CONFLICT
                self.reviewed[content] = EXCLUDE
            return
        if row.outcome == RETRACTED:
            self.content[content64(row.sha256)] = CONFLICT
            self.dataset_keys.pop(digest64(row.dataset_key), None)
            return
        self.sources.add(digest64(row.source_key, row.etag))
        if not row.sha256:
            return
        content = content64(row.sha256)
        if row.reason == LABEL_CONFLICT:
            self.content[content] = CONFLICT
        elif row.outcome == ACCEPTED:
            self.content[content] = row.label
            self.dataset_keys[digest64(row.dataset_key)] = content

    def knows(self, info: ObjectInfo) -> bool:
        return digest64(info.key, info.etag) in self.sources


def load_ledger(store: Store) -> Ledger:
    ledger = Ledger()
    for info in store.list(layout.INGEST_LEDGER):
        for row in read_rows(store.get_bytes(info.key)):
            ledger.record(row)
        ledger.parts += 1
    return ledger


def load_labels(store: Store) -> dict[str, LabelEntry]:
    """All labels CSVs under ``labels/``, merged (keys relative to ``incoming/``). Verdict
    files under ``labels/corrections/`` are not labels for incoming objects: skipped."""
    tables = {info.key: parse_labels_csv(store.get_bytes(info.key), source=info.key)
              for info in store.list(layout.LABELS) if info.key.lower().endswith(".csv")
              and not info.key.startswith(layout.LABEL_CORRECTIONS)}
    return merge_labels(tables)

