"""Where a model comes from: its version name, the packages and code revision that made it,
and the hashes that name its data and its file.

:func:`package_versions` and :func:`code_revision` are the short forms every record has
carried; :func:`environment_packages` and :func:`code_version` are the fuller lineage
(:mod:`malaria.registry.lineage`): every package that shapes a run, and where the code came
from when no git checkout is there to ask.
"""

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
from typing import Any

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


# Distributions whose versions a model's lineage records, by the name the product imports;
# alternatives are other distributions that install the same module.
LINEAGE_PACKAGES: dict[str, tuple[str, ...]] = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tensorflow-intel",
                   "tf-nightly"),
    "keras": ("keras",),
    "numpy": ("numpy",),
    "prefect": ("prefect",),
    "pillow": ("pillow", "Pillow"),
    "pandas": ("pandas",),
    "boto3": ("boto3",),
}
PACKAGE_NAME = "malaria-screening"  # this project's distribution (pyproject.toml)


def environment_packages() -> dict[str, str | None]:
    """The versions of every package that shapes a run (None: not installed), from installed
    metadata only: nothing is imported, so the registry stays free of TF and Prefect."""
    found = {name: _distribution_version(*dists) for name, dists in LINEAGE_PACKAGES.items()}
    found["python"] = platform.python_version()
    return found


def _git_dir(start: Path) -> Path | None:
    """The git directory of the checkout holding ``start``: ``.git`` itself, or the folder a
    ``.git`` file points to (a worktree or submodule)."""
    for folder in (start, *start.parents):
        marker = folder / ".git"
        if marker.is_dir():
            return marker
        if marker.is_file():
            text = marker.read_text(errors="replace").strip()
            if text.startswith("gitdir:"):
                target = Path(text.removeprefix("gitdir:").strip())
                return target if target.is_absolute() else (folder / target).resolve()
            return None
    return None


def _read_ref(git_dir: Path, ref: str) -> str | None:
    """The commit ``ref`` names: a loose ref file, else ``packed-refs``; a worktree keeps
    its branches in the common directory that ``commondir`` names."""
    folders = [git_dir]
    common = git_dir / "commondir"
    if common.is_file():
        folders.append((git_dir / common.read_text().strip()).resolve())
    for folder in folders:
        loose = folder / ref
        if loose.is_file():
            return loose.read_text().strip() or None
        packed = folder / "packed-refs"
        if packed.is_file():
            for line in packed.read_text(errors="replace").splitlines():
                sha, _, name = line.partition(" ")
                if name.strip() == ref and not line.startswith(("#", "^")):
                    return sha.strip()
    return None


def git_head(start: Path) -> str | None:
    """The commit checked out in the git tree holding ``start``, read from the files under
    ``.git`` (no git binary needed, which a slim image lacks); None outside a checkout."""
    try:
        git_dir = _git_dir(start.resolve())
        if git_dir is None:
            return None
        head = (git_dir / "HEAD").read_text().strip()
        sha = _read_ref(git_dir, head.removeprefix("ref:").strip()) if head.startswith(
            "ref:") else head
    except OSError:
        return None
    return sha if sha and len(sha) >= 40 and all(c in "0123456789abcdef" for c in sha) else None


def git_dirty(start: Path) -> bool | None:
    """Whether tracked files differ from the checked-out commit; None when git cannot say
    (no binary, not a checkout). Read-only: ``git diff --quiet`` writes nothing."""
    try:
        code = subprocess.run(["git", "-C", str(start), "diff", "--quiet", "HEAD", "--"],
                              capture_output=True, timeout=10).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    return {0: False, 1: True}.get(code)


def code_version(source: Path | None = None) -> dict[str, Any]:
    """Which code made a model: ``revision`` (the commit, or ``MALARIA_CODE_REVISION`` when a
    deployment sets it), ``dirty`` (uncommitted changes; None when unknown), ``package``
    (this project's installed version) and ``source`` (``env``, ``git`` or ``package``:
    where the revision came from; ``package`` means no revision was found, as in an image
    built without .git, and the package version is all there is)."""
    folder = source or Path(__file__).resolve().parent
    package = _distribution_version(PACKAGE_NAME)
    explicit = os.environ.get("MALARIA_CODE_REVISION", "").strip()
    if explicit:
        return {"revision": explicit, "dirty": None, "package": package, "source": "env"}
    head = git_head(folder)
    if head is not None:
        return {"revision": head, "dirty": git_dirty(folder), "package": package,
                "source": "git"}
    return {"revision": None, "dirty": None, "package": package, "source": "package"}


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
