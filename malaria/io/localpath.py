"""Local paths built from names a bucket controls (an object key, a model record's file
name): the one check that such a path stays inside its folder.

A bucket writer is not trusted with the worker's disk: ``folder / "/abs/path"`` is
``/abs/path``, ``folder / "../x"`` is beside the folder, and a symlink inside the folder can
point anywhere. :func:`confined` refuses all three (the name's segments, then the resolved
path against the resolved folder) with :class:`UnsafePath`.
"""

from __future__ import annotations

from pathlib import Path

from malaria.io.store import StorageError, key_problem


class UnsafePath(StorageError):
    """A name from the bucket would put a local file outside its folder."""


def confined(folder: Path, relative: str, *, what: str = "key") -> Path:
    """``folder / relative``, or :class:`UnsafePath` when that is not strictly inside
    ``folder`` (``what`` names the source of ``relative`` in the message)."""
    folder = Path(folder)
    problem = key_problem(relative) if isinstance(relative, str) else "not a string"
    if problem is not None:
        raise UnsafePath(f"{what} {relative!r} {problem}: refused under {folder}")
    target = folder / relative
    # Resolve both: a symlinked folder inside ``folder`` must not lead out of it (nor a
    # separator the segment check does not know, such as a backslash on Windows).
    root = folder.resolve()
    resolved = target.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise UnsafePath(f"{what} {relative!r} leads to {resolved}, outside {root}: refused")
    return target
