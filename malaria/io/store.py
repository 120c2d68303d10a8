"""One interface over object storage: ``s3://bucket/prefix`` (any S3-compatible server) and
``file:///path`` (a local folder).

Keys are always relative to the store's root and use ``/``. Every write is a whole object:
S3 PUTs are atomic by nature; the local store writes a temporary file and renames it, so a
reader never sees half a file.

This module holds what every store shares (the protocol, ``ObjectInfo``, the errors, the
JSON/CSV helpers, ``open_store``); the stores themselves live in ``malaria.io.s3`` and
``malaria.io.local``. ``S3Store``, ``LocalStore``, ``s3_client`` and ``reset_clients`` can
still be imported from here: they load on first use, so a caller that only needs a local
folder never imports boto3.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlparse

import pandas as pd

if TYPE_CHECKING:
    from malaria.io.local import LocalStore
    from malaria.io.s3 import S3Store

# boto3's connection pool and obstore's in-flight GETs per store: as large as our thread pools.
DEFAULT_POOL_SIZE = 32


class StorageError(RuntimeError):
    """A storage operation failed in a way the caller should report, not retry."""


class ObjectNotFound(StorageError, KeyError):
    """The key does not exist."""


class WriteConflict(StorageError):
    """A conditional write lost: the object already existed (create-if-absent) or was no
    longer the one read (replace-if-unchanged, or it is gone). Re-read and decide again."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime


class Store(Protocol):
    url: str

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_many(self, keys: Sequence[str]) -> list[bytes | ObjectNotFound]: ...
    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None,
                  metadata: dict[str, str] | None = None) -> None: ...
    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None: ...
    def download_file(self, key: str, path: Path) -> None: ...
    def copy(self, src_key: str, dst_key: str) -> None: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def head(self, key: str) -> ObjectInfo | None: ...
    def uri(self, key: str) -> str: ...
    # Conditional writes (``If-None-Match: *`` / ``If-Match: <etag>``), for the objects two
    # writers may race on (leases, ``champion.json``). Both raise ``WriteConflict`` when the
    # condition fails; ``etag`` is as ``head`` and ``list`` give it. They are atomic only
    # where ``conditional_writes`` says so; elsewhere they check, then write (a window).
    def put_if_absent(self, key: str, data: bytes, *,
                      content_type: str | None = None) -> None: ...
    def put_if_match(self, key: str, data: bytes, etag: str, *,
                     content_type: str | None = None) -> None: ...
    def conditional_writes(self, near: str) -> bool: ...


def get_or_missing(read: Callable[[str], bytes], key: str) -> bytes | ObjectNotFound:
    """``read(key)``, with a missing object as a value rather than raised (``get_many``)."""
    try:
        return read(key)
    except ObjectNotFound as missing:
        return missing


def join_key(prefix: str, key: str) -> str:
    key = key.lstrip("/")
    if not prefix:
        return key
    return f"{prefix.rstrip('/')}/{key}"


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a safe key (``None`` when it is): an empty, ``.`` or ``..`` segment
    (``a//b``, ``a/``, ``/a``, ``a/../b``) names another place once joined to a local folder
    (``folder / "/abs"`` is ``/abs``), and S3 services differ on whether they keep them."""
    if not key:
        return "empty"
    if "\x00" in key:
        return "contains NUL"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "has an empty, '.' or '..' segment"
    return None


def check_key(key: str) -> str:
    """``key``, or ``StorageError`` for a key that could escape the root of a local store
    or that S3 would mangle (see :func:`key_problem`). Every store checks every key it
    reads or writes; a listing from a hostile bucket may still return such keys, and its
    callers skip them (:func:`malaria.io.localpath.confined`)."""
    problem = key_problem(key)
    if problem is not None:
        raise StorageError(f"invalid object key: {key!r} ({problem})")
    return key


def open_store(url: str, *, endpoint_url: str | None = None,
               pool_size: int = DEFAULT_POOL_SIZE) -> S3Store | LocalStore:
    """``s3://bucket[/prefix]`` or ``file:///abs/path`` (a plain path is taken as a folder)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"no bucket in {url!r}")
        from malaria.io.s3 import S3Store

        return S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url,
                       pool_size=pool_size)
    from malaria.io.local import LocalStore

    if parsed.scheme == "file":
        return LocalStore(Path(unquote(parsed.path)))
    if parsed.scheme == "":
        return LocalStore(Path(url))
    raise StorageError(f"unsupported storage URL scheme {parsed.scheme!r} in {url!r}")


def json_bytes(payload: Any) -> bytes:
    """A JSON document as the project writes it (``put_json``)."""
    return json.dumps(payload, indent=2, sort_keys=True, default=str).encode()


def put_json(store: Store, key: str, payload: Any) -> None:
    """Write a JSON document as one whole object."""
    store.put_bytes(key, json_bytes(payload), content_type="application/json")


def read_for_update(store: Store, key: str) -> tuple[bytes, str] | None:
    """The object's bytes and the ETag to replace it on (``put_if_match``), or None when
    there is none. HEAD first, then GET: an object replaced in between yields the older
    ETag, so the replace fails and is retried; the other order could pair new bytes with a
    newer ETag read later, and overwrite a change never seen."""
    for _ in range(3):
        info = store.head(key)
        if info is None:
            return None
        try:
            return store.get_bytes(key), info.etag
        except ObjectNotFound:  # deleted between the two: look again
            continue
    return None


def get_json(store: Store, key: str) -> Any:
    return json.loads(store.get_bytes(key))


def put_csv(store: Store, key: str, frame: pd.DataFrame) -> None:
    """Write a data frame as one whole CSV object (never a partially written file)."""
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    store.put_bytes(key, buffer.getvalue().encode(), content_type="text/csv")


def get_csv(store: Store, key: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.get_bytes(key)), keep_default_na=False)


_LAZY = {"S3Store": "malaria.io.s3", "s3_client": "malaria.io.s3_clients",
         "reset_clients": "malaria.io.s3", "LocalStore": "malaria.io.local"}


def __getattr__(name: str) -> Any:
    # The stores load on first use (PEP 562): importing the protocol costs no boto3.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
