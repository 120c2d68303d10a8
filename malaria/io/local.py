"""A local folder as an object store (``file:///path``): the same protocol as S3, for
development, tests and single-machine runs."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from malaria.io.atomic import write_atomic
from malaria.io.localpath import confined
from malaria.io.store import (
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    WriteConflict,
    check_key,
    get_or_missing,
)

# malaria.io.atomic names its in-flight files so: a listing never shows them.
_TEMPORARY = ".tmp-"
# Conditional writes take this lock (in the root, hidden from listings like in-flight files):
# flock is held per open file, so it serializes threads of one process as well as processes.
_CONDITIONAL_LOCK = f"{_TEMPORARY}conditional.lock"


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        # Checked segments and a resolved path inside the root: a symlink in the folder
        # (or a key a bucket writer chose) never reads or writes elsewhere on the disk.
        return confined(self.root, check_key(key))

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def _info(self, path: Path) -> ObjectInfo:
        stat = path.stat()
        return ObjectInfo(
            key=path.relative_to(self.root).as_posix(),
            size=stat.st_size,
            # mtime and size stand in for an ETag: they change when the file is replaced.
            etag=f"{stat.st_mtime_ns:x}-{stat.st_size:x}",
            last_modified=datetime.fromtimestamp(stat.st_mtime, tz=UTC),
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Files under ``prefix`` in key order, walking one folder at a time."""
        # A prefix may end inside a name ("incoming/Para"), so walk from its folder and filter.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        try:  # the prefix's folder is a key like any other: "../" lists nothing elsewhere
            start = self._path(base) if base else self.root
        except StorageError as error:
            raise StorageError(f"invalid listing prefix {prefix!r}: {error}") from error
        if not start.is_dir():
            return

        def walk(folder: Path, rel: str) -> Iterator[ObjectInfo]:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
            # Keys sort as strings, so a file "a" and a folder "a/..." interleave by full key.
            keyed = sorted(
                ((f"{rel}{e.name}/" if e.is_dir() else f"{rel}{e.name}"), e) for e in entries
            )
            for key, entry in keyed:
                if entry.name.startswith(_TEMPORARY):
                    continue  # in-flight atomic writes
                if entry.is_symlink():
                    continue  # not an object: it may lead out of the root
                if entry.is_dir():
                    if key.startswith(prefix) or prefix.startswith(key):
                        yield from walk(Path(entry.path), key)
                elif key.startswith(prefix):
                    yield self._info(Path(entry.path))

        yield from walk(start, f"{base}/" if base else "")

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
            raise ObjectNotFound(key) from error

    def get_many(self, keys: Sequence[str]) -> list[bytes | ObjectNotFound]:
        return [get_or_missing(self.get_bytes, key) for key in keys]

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None,
                  metadata: dict[str, str] | None = None) -> None:
        write_atomic(self._path(key), data)

    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        self.put_bytes(key, path.read_bytes())

    def download_file(self, key: str, path: Path) -> None:
        write_atomic(path, self.get_bytes(key))

    def copy(self, src_key: str, dst_key: str) -> None:
        self.put_bytes(dst_key, self.get_bytes(src_key))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        return self._info(path) if path.is_file() else None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    # -- conditional writes: atomic against every other conditional writer (one lock per
    # store), which is every writer of the objects that need them (leases, champion.json).

    @contextlib.contextmanager
    def _conditional(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / _CONDITIONAL_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def conditional_writes(self, near: str) -> bool:
        return True

    def put_if_absent(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        # Check and write under the lock; the write itself is put_bytes, so a store that
        # wraps put_bytes (recording, fault injection) sees conditional writes too.
        with self._conditional():
            if self._path(key).exists():
                raise WriteConflict(f"{key!r} already exists")
            self.put_bytes(key, data, content_type=content_type)

    def put_if_match(self, key: str, data: bytes, etag: str, *,
                     content_type: str | None = None) -> None:
        path = self._path(key)
        with self._conditional():
            before = self.head(key)
            if before is None or before.etag != etag:
                raise WriteConflict(f"{key!r} changed since it was read")
            self.put_bytes(key, data, content_type=content_type)
            # The ETag is mtime and size, and file times are coarse (a jiffy): a replacement
            # could get an ETag seen before, and a stale If-Match would pass. Keep mtimes
            # strictly increasing across conditional replacements instead.
            previous_ns = int(before.etag.split("-", 1)[0], 16)
            after = path.stat()
            if after.st_mtime_ns <= previous_ns:
                os.utime(path, ns=(after.st_atime_ns, previous_ns + 1))
