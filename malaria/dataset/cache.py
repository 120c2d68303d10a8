"""Decoded cells kept on local disk, keyed by content id: a nightly retraining run only
downloads and decodes the cells that are new since the last run."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock

import numpy as np

from malaria.dataset.decode import decode_to_array
from malaria.dataset.records import CellRecord
from malaria.io.atomic import atomic_path


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
        with atomic_path(target) as tmp, open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

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
