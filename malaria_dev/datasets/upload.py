"""Put a class-folder tree under ``incoming/`` of any store, where the ingest flow
validates and sorts it."""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from malaria.core.layout import INCOMING
from malaria.io.store import open_store
from malaria_dev.datasets.archive import JUNK_NAMES


class UploadError(RuntimeError):
    """A file of the tree could not be put into the store."""


@dataclass(frozen=True)
class UploadResult:
    uploaded: int
    skipped: int  # junk, hidden files and symlinks
    bytes: int
    seconds: float
    skipped_links: tuple[str, ...] = ()  # symlinks (files or folders), relative to the tree


def _is_junk(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") or part.lower() in JUNK_NAMES for part in rel.parts)


def _walk_files(src: Path, links: list[PurePosixPath]) -> Iterator[PurePosixPath]:
    """Relative paths of all regular files under ``src``, in a stable order. Symlinks, to
    files or folders, are neither followed nor uploaded but appended to ``links``: a link
    loop or a link out of the tree (a credentials file) must not upload the world."""
    for folder, dirs, files in os.walk(src, followlinks=False):
        base = Path(folder).relative_to(src)
        linked = sorted(d for d in dirs if (Path(folder) / d).is_symlink())
        dirs[:] = sorted(d for d in dirs if d not in linked)
        entries = [(name, True) for name in linked] + [(name, False) for name in files]
        for name, is_link_dir in sorted(entries):
            rel = PurePosixPath((base / name).as_posix())
            if is_link_dir or (Path(folder) / name).is_symlink():
                links.append(rel)
            else:
                yield rel


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

    Hidden files, OS junk and symlinks are skipped (the symlinks are named in
    ``skipped_links``). Each worker reads one file at a time, so memory
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
    links: list[PurePosixPath] = []
    skipped = 0
    for rel in _walk_files(src, links):
        if _is_junk(rel):
            skipped += 1
        else:
            files.append(rel)
    skipped += len(links)

    def put(rel: PurePosixPath) -> int:
        key = f"{base}/{rel}" if base else str(rel)
        # O_NOFOLLOW: a file swapped for a symlink after the walk is refused, not read.
        fd = os.open(src / rel, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as handle:
            data = handle.read()
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
        skipped_links=tuple(sorted(str(rel) for rel in links)),
    )
