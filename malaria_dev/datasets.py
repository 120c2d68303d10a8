"""Get the public NIH/NLM malaria cell images onto disk, and a class-folder tree into a bucket.

``download_nih_dataset`` streams ``cell_images.zip`` to a temporary file, checks it (HTTP
status, length, optional SHA-256, zip CRCs) and unpacks only what is safe and useful into
``<to>/Parasitized/`` and ``<to>/Uninfected/``. ``upload_tree`` then puts such a tree under
``incoming/`` of any store, where the ingest flow validates and sorts it.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import re
import time
import uuid
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import httpx
from tqdm import tqdm

from malaria.core.labels import CLASS_NAMES, canonical_class
from malaria.core.layout import INCOMING
from malaria.io.store import open_store

log = logging.getLogger(__name__)

NIH_CELL_IMAGES_URL = "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})

# A cell crop is tens of kilobytes and the whole NIH archive is about 350 MB, so these caps
# leave ample room for real data while stopping a zip bomb before it fills the disk.
MAX_MEMBER_BYTES = 64 * 2**20
MAX_TOTAL_BYTES = 4 * 2**30

# Files that operating systems and archivers drop next to real data.
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store", "__macosx"})

_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


class DownloadError(RuntimeError):
    """The dataset could not be fetched or its archive is not usable."""


class ChecksumError(DownloadError):
    """The downloaded bytes are not the ones expected (SHA-256 mismatch)."""


class ArchiveError(DownloadError):
    """The archive is truncated, corrupt, or declares absurd sizes."""


class UnsafeArchiveError(ArchiveError):
    """A member would be written outside the destination (zip slip)."""


class UploadError(RuntimeError):
    """A file of the tree could not be put into the store."""


@dataclass(frozen=True)
class ExtractResult:
    counts: dict[str, int]  # images per class now present from this archive
    written: int  # files created or replaced
    unchanged: int  # files already there with identical bytes
    skipped: int  # members not extracted (junk, not an image, no class, duplicate)
    skipped_reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    bytes_downloaded: int
    sha256: str
    counts: dict[str, int]
    skipped: int
    written: int = 0
    unchanged: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class UploadResult:
    uploaded: int
    skipped: int
    bytes: int
    seconds: float


# ------------------------------------------------------------------------------- download


def download_nih_dataset(
    to: Path,
    *,
    url: str = NIH_CELL_IMAGES_URL,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> DownloadResult:
    """Download the NIH malaria ``cell_images.zip`` and unpack it into class folders.

    Re-running is safe: files already present with the same bytes are left untouched.
    The archive itself is deleted afterwards; raises ``DownloadError`` (or a subclass) with
    the reason when the download or the archive cannot be trusted.
    """
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    # Hidden name in the destination: same file system as the output, and upload_tree
    # skips it should a crash leave it behind.
    part = to / f".cell_images.{uuid.uuid4().hex}.zip.part"
    try:
        with part.open("wb") as handle:
            received, digest = _stream(url, handle, timeout=timeout, progress=progress)
        if sha256 is not None and digest != sha256.strip().lower():
            raise ChecksumError(
                f"SHA-256 mismatch for {url}: expected {sha256.strip().lower()}, got {digest}"
            )
        extracted = extract_cell_images(
            part, to, progress=progress,
            max_member_bytes=max_member_bytes, max_total_bytes=max_total_bytes,
        )
    finally:
        part.unlink(missing_ok=True)
    return DownloadResult(
        path=to,
        bytes_downloaded=received,
        sha256=digest,
        counts=extracted.counts,
        skipped=extracted.skipped,
        written=extracted.written,
        unchanged=extracted.unchanged,
        skipped_reasons=extracted.skipped_reasons,
    )


def _stream(url: str, handle: BinaryIO, *, timeout: float, progress: bool) -> tuple[int, str]:
    """Write the body of ``GET url`` to ``handle``; return (bytes, sha256 hex)."""
    digest = hashlib.sha256()
    received = 0
    try:
        # identity: Content-Length must describe the bytes we store, not a gzip of them.
        with httpx.stream(
            "GET", url, follow_redirects=True, timeout=timeout,
            headers={"Accept-Encoding": "identity"},
        ) as response:
            if response.status_code != 200:
                raise DownloadError(
                    f"GET {url} answered HTTP {response.status_code} {response.reason_phrase}"
                )
            expected = _content_length(response)
            with tqdm(
                total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                desc="download", disable=not progress,
            ) as bar:
                for chunk in response.iter_bytes(_CHUNK):
                    handle.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            # Compare on the wire count, which is what Content-Length describes.
            on_wire = response.num_bytes_downloaded
    except httpx.HTTPError as error:
        raise DownloadError(f"download of {url} failed: {error}") from error
    if expected is not None and on_wire != expected:
        raise DownloadError(
            f"download of {url} is incomplete: got {on_wire} bytes, "
            f"Content-Length says {expected}"
        )
    return received, digest.hexdigest()


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise DownloadError(f"invalid Content-Length {value!r} from {response.url}") from None


# -------------------------------------------------------------------------------- extract


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
    if any(part.lower() in _JUNK_NAMES or part.startswith(".") for part in parts):
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
            _write_atomic(dest, data)
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


def _write_atomic(dest: Path, data: bytes) -> None:
    """Write a whole file or nothing: readers never see a half-written image."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 lets the umask decide permissions (mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------- upload


