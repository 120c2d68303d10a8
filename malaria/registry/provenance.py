"""Where a model comes from: its version name, the packages and code revision that made it,
and the hashes that name its data and its file."""

from __future__ import annotations

import hashlib
import os
import platform
import secrets
import subprocess
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np


def new_version(now: datetime | None = None) -> str:
    """A version name that sorts by creation time: ``20261127T061500Z-ab12cd``.

    The random suffix keeps two runs started in the same second apart.
    """
    moment = now or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # a naive time is taken as UTC
    return f"{moment.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def package_versions() -> dict[str, str | None]:
    """Versions of what shapes a model, read from installed metadata (TF is never imported)."""
    return {
        # The module is ``tensorflow`` whichever of these distributions installed it.
        "tensorflow": _distribution_version(
            "tensorflow", "tensorflow-cpu", "tensorflow-macos", "tensorflow-intel", "tf-nightly"
        ),
        "keras": _distribution_version("keras"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def code_revision() -> str | None:
    """``MALARIA_CODE_REVISION`` when set, else ``git rev-parse HEAD`` of this source tree.

    The variable wins because a deployment sets it on purpose (an image has no .git). A tree
    with uncommitted changes to tracked files gets a ``+dirty`` suffix: such a model cannot be
    rebuilt from the revision alone.
    """
    explicit = os.environ.get("MALARIA_CODE_REVISION", "").strip()
    if explicit:
        return explicit
    source = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "diff", "--quiet", "HEAD", "--"],
            capture_output=True, timeout=10,
        ).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if head and dirty else head or None


def hash_manifest(entries: Iterable[str | Iterable[str]]) -> str:
    """SHA-256 of a data manifest: one line per entry (e.g. key, content hash, label, slide).

    Lines are sorted first, so the hash names the set of data, not the order it was listed.
    """
    lines = sorted(e if isinstance(e, str) else "\t".join(map(str, e)) for e in entries)
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
