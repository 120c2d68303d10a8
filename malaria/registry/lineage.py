"""A registered model's lineage: the exact dataset it saw, and how to train on it again.

```
models/<version>/lineage.csv   key,etag,class,slide,split: one row per cell, sorted by key
```

The registry writes it before ``metrics.json`` (:meth:`ModelRegistry.register`), and the
record keeps its key, SHA-256 and counts under ``lineage``, beside ``provenance`` (flow run,
code version, package versions): the record names the file, the hash proves it unchanged.

Re-training reads the rows back, lists the objects they name and checks that each is still
there with the same ETag: a changed or missing object fails the whole re-training with the
keys named (:class:`LineageMismatch`), never a silently smaller dataset. The split is the
recorded one, slide for slide, not recomputed: the splitting rule may have changed since.

Cells come from the store's listing, so no object is downloaded to check it; an ETag is
the MD5 of a single-PUT upload on S3 and mtime+size on a local folder, so a replaced object
is caught either way.

No TensorFlow here at import time: the registry imports this module. Only
:func:`prepare_lineage_data` and :func:`retrain_from_lineage`, which train, import Keras.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from malaria.core.csvsafe import escape_row, unescape_record
from malaria.core.labels import CLASS_NAMES, CLASS_OF_LABEL, LABEL_OF_CLASS
from malaria.core.layout import lineage_key
from malaria.dataset.records import CellRecord
from malaria.dataset.split import SlideSplit, _slide_sort_key
from malaria.io.store import ObjectNotFound, Store

if TYPE_CHECKING:
    from malaria.dataset.cache import ImageCache
    from malaria.model.candidate import PreparedData
    from malaria.model.config import RetrainConfig

COLUMNS = ("key", "etag", "class", "slide", "split")
SPLITS = ("train", "val", "test")
EXAMPLES = 5  # keys named in an error message; the exception holds them all


class LineageError(RuntimeError):
    """A lineage that cannot be used: absent, altered, or not a lineage file."""


class LineageMismatch(LineageError):
    """Objects the model saw are gone or changed since: re-training would not see its data."""

    def __init__(self, version: str, total: int, missing: Sequence[str],
                 changed: Sequence[tuple[str, str, str]]) -> None:
        self.version, self.total = version, total
        self.missing = list(missing)
        self.changed = list(changed)  # (key, recorded ETag, ETag now)
        parts = []
        if self.changed:
            shown = ", ".join(f"{k} (ETag {then} -> {now})"
                              for k, then, now in self.changed[:EXAMPLES])
            parts.append(f"{len(self.changed)} changed since: {shown}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {', '.join(self.missing[:EXAMPLES])}")
        super().__init__(f"the data of model {version} is no longer in the bucket as it was "
                         f"({len(self.changed) + len(self.missing)} of {total} cells): "
                         + "; ".join(parts))


@dataclass(frozen=True)
class LineageRow:
    key: str
    etag: str
    class_name: str
    slide: str
    split: str

    def as_csv_row(self) -> list[str]:
        return [self.key, self.etag, self.class_name, self.slide, self.split]


# ------------------------------------------------------------------------------ building


def lineage_rows(records: Iterable[CellRecord], split: SlideSplit) -> list[LineageRow]:
    """One row per record of a split slide, sorted by key; a record on no split slide was
    not seen by the model and is left out. Every record needs its ETag: a lineage without
    one could not tell, later, whether the object changed."""
    part_of = {slide: part for part in SPLITS for slide in getattr(split, part)}
    rows = []
    no_etag = []
    for record in records:
        part = part_of.get(record.slide)
        if part is None:
            continue
        if not record.etag:
            no_etag.append(record.key)
        rows.append(LineageRow(record.key, record.etag, CLASS_OF_LABEL[int(record.label)],
                               record.slide, part))
    if no_etag:
        raise LineageError(f"{len(no_etag)} cells have no ETag, so no lineage can be "
                           f"recorded for them: e.g. {', '.join(no_etag[:EXAMPLES])}")
    return sorted(rows, key=lambda row: row.key)


def lineage_csv(rows: Iterable[LineageRow]) -> bytes:
    """The CSV, formula-safe (keys come from uploads: a spreadsheet must not run them)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(escape_row(row.as_csv_row()))
    return buffer.getvalue().encode()


