"""Training data: cell records, a decoded-image cache, slide-level splits and input pipelines.

A :class:`CellRecord` names one labelled cell and how to recognise its content. Records come
from the bucket (``dataset/<class>/<slide>/<file>``) or from a local folder with class
subfolders (the layout of the NIH download).

Images are decoded once into ``uint8`` arrays at a given input size and kept in an
:class:`ImageCache` on local disk, keyed by content id: a nightly retraining run only
downloads and decodes the cells that are new since the last run.

Splits are by slide, never by cell: cells of one slide share a stain and optics, and a
cell-level split leaks them into the test set (published: 98.6% cell-level vs 95.7%
slide-level accuracy for the same model).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from malaria.core.labels import (
    PARASITIZED,
    UNKNOWN_SLIDE,
    canonical_class,
    class_from_key,
    slide_from_name,
)
from malaria.core.layout import DATASET

if TYPE_CHECKING:
    import tensorflow as tf

    from malaria.io.store import Store  # boto3 only where a store is used

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})


@dataclass(frozen=True)
class CellRecord:
    """One labelled cell.

    ``key`` is the object key in the store (or the path relative to a folder), ``label`` is
    1 for Parasitized and 0 for Uninfected, ``content_id`` identifies the bytes (see
    :func:`records_from_store` and :func:`records_from_folder`).
    """

    key: str
    label: int
    slide: str
    content_id: str


# --------------------------------------------------------------------------------- records


def _label(class_name: str) -> int:
    return 1 if class_name == PARASITIZED else 0


def records_from_store(store: Store, prefix: str = DATASET) -> list[CellRecord]:
    """Every cell under ``dataset/<class>/<slide>/<file>``, in key order.

    ``content_id`` is ``<ETag>-<size>`` from the listing, so no object is downloaded to
    know what it holds. On S3 the ETag of an object uploaded in one PUT is the MD5 of its
    bytes (a multipart upload's ETag is an MD5 of part MD5s with a ``-N`` suffix: still a
    stable id for the same upload); the local store's ETag is mtime+size, which changes
    whenever a file is replaced. Either way a changed object gets a new id and is decoded
    again, and an unchanged one is reused from the cache.
    """
    records = []
    for info in store.list(prefix):
        parts = info.key[len(prefix):].split("/")
        if len(parts) != 3 or Path(parts[2]).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        class_name = canonical_class(parts[0])
        if class_name is None:
            continue
        records.append(CellRecord(key=info.key, label=_label(class_name), slide=parts[1],
                                  content_id=f"{info.etag}-{info.size}"))
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
                   content_id=cid)
        for (key, label), cid in zip(files, ids, strict=True)
    ]


# ---------------------------------------------------------------------------- image cache


def to_square(image: Image.Image, size: int) -> np.ndarray:
    """Pad to a square with black, centred, then resize to ``size`` x ``size``.

    Why pad rather than stretch or crop: crops are 80-200 px and not square; stretching
    would change the cell's shape (a round cell becomes an ellipse, differently for each
    cell), and a centre crop can cut off a parasite that sits at the membrane, where ring
    forms and gametocytes often are. Black is the crops' own background, so the padding
    looks like more background. Shrinking uses area averaging (PIL's BOX filter), which
    keeps the thin chromatin dots as a darker pixel instead of aliasing them away;
    enlarging uses bicubic interpolation.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")  # (convert copies even when the mode is already RGB)
    width, height = image.size
    side = max(width, height)
    if width != height:
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    if side != size:
        method = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
        image = image.resize((size, size), method)
    return np.asarray(image, dtype=np.uint8)


def model_input(image: Image.Image, size: int) -> np.ndarray:
    """A decoded image as the model sees it (training, evaluation and scoring alike)."""
    if image.mode in ("RGBA", "LA", "PA", "P"):
        # Transparent pixels become black, the background of segmented crops.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return to_square(background, size)
    return to_square(image, size)


def decode_to_array(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return model_input(image, size)


@dataclass
class CacheStats:
    decoded: int = 0
    reused: int = 0
    _lock: Lock = field(default_factory=Lock, repr=False)

    def add(self, *, decoded: int = 0, reused: int = 0) -> None:
        with self._lock:
            self.decoded += decoded
            self.reused += reused


class ImageCache:
    """Decoded cells as ``uint8`` arrays on local disk: ``<folder>/<size>/<id[:2]>/<id>.npy``.

    One small file per image and size keeps the cache append-only and safe to share
    between runs (files are written under a temporary name and renamed), and ``np.load``
    of a 12 KB file costs tens of microseconds, so loading 14k cached cells takes about a
    second. Content ids are hashed into file names, so any id string is safe.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.stats = CacheStats()

    def path(self, content_id: str, size: int) -> Path:
        digest = hashlib.sha1(content_id.encode(), usedforsecurity=False).hexdigest()
        return self.folder / str(size) / digest[:2] / f"{digest}.npy"

    def _store(self, target: Path, array: np.ndarray) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, records: Sequence[CellRecord], size: int,
             read_bytes: Callable[[str], bytes], *, workers: int = 8) -> np.ndarray:
        """Arrays of shape ``(len(records), size, size, 3)`` in record order.

        Cells not yet cached are fetched with ``read_bytes(key)`` on a thread pool
        (network reads and PIL decoding release the GIL) and decoded once.
        """
        out = np.empty((len(records), size, size, 3), dtype=np.uint8)

        def one(index: int) -> None:
            record = records[index]
            target = self.path(record.content_id, size)
            try:
                out[index] = np.load(target, allow_pickle=False)
                self.stats.add(reused=1)
                return
            except (FileNotFoundError, ValueError, OSError):
                pass  # missing or damaged: decode again
            array = decode_to_array(read_bytes(record.key), size)
            self._store(target, array)
            out[index] = array
            self.stats.add(decoded=1)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            # list() re-raises the first worker exception here.
            list(pool.map(one, range(len(records))))
        return out


def store_reader(store: Store) -> Callable[[str], bytes]:
    return store.get_bytes


def folder_reader(folder: Path) -> Callable[[str], bytes]:
    root = Path(folder)
    return lambda key: (root / key).read_bytes()


# ---------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class SlideSplit:
    train: list[str]
    val: list[str]
    test: list[str]

    def of(self, records: Iterable[CellRecord], part: str) -> list[CellRecord]:
        slides = set(getattr(self, part))
        return [r for r in records if r.slide in slides]

    def as_dict(self) -> dict[str, list[str]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _slide_sort_key(slide: str) -> tuple[int, int | str]:
    return (0, int(slide)) if slide.isdigit() else (1, slide)


def split_by_slide(records: Sequence[CellRecord], *, seed: int = 0, val_fraction: float = 0.15,
                   test_fraction: float = 0.2) -> SlideSplit:
    """Disjoint train/validation/test slide lists, the same for the same records and seed.

    Stratified: slides are grouped by their majority class (in the NIH set, slides of
    healthy patients have only uninfected cells) and each group is shared out in the same
    proportions, so every split sees both kinds of slide whenever there are enough. Each
    non-empty fraction gets at least one slide when there are three or more slides.
    The split is a function of the slide ids and their majority class only, so adding
    cells to existing slides does not move a slide between splits.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("fractions must be in [0, 1) and sum to less than 1")
    counts: dict[str, Counter[int]] = defaultdict(Counter)
    for record in records:
        counts[record.slide][record.label] += 1
    groups: dict[int, list[str]] = defaultdict(list)
    for slide, c in counts.items():
        groups[int(c[1] >= c[0])].append(slide)
    rng = np.random.default_rng(seed)
    train: list[str] = []
    val: list[str] = []
    test: list[str] = []
    total = len(counts)
    for group in sorted(groups):
        slides = sorted(groups[group], key=_slide_sort_key)
        order = [slides[i] for i in rng.permutation(len(slides))]
        n_test = round(len(order) * test_fraction)
        n_val = round(len(order) * val_fraction)
        test += order[:n_test]
        val += order[n_test:n_test + n_val]
        train += order[n_test + n_val:]
    # Tiny sets: make sure each asked-for split has at least one slide (taken from train).
    for part, fraction in ((test, test_fraction), (val, val_fraction)):
        if fraction > 0 and not part and total >= 3 and len(train) > 1:
            part.append(train.pop(int(rng.integers(len(train)))))
    key = _slide_sort_key
    return SlideSplit(sorted(train, key=key), sorted(val, key=key), sorted(test, key=key))


# ---------------------------------------------------------------------------- class balance


def class_weights(labels: np.ndarray, *, tolerance: float = 0.1) -> dict[int, float] | None:
    """``{0: w0, 1: w1}`` that give both classes equal total weight, or None when the
    classes are within ``tolerance`` of balanced (weights of ~1 only add noise)."""
    labels = np.asarray(labels).astype(int)
    n = len(labels)
    positives = int(labels.sum())
    negatives = n - positives
    if n == 0 or positives == 0 or negatives == 0:
        return None
    if abs(positives - negatives) / n <= tolerance:
        return None
    return {0: n / (2.0 * negatives), 1: n / (2.0 * positives)}


# --------------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class ArraySet:
    """Images (N, S, S, 3) uint8 and labels (N,) with the slide of each cell."""

    images: np.ndarray
    labels: np.ndarray
    slides: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_arrays(records: Sequence[CellRecord], cache: ImageCache, size: int,
                read_bytes: Callable[[str], bytes], *, workers: int = 8) -> ArraySet:
    images = cache.load(records, size, read_bytes, workers=workers)
    labels = np.array([r.label for r in records], dtype=np.float32)
    slides = np.array([r.slide for r in records])
    return ArraySet(images, labels, slides)


def sample_weights(labels: np.ndarray, weights: dict[int, float]) -> np.ndarray:
    """Each cell's weight from its class's (``class_weights``)."""
    return np.where(np.asarray(labels) > 0.5, weights[1], weights[0]).astype(np.float32)


def make_dataset(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                 shuffle: bool, seed: int = 0, weights: dict[int, float] | None = None,
                 mixup_alpha: float = 0.0) -> tf.data.Dataset:
    """A batched ``tf.data`` pipeline over in-memory uint8 arrays (the model scales and
    augments inside, so the pipeline only shuffles and batches). The real set at 64 px is
    170 MB, so memory is not the constraint; a reshuffle each epoch is seeded.

    ``mixup_alpha > 0`` blends each batch with a shuffled copy of itself (mixup): images,
    labels and sample weights by the same Beta(alpha, alpha) fraction per cell, the images
    rounded back to uint8 so the model's input stays what it serves on."""
    import tensorflow as tf

    labels = np.asarray(labels, dtype=np.float32)
    parts: tuple[np.ndarray, ...] = (images, labels)
    if weights:
        parts = (images, labels, sample_weights(labels, weights))
    ds = tf.data.Dataset.from_tensor_slices(parts)
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if mixup_alpha > 0:
        ds = ds.map(_mixup(mixup_alpha, seed), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _mixup(alpha: float, seed: int) -> Callable[..., tuple[Any, ...]]:
    import tensorflow as tf

    def blend(images: Any, labels: Any, *weights: Any) -> tuple[Any, ...]:
        n = tf.shape(labels)[0]
        # Beta(a, a) from two Gamma(a) draws.
        g1 = tf.random.gamma([n], alpha, seed=seed)
        g2 = tf.random.gamma([n], alpha, seed=seed + 1)
        fraction = g1 / (g1 + g2)
        order = tf.random.shuffle(tf.range(n), seed=seed + 2)
        mixed = (fraction[:, None, None, None] * tf.cast(images, tf.float32)
                 + (1 - fraction[:, None, None, None])
                 * tf.cast(tf.gather(images, order), tf.float32))
        out = (tf.cast(tf.round(mixed), images.dtype),
               fraction * labels + (1 - fraction) * tf.gather(labels, order))
        return out + tuple(fraction * w + (1 - fraction) * tf.gather(w, order) for w in weights)

    return blend
