"""Write a local file whole or not at all: a temporary file in the same folder, then a rename.

The one helper behind every local write that another process (or a resumed run) may read:
the local store, caches, checkpoints, downloaded models, the stack's settings.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: Path, *, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``target``; renamed onto ``target`` when the block ends
    without an error, removed otherwise. ``suffix`` keeps a library that chooses its format
    by the file name (``.keras``, ``.weights.h5``, ``.npy``) happy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex}-{target.name}{suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(target: Path, data: bytes | str, *, mode: int | None = None) -> None:
    """Write ``data`` to ``target`` atomically. ``mode`` (e.g. ``0o600`` for a file holding
    credentials) is set before the rename, so the file is never visible with looser bits;
    without it the umask decides, as for any new file."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_path(target) as tmp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        fd = os.open(tmp, flags, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        if mode is not None:
            os.chmod(tmp, mode)


def save_atomic(target: Path, save: Callable[[Path], object], *, suffix: str = "") -> None:
    """``save(tmp)`` writes the file (``model.save``, ``np.save``...), then it is renamed
    onto ``target``."""
    with atomic_path(target, suffix=suffix) as tmp:
        save(tmp)