def summarize(rows: Sequence[LineageRow]) -> dict[str, Any]:
    """Counts for the record and ``malaria models show``: rows per class, per split and per
    split and class, and slides per split."""
    slides: dict[str, set[str]] = {part: set() for part in SPLITS}
    by_split: dict[str, Counter[str]] = {part: Counter() for part in SPLITS}
    for row in rows:
        slides[row.split].add(row.slide)
        by_split[row.split][row.class_name] += 1
    return {
        "rows": len(rows),
        "classes": {name: sum(c[name] for c in by_split.values()) for name in CLASS_NAMES},
        "splits": {part: {name: by_split[part][name] for name in CLASS_NAMES}
                   for part in SPLITS},
        "slides": {part: len(slides[part]) for part in SPLITS},
    }


def write_lineage(store: Store, version: str, rows: Sequence[LineageRow]) -> dict[str, Any]:
    """Write ``models/<version>/lineage.csv``; return what the record keeps of it (key,
    sha256, row count and the :func:`summarize` counts)."""
    data = lineage_csv(rows)
    key = lineage_key(version)
    store.put_bytes(key, data, content_type="text/csv")
    return {"key": key, "sha256": hashlib.sha256(data).hexdigest(), **summarize(rows)}


# ------------------------------------------------------------------------------ reading


def parse_lineage(data: bytes, *, source: str = "lineage") -> list[LineageRow]:
    """The rows of a lineage CSV; :class:`LineageError` for anything else."""
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise LineageError(f"{source}: columns {reader.fieldnames} are not {list(COLUMNS)}")
        rows = []
        for number, raw in enumerate(reader, start=2):
            cell = unescape_record(raw)
            row = LineageRow(cell["key"], cell["etag"], cell["class"], cell["slide"],
                             cell["split"])
            if (None in raw or None in raw.values() or row.class_name not in LABEL_OF_CLASS
                    or row.split not in SPLITS or not (row.key and row.etag and row.slide)):
                raise LineageError(f"{source} line {number}: not a lineage row: {raw}")
            rows.append(row)
    except (UnicodeDecodeError, csv.Error) as error:
        raise LineageError(f"{source} is not a readable CSV: {error}") from error
    return rows


def read_lineage(store: Store, version: str, record: Mapping[str, Any]) -> list[LineageRow]:
    """The rows a registered version recorded, checked against the SHA-256 in its record
    (``record`` is its ``metrics.json``): an altered file is refused, not trusted."""
    summary = record.get("lineage")
    if not isinstance(summary, Mapping) or not summary.get("sha256"):
        raise LineageError(f"model {version} has no lineage in its record (registered "
                           "before lineages were recorded?)")
    key = lineage_key(version)
    try:
        data = store.get_bytes(key)
    except ObjectNotFound as error:
        raise LineageError(f"model {version}: {key} is missing") from error
    digest = hashlib.sha256(data).hexdigest()
    if digest != summary["sha256"]:
        raise LineageError(f"model {version}: {key} has sha256 {digest}, its record says "
                           f"{summary['sha256']}: the file was altered, refused")
    rows = parse_lineage(data, source=key)
    if len({row.key for row in rows}) != len(rows):
        raise LineageError(f"model {version}: {key} lists a key twice")
    return rows


def split_of(rows: Iterable[LineageRow]) -> SlideSplit:
    """The recorded split, slide lists sorted as :func:`split_by_slide` sorts them."""
    parts: dict[str, set[str]] = {part: set() for part in SPLITS}
    for row in rows:
        parts[row.split].add(row.slide)
    seen_twice = (parts["train"] & parts["val"]) | (parts["train"] & parts["test"]) | (
        parts["val"] & parts["test"])
    if seen_twice:
        raise LineageError(f"slides in more than one split: {sorted(seen_twice)[:EXAMPLES]}")
    ordered = {part: sorted(slides, key=_slide_sort_key) for part, slides in parts.items()}
    return SlideSplit(ordered["train"], ordered["val"], ordered["test"])


