"""Ingest ledger compaction: many parts under ``state/ingest/`` merged into one, so loading
the ledger (one GET per part, every ingest run) stays fast.

What is merged: every part that sorts before
:func:`malaria.core.layout.ingest_ledger_compacted_key` of the newest part, into that key.
So the compacted part sorts after every part it merges and before every part it does not
(the newest part, with its run's ``-000000-corrections.csv`` part when the newest is chunk
0: the corrections still replay before the chunk, as the run applied them) and before any
part written later. Rows keep their load order (key order) inside it.

Why a crash at any point leaves a ledger that loads to the same state:

- Each row's effect on :class:`~malaria.ingest.ledger.Ledger` is a set of writes that do not
  depend on what is loaded already (add a source, set or drop an entry): the loaded state
  is, per entry, the last row that wrote it. So rows that come again later change nothing.
- The compacted part is written before any merged part is deleted. Meanwhile, and while
  they are deleted, a load replays some merged parts, then the compacted part (all of
  their rows again, in order), then the parts it did not merge: the same state.

The work runs under the ingest lock (:mod:`malaria.ingest.lock`): no ingest loads or writes
the ledger meanwhile. An intent record beside the ledger (not in it: the ledger loads every
object under its prefix) names the merged parts before the compacted part is written, so
the next compaction finishes a run that died part-way (deletes exactly those parts, in the
same order) rather than merging their rows twice.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from malaria.core import layout
from malaria.core.defaults import GC_LOCK_WAIT_S
from malaria.ingest.lock import IngestLock
from malaria.ingest.manifest import read_rows, rows_to_csv
from malaria.io.store import ObjectNotFound, Store, get_json, put_json

# Beside the ledger folder, as the lock is: never loaded as a part.
COMPACTION_INTENT_KEY = f"{layout.INGEST_LEDGER.rstrip('/')}-compaction.json"


@dataclass(frozen=True)
class CompactionResult:
    parts_before: int
    merged: int = 0  # parts merged (or that would be, on a dry run)
    compacted_key: str | None = None
    finished: int = 0  # leftover parts of an interrupted compaction, deleted now
    skipped: str = ""  # why nothing was merged

    def line(self, dry_run: bool) -> str:
        done = (f"; finished an interrupted compaction ({self.finished} leftover parts)"
                if self.finished else "")
        if self.merged:
            verb = "would merge" if dry_run else "merged"
            return (f"{verb} {self.merged} of {self.parts_before} parts into "
                    f"{self.compacted_key}{done}")
        return f"{self.parts_before} parts: {self.skipped or 'left as is'}{done}"


def part_keys(store: Store) -> list[str]:
    """The ledger's parts, in the order :func:`malaria.ingest.ledger.load_ledger` replays
    them."""
    return sorted(info.key for info in store.list(layout.INGEST_LEDGER))


def plan_merge(keys: list[str]) -> tuple[str, list[str]]:
    """The compacted key for sorted part ``keys``, and the parts it takes: all that sort
    before it, and itself should it be there already (a compaction that died part-way
    without its intent record): its rows are read before it is replaced."""
    compacted_key = layout.ingest_ledger_compacted_key(keys[-1])
    return compacted_key, [key for key in keys if key <= compacted_key]


def deletion_order(merged: Iterable[str], compacted_key: str) -> list[str]:
    """Merged parts, oldest first, less the compacted part itself."""
    return sorted(key for key in merged if key != compacted_key)


def merge_parts(store: Store, keys: list[str], compacted_key: str) -> None:
    """Write ``keys``' rows, in that order, as one part: streamed through a temporary file
    (memory holds one part at a time, however long the ledger)."""
    with tempfile.TemporaryDirectory(prefix="malaria-ledger-") as folder:
        path = Path(folder) / "compacted.csv"
        with path.open("wb") as out:
            out.write(rows_to_csv([]))
            for key in keys:
                out.write(rows_to_csv(read_rows(store.get_bytes(key)), header=False))
        store.put_file(compacted_key, path, content_type="text/csv")


def _read_intent(store: Store) -> dict[str, object] | None:
    try:
        intent = get_json(store, COMPACTION_INTENT_KEY)
    except ObjectNotFound:
        return None
    except ValueError:  # torn or hand-edited: no parts named, nothing to finish
        return {}
    return intent if isinstance(intent, dict) else {}


def _pending(store: Store, intent: dict[str, object] | None, present: set[str]) -> list[str]:
    """The merged parts a compaction that died part-way left behind, in deletion order
    (none unless its compacted part was written: before that it changed nothing)."""
    if not intent:
        return []
    compacted, merged = intent.get("compacted"), intent.get("merged")
    if not isinstance(compacted, str) or compacted not in present or not isinstance(merged,
                                                                                    list):
        return []
    return [k for k in deletion_order([str(m) for m in merged], compacted) if k in present]


def compact_ledger(store: Store, *, max_parts: int, dry_run: bool = False,
                   lock_wait_s: float = GC_LOCK_WAIT_S,
                   settle_s: float | None = None) -> CompactionResult:
    """Merge the ledger's parts into one when there are more than ``max_parts`` (and at
    least two). Holds the ingest lock; raises ``IngestLockBusy`` when an ingest holds it
    longer than ``lock_wait_s``. A dry run only reads. ``settle_s``: the lock's settle time
    (its default unless given; tests on one local folder use 0)."""
    keys = part_keys(store)
    if dry_run:
        pending = _pending(store, _read_intent(store), set(keys))
        live = [k for k in keys if k not in pending]
        skipped = _skip(live, max_parts)
        if skipped:
            return CompactionResult(len(keys), finished=len(pending), skipped=skipped)
        compacted_key, merged = plan_merge(live)
        return CompactionResult(len(keys), merged=len(merged), finished=len(pending),
                                compacted_key=compacted_key)
    if _skip(keys, max_parts) and _read_intent(store) is None:
        return CompactionResult(len(keys), skipped=_skip(keys, max_parts))
    extra = {} if settle_s is None else {"settle": settle_s}
    with IngestLock(store, label="malaria gc: ledger compaction", wait=lock_wait_s,
                    **extra) as lock:
        keys = part_keys(store)  # again, under the lock: an ingest may have added some
        intent = _read_intent(store)
        pending = _pending(store, intent, set(keys))
        for key in pending:
            lock.verify()
            store.delete(key)
        if intent is not None:  # finished, or died before its compacted part was written
            store.delete(COMPACTION_INTENT_KEY)
        keys = [k for k in keys if k not in pending]
        skipped = _skip(keys, max_parts)
        if skipped:
            return CompactionResult(len(keys), finished=len(pending), skipped=skipped)
        compacted_key, merged = plan_merge(keys)
        lock.verify()
        put_json(store, COMPACTION_INTENT_KEY, {"compacted": compacted_key, "merged": merged})
        merge_parts(store, merged, compacted_key)
        for key in deletion_order(merged, compacted_key):  # only once the merged part is in
            lock.verify()
            store.delete(key)
        store.delete(COMPACTION_INTENT_KEY)
        return CompactionResult(len(keys) + len(pending), merged=len(merged),
                                compacted_key=compacted_key, finished=len(pending))


def _skip(keys: list[str], max_parts: int) -> str:
    """Why ``keys`` are left as they are ("" when they are to be merged)."""
    if len(keys) <= max_parts:
        return f"at most {max_parts} parts"
    if not keys or len(plan_merge(keys)[1]) < 2:
        return "nothing to merge (only the newest parts besides a compacted one)"
    return ""
