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
    skipped: int
    bytes: int
    seconds: float


def _is_junk(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") or part.lower() in JUNK_NAMES for part in rel.parts)


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