def _listing_prefix(keys: Iterable[str]) -> str:
    """The deepest folder holding every key: one listing checks them all."""
    keys = list(keys)
    first, last = min(keys), max(keys)  # sorted strings: these two share the least
    shared = 0
    while shared < min(len(first), len(last)) and first[shared] == last[shared]:
        shared += 1
    return first[: first.rfind("/", 0, shared) + 1]


def resolve(store: Store, version: str,
            rows: Sequence[LineageRow]) -> tuple[list[CellRecord], SlideSplit]:
    """The cell records and split to train on again: every row's object, listed now and
    with its recorded ETag. Raises :class:`LineageMismatch` naming every object that is gone
    or changed; nothing is dropped to make the rest fit."""
    if not rows:
        raise LineageError(f"model {version}: the lineage lists no cells")
    listed = {info.key: info for info in store.list(_listing_prefix(r.key for r in rows))}
    missing: list[str] = []
    changed: list[tuple[str, str, str]] = []
    records: list[CellRecord] = []
    for row in rows:
        info = listed.get(row.key)
        if info is None:
            missing.append(row.key)
        elif info.etag != row.etag:
            changed.append((row.key, row.etag, info.etag))
        else:
            # content_id as records_from_store builds it: the data manifest hash comes out
            # the same as the original run's, and the image cache is reused.
            records.append(CellRecord(key=row.key, label=LABEL_OF_CLASS[row.class_name],
                                      slide=row.slide, content_id=f"{info.etag}-{info.size}",
                                      etag=info.etag))
    if missing or changed:
        raise LineageMismatch(version, len(rows), missing, changed)
    return records, split_of(rows)


# ---------------------------------------------------------------------------- re-training


def prepare_lineage_data(records: Sequence[CellRecord], split: SlideSplit,
                         read_bytes: Callable[[str], bytes], cache: ImageCache,
                         input_size: int, *, workers: int = 8) -> PreparedData:
    """What :func:`malaria.model.candidate.prepare_data` builds, on the recorded split
    instead of a recomputed one."""
    from malaria.model.candidate import EmptySplit, data_for_split

    try:
        return data_for_split(records, split, read_bytes, cache, input_size, workers=workers)
    except EmptySplit as error:
        raise LineageError(f"the recorded {error.part} split has no cells") from None


def recorded_config(record: Mapping[str, Any]) -> RetrainConfig:
    """The settings a version was trained with, from its record; settings this code no
    longer knows are refused by name rather than dropped."""
    from malaria.model.config import RetrainConfig

    saved = record.get("config")
    if not isinstance(saved, Mapping):
        raise LineageError("the record holds no training settings (config)")
    known = {f.name for f in fields(RetrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise LineageError(f"the record's settings {unknown} are unknown to this code")
    return RetrainConfig(**{name: value for name, value in saved.items() if name in known})


def retrain_from_lineage(store: Store, version: str, out: Path, *, cache_dir: Path,
                         config: RetrainConfig | None = None,
                         on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
                         ) -> dict[str, Any]:
    """``malaria train --from-lineage VERSION``: train again on exactly the cells ``version``
    saw (same keys, same ETags, same split), with its recorded settings unless ``config``
    is given; write the model file and its card as ``malaria train`` does, and return the
    card. ``retrained_from`` in the card says whether the data manifest hash came out equal
    to the original's."""

    from malaria.dataset.cache import ImageCache
    from malaria.dataset.records import store_reader
    from malaria.model.local import train_and_save
    from malaria.registry.provenance import code_version, environment_packages
    from malaria.registry.registry import ModelRegistry

    record = ModelRegistry(store).get(version)
    rows = read_lineage(store, version, record)
    records, split = resolve(store, version, rows)
    config = config or recorded_config(record)
    data = prepare_lineage_data(records, split, store_reader(store), ImageCache(cache_dir),
                                config.resolved_input_size())
    original = record.get("data_manifest_sha256")
    return train_and_save(data, out, config, on_epoch=on_epoch, card_extra={
        "lineage": {**record["lineage"]},  # the same cells: the original's lineage file
        "provenance": {"flow_run_id": None, "code": code_version(),
                       "packages": environment_packages()},
        "retrained_from": {"version": version, "data_manifest_sha256": original,
                           "same_data": original == data.manifest_sha256}})
