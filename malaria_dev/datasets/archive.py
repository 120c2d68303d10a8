"""Unpack a class-folder zip of cell images safely: no zip slip, no zip bomb, no half
extraction, OS junk and non-images skipped, re-runs leave identical files untouched."""

from __future__ import annotations

import logging
import re
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from malaria.core.labels import CLASS_NAMES, canonical_class
from malaria.io.atomic import write_atomic

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})

# A cell crop is tens of kilobytes and the whole NIH archive is about 350 MB, so these caps
# leave ample room for real data while stopping a zip bomb before it fills the disk.
MAX_MEMBER_BYTES = 64 * 2**20
MAX_TOTAL_BYTES = 4 * 2**30

# Files that operating systems and archivers drop next to real data.
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store", "__macosx"})

_DRIVE = re.compile(r"^[A-Za-z]:")


class DownloadError(RuntimeError):
    """The dataset could not be fetched or its archive is not usable."""


class ArchiveError(DownloadError):
    """The archive is truncated, corrupt, or declares absurd sizes."""


class UnsafeArchiveError(ArchiveError):
    """A member would be written outside the destination (zip slip)."""


@dataclass(frozen=True)
class ExtractResult:
    counts: dict[str, int]  # images per class now present from this archive
    written: int  # files created or replaced
    unchanged: int  # files already there with identical bytes
    skipped: int  # members not extracted (junk, not an image, no class, duplicate)
    skipped_reasons: dict[str, int] = field(default_factory=dict)


def extract_cell_images(
    archive: Path,
    to: Path,
    *,
    progress: bool = True,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> ExtractResult:
    """Unpack the images of a class-folder zip into ``<to>/<class>/<file name>``.

    The class comes from the nearest folder whose name is a class synonym, so
    ``cell_images/cell_images/Parasitized/x.png`` works as well as ``Parasitized/x.png``.
    The whole archive is checked before anything is written: an unsafe member name or an
    absurd size refuses the archive as a whole rather than half-extracting it.
    """
    to = Path(to)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise ArchiveError(f"{archive.name} is not a readable zip archive: {error}") from error
    with zf:
        members = [info for info in zf.infolist() if not info.is_dir()]
        _check_members(members, max_member_bytes=max_member_bytes,
                       max_total_bytes=max_total_bytes)
        _check_crcs(zf, archive)
        return _extract(zf, members, to, progress=progress, max_member_bytes=max_member_bytes)


def _member_parts(name: str) -> list[str]:
    """The path components of a member name; refuses names that could escape ``to``."""
    posix = name.replace("\\", "/")  # archives made on Windows may use backslashes
    if posix.startswith("/") or _DRIVE.match(posix):
        raise UnsafeArchiveError(f"refusing archive: absolute member path {name!r}")
    parts = [part for part in posix.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"refusing archive: member path {name!r} leaves the folder")
    return parts


def _check_members(
    members: list[zipfile.ZipInfo], *, max_member_bytes: int, max_total_bytes: int
) -> None:
    # Declared sizes are enforced by zipfile on read (it stops at file_size and checks the
    # CRC), so checking them up front is enough to stop a bomb before any work is done.
    total = 0
    for info in members:
        _member_parts(info.filename)
        if info.file_size > max_member_bytes:
            raise ArchiveError(
                f"refusing archive: member {info.filename!r} unpacks to {info.file_size} "
                f"bytes (limit {max_member_bytes})"
            )
        total += info.file_size
    if total > max_total_bytes:
        raise ArchiveError(
            f"refusing archive: members unpack to {total} bytes in all (limit {max_total_bytes})"
        )


def _check_crcs(zf: zipfile.ZipFile, archive: Path) -> None:
    try:
        bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError) as error:
        # RuntimeError: an encrypted member; the others: a truncated or mangled stream.
        raise ArchiveError(f"{archive.name} is corrupt: {error}") from error
    if bad is not None:
        raise ArchiveError(f"{archive.name} is corrupt: CRC check failed for member {bad!r}")


def _skip_reason(parts: list[str]) -> str | None:
    name = parts[-1]
    if any(part.lower() in JUNK_NAMES or part.startswith(".") for part in parts):
        return "os-junk"  # also covers macOS "._x.png" resource forks
    if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
        return "not-image"
    return None


def _class_of(parts: list[str]) -> str | None:
    for folder in reversed(parts[:-1]):
        found = canonical_class(folder)
        if found:
            return found
    return None


def _extract(
    zf: zipfile.ZipFile,
    members: list[zipfile.ZipInfo],
    to: Path,
    *,
    progress: bool,
    max_member_bytes: int,
) -> ExtractResult:
    counts: Counter[str] = Counter({name: 0 for name in CLASS_NAMES})
    skipped: Counter[str] = Counter()
    seen: dict[Path, int] = {}  # destination -> CRC of the member that claimed it
    written = unchanged = 0
    for info in tqdm(members, unit="file", desc="unpack", disable=not progress):
        parts = _member_parts(info.filename)
        reason = _skip_reason(parts)
        label = None if reason else _class_of(parts)
        if label is None:
            skipped[reason or "no-class"] += 1
            continue
        # Flatten to <class>/<file name>: the folders above the class carry no meaning.
        dest = to / label / parts[-1]
        if dest in seen:
            # Some copies of the archive hold the same tree twice (cell_images/cell_images/).
            same = seen[dest] == info.CRC
            skipped["duplicate" if same else "name-conflict"] += 1
            if not same:
                log.warning("%s: another member already gave %s; keeping the first",
                            info.filename, dest)
            continue
        seen[dest] = info.CRC
        with zf.open(info) as source:
            data = source.read(max_member_bytes + 1)
        if len(data) > max_member_bytes:  # defence in depth; zipfile already caps the read
            raise ArchiveError(f"refusing archive: member {info.filename!r} is too large")
        if _same_file(dest, data):
            unchanged += 1
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(dest, data)
            written += 1
        counts[label] += 1
    if skipped:
        log.info("skipped %d archive members: %s", sum(skipped.values()), dict(skipped))
    return ExtractResult(
        counts=dict(counts),
        written=written,
        unchanged=unchanged,
        skipped=sum(skipped.values()),
        skipped_reasons=dict(skipped),
    )


def _same_file(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except FileNotFoundError:
        return False
