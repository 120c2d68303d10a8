"""Cell records: one labelled cell each, from the bucket or from a local folder.

A :class:`CellRecord` names one labelled cell and how to recognise its content. Records come
from the bucket (``dataset/<class>/<slide>/<file>``) or from a local folder with class
subfolders (the layout of the NIH download). Decoding (:mod:`malaria.dataset.decode`), the
decoded-image cache (:mod:`malaria.dataset.cache`), splits by slide
(:mod:`malaria.dataset.split`) and the arrays a model trains on
(:mod:`malaria.dataset.pipeline`) build on them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from malaria.core.labels import (
    PARASITIZED,
    UNKNOWN_SLIDE,
    canonical_class,
    class_from_key,
    slide_from_name,
)
from malaria.core.layout import DATASET

if TYPE_CHECKING:
    from malaria.io.store import Store  # boto3 only where a store is used

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})


@dataclass(frozen=True)
class CellRecord:
    """One labelled cell.

    ``key`` is the object key in the store (or the path relative to a folder), ``label`` is
    1 for Parasitized and 0 for Uninfected, ``content_id`` identifies the bytes (see
    :func:`records_from_store` and :func:`records_from_folder`). ``etag`` is the object's
    ETag as the listing gave it (empty when unknown): a model's lineage records it, so a
    re-training can tell whether the object is still the one that model saw.
    """

    key: str
    label: int
    slide: str
    content_id: str
    # Not compared: content_id already names the bytes, and a record rebuilt without the
    # ETag (a benchmark pack, a test) is still the same cell.
    etag: str = field(default="", compare=False)


# --------------------------------------------------------------------------------- records


def _label(class_name: str) -> int:
    return 1 if class_name == PARASITIZED else 0


def records_from_store(store: Store, prefix: str = DATASET, *,
                       skipped: Counter[str] | None = None) -> list[CellRecord]:
    """Every cell under ``dataset/<class>/<slide>/<file>``, in key order.

    ``content_id`` is ``<ETag>-<size>`` from the listing, so no object is downloaded to
    know what it holds. On S3 the ETag of an object uploaded in one PUT is the MD5 of its
    bytes (a multipart upload's ETag is an MD5 of part MD5s with a ``-N`` suffix: still a
    stable id for the same upload); the local store's ETag is mtime+size, which changes
    whenever a file is replaced. Either way a changed object gets a new id and is decoded
    again, and an unchanged one is reused from the cache.

    An object that is not a training cell (a slide folder holding a ``/``, so a deeper key;
    a file that is not an image; an unknown class folder) is skipped, never silently: the
    skips are counted by reason into ``skipped`` and logged as one warning with examples.
    """
    records = []
    skips: Counter[str] = Counter()
    examples: list[str] = []
    for info in store.list(prefix):
        parts = info.key[len(prefix):].split("/")
        class_name = canonical_class(parts[0])
        if len(parts) != 3 or not all(parts) or class_name is None:
            reason = "unknown_class" if len(parts) == 3 and all(parts) else (
                "not_class_slide_file")
        elif Path(parts[2]).suffix.lower() not in IMAGE_SUFFIXES:
            reason = "not_an_image_name"
        else:
            records.append(CellRecord(key=info.key, label=_label(class_name), slide=parts[1],
                                      content_id=f"{info.etag}-{info.size}", etag=info.etag))
            continue
        skips[reason] += 1
        if len(examples) < 3:
            examples.append(info.key)
    if skips:
        log.warning("%d objects under %s are not training cells (%s<class>/<slide>/<file>)"
                    " and were skipped: %s; e.g. %s", sum(skips.values()), prefix, prefix,
                    dict(sorted(skips.items())), ", ".join(examples))
        if skipped is not None:
            skipped.update(skips)
    return records


def file_content_id(data: bytes) -> str:
    """``<md5>-<size>``: the same id S3 gives a single-PUT upload of these bytes, so a cell
    cached from a folder is recognised when it later comes from the bucket."""
    return f"{hashlib.md5(data, usedforsecurity=False).hexdigest()}-{len(data)}"


def records_from_folder(path: Path, *, workers: int = 8) -> list[CellRecord]:
    """Cells in ``path/<class>/...`` (any depth under the class folder), sorted by key.

    The slide is parsed from the file name (``C100P61...`` -> ``100``), ``unknown`` when the
    name has none. Content ids hash the bytes (MD5, like S3 ETags), which costs one read of
    the files, about a second for the 190 MB developers' set.
    """
    root = Path(path)
    files: list[tuple[str, int]] = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            if name.startswith(".") or full.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            key = full.relative_to(root).as_posix()
            class_name = class_from_key(key)
            if class_name is None:
                continue
            files.append((key, _label(class_name)))
    files.sort()

    def content_id(key: str) -> str:
        return file_content_id((root / key).read_bytes())

    with ThreadPoolExecutor(workers) as pool:
        ids = list(pool.map(content_id, [key for key, _ in files]))
    return [
        CellRecord(key=key, label=label,
                   slide=slide_from_name(key.rsplit("/", 1)[-1]) or UNKNOWN_SLIDE,
                   content_id=cid, etag=cid.rsplit("-", 1)[0])  # the MD5, as S3's ETag
        for (key, label), cid in zip(files, ids, strict=True)
    ]


def store_reader(store: Store) -> Callable[[str], bytes]:
    return store.get_bytes


def folder_reader(folder: Path) -> Callable[[str], bytes]:
    root = Path(folder)
    return lambda key: (root / key).read_bytes()
