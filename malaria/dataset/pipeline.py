"""What a model trains on: decoded cells as arrays with labels and slides, class weights,
and the ``tf.data`` input pipeline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from malaria.dataset.cache import ImageCache
from malaria.dataset.records import CellRecord

if TYPE_CHECKING:
    import tensorflow as tf


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
                 shuffle: bool, seed: int = 0,
                 weights: dict[int, float] | None = None) -> tf.data.Dataset:
    """A batched ``tf.data`` pipeline over in-memory uint8 arrays (the model scales and
    augments inside, so the pipeline only shuffles and batches). The real set at 64 px is
    170 MB, so memory is not the constraint; a reshuffle each epoch is seeded."""
    import tensorflow as tf

    labels = np.asarray(labels, dtype=np.float32)
    parts: tuple[np.ndarray, ...] = (images, labels)
    if weights:
        parts = (images, labels, sample_weights(labels, weights))
    ds = tf.data.Dataset.from_tensor_slices(parts)
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
