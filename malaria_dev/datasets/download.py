"""Download the public NIH/NLM malaria ``cell_images.zip`` and unpack it into class folders.

The archive is streamed to a temporary file, checked (HTTP status, length, optional
SHA-256) and handed to ``archive.extract_cell_images``, which unpacks only what is safe
and useful into ``<to>/Parasitized/`` and ``<to>/Uninfected/``.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx
from tqdm import tqdm

from malaria_dev.datasets.archive import (
    MAX_MEMBER_BYTES,
    MAX_TOTAL_BYTES,
    DownloadError,
    extract_cell_images,
)

NIH_CELL_IMAGES_URL = "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"

_CHUNK = 1 << 20


class ChecksumError(DownloadError):
    """The downloaded bytes are not the ones expected (SHA-256 mismatch)."""


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