def _is_junk(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") or part.lower() in _JUNK_NAMES for part in rel.parts)


def _walk_files(src: Path) -> Iterator[PurePosixPath]:
    """Relative paths of all files under ``src``, in a stable order, symlinked dirs not
    followed (a link loop or a link out of the tree must not upload the world)."""
    for folder, dirs, files in os.walk(src, followlinks=False):
        dirs.sort()
        base = Path(folder).relative_to(src)
        for name in sorted(files):
            yield PurePosixPath((base / name).as_posix())


def upload_tree(
    src: Path,
    to_url: str,
    *,
    prefix: str = INCOMING,
    concurrency: int = 16,
    progress: bool = True,
) -> UploadResult:
    """Put every file of ``src`` (any depth) under ``<to_url>/<prefix>``, keeping relative
    paths: ``src/Parasitized/x.png`` becomes ``incoming/Parasitized/x.png``.

    Hidden files and OS junk are skipped. Each worker reads one file at a time, so memory
    stays bounded by ``concurrency`` files whatever the size of the tree. Uploading again
    rewrites the same objects with the same bytes.
    """
    src = Path(src)
    if not src.is_dir():
        raise UploadError(f"{src} is not a folder")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    store = open_store(to_url)
    base = prefix.strip("/")
    started = time.perf_counter()

    files: list[PurePosixPath] = []
    skipped = 0
    for rel in _walk_files(src):
        if _is_junk(rel):
            skipped += 1
        else:
            files.append(rel)

    def put(rel: PurePosixPath) -> int:
        key = f"{base}/{rel}" if base else str(rel)
        data = (src / rel).read_bytes()
        content_type = mimetypes.guess_type(rel.name)[0] or "application/octet-stream"
        try:
            store.put_bytes(key, data, content_type=content_type)
        except Exception as error:
            raise UploadError(f"upload of {rel} to {store.uri(key)} failed: {error}") from error
        return len(data)

    uploaded = total_bytes = 0
    # A bounded window of futures: we never queue the whole tree, and the first failure
    # stops new submissions instead of letting thousands more fail the same way.
    window = 2 * concurrency
    pending: set[Future[int]] = set()
    queue = iter(files)
    with (
        ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="upload") as pool,
        tqdm(total=len(files), unit="file", desc="upload", disable=not progress) as bar,
    ):
        try:
            while True:
                for rel in queue:
                    pending.add(pool.submit(put, rel))
                    if len(pending) >= window:
                        break
                if not pending:
                    break
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    total_bytes += future.result()
                    uploaded += 1
                    bar.update(1)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return UploadResult(
        uploaded=uploaded,
        skipped=skipped,
        bytes=total_bytes,
        seconds=time.perf_counter() - started,
    )
