"""One interface over object storage: ``s3://bucket/prefix`` (any S3-compatible server) and
``file:///path`` (a local folder).

Keys are always relative to the store's root and use ``/``. Every write is a whole object:
S3 PUTs are atomic by nature; the local store writes a temporary file and renames it, so a
reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import boto3
import pandas as pd
from botocore.config import Config
from botocore.exceptions import ClientError

DEFAULT_POOL_SIZE = 32


class StorageError(RuntimeError):
    """A storage operation failed in a way the caller should report, not retry."""


class ObjectNotFound(StorageError, KeyError):
    """The key does not exist."""


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


def _get_or_missing(read: Callable[[str], bytes], key: str) -> bytes | ObjectNotFound:
    """``read(key)``, with a missing object as a value rather than raised (``get_many``)."""
    try:
        return read(key)
    except ObjectNotFound as missing:
        return missing


def _join(prefix: str, key: str) -> str:
    key = key.lstrip("/")
    if not prefix:
        return key
    return f"{prefix.rstrip('/')}/{key}"


def _check_key(key: str) -> str:
    # Refuse keys that could escape the root of a local store or that S3 would mangle.
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("..", ".") for p in parts) or "\x00" in key:
        raise StorageError(f"invalid object key: {key!r}")
    return key


# ---------------------------------------------------------------------------------------- S3

_client_lock = threading.Lock()
_clients: dict[tuple[str | None, str | None, int], Any] = {}


def s3_client(endpoint_url: str | None = None, *, pool_size: int = DEFAULT_POOL_SIZE) -> Any:
    """A boto3 S3 client shared by all threads of the process.

    boto3 clients are thread-safe (sessions are not), so one client with a connection pool as
    large as our thread pools is the cheapest way to run concurrent requests. Retries are
    adaptive (client-side rate limiting plus exponential back-off on throttling and 5xx).
    """
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL"
    )
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    cache_key = (endpoint_url, region, pool_size)
    with _client_lock:
        client = _clients.get(cache_key)
        if client is None:
            config = Config(
                retries={"max_attempts": 8, "mode": "adaptive"},
                max_pool_connections=pool_size,
                connect_timeout=10,
                read_timeout=60,
                # Path-style addressing works with every S3-compatible server on loopback.
                s3={"addressing_style": "path"},
                # New botocore computes CRC checksums on every PUT; not every server
                # (SeaweedFS, older MinIO) accepts them, and MD5/TLS already protect transfers.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
            _clients[cache_key] = client
        return client


def reset_clients() -> None:
    """Forget cached clients (tests switch endpoints and credentials)."""
    from malaria.io.s3get import reset_lean_clients

    with _client_lock:
        _clients.clear()
    reset_lean_clients()


def _is_missing(error: ClientError) -> bool:
    code = str(error.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


class S3Store:
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.pool_size = pool_size
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")

    @property
    def client(self) -> Any:
        return s3_client(self.endpoint_url, pool_size=self.pool_size)

    def _key(self, key: str) -> str:
        return _join(self.prefix, _check_key(key))

    def _rel(self, full_key: str) -> str:
        if self.prefix:
            return full_key[len(self.prefix) + 1:]
        return full_key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Stream the objects under ``prefix`` in key order, a page (1,000) at a time.

        Pages come through ``malaria.io.s3get``'s lean signed request (a fifth of botocore's
        client CPU per listed object: scoring lists every scan twice); on anything unusual
        the listing goes on through boto3, after the last key already yielded."""
        from malaria.io.s3get import FastGetUnavailable, path_style_client

        full_prefix = _join(self.prefix, prefix) if prefix else (
            f"{self.prefix}/" if self.prefix else "")
        last_key: str | None = None
        lean = path_style_client(self.client, self.bucket)
        if lean is not None:
            try:
                token: str | None = None
                while True:
                    objects, token = lean.list_page(full_prefix, token)
                    for item in objects:
                        last_key = item.key
                        if not item.key.endswith("/"):  # folder markers some tools create
                            yield replace(item, key=self._rel(item.key))
                    if token is None:
                        return
            except FastGetUnavailable:
                pass
        paginator = self.client.get_paginator("list_objects_v2")
        extra = {"StartAfter": last_key} if last_key else {}
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix, **extra):
            for item in page.get("Contents", []):
                key = item["Key"]
                if key.endswith("/"):  # folder markers some tools create
                    continue
                yield ObjectInfo(
                    key=self._rel(key),
                    size=int(item["Size"]),
                    etag=str(item.get("ETag", "")).strip('"'),
                    last_modified=item["LastModified"],
                )

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes. Through ``malaria.io.s3get``'s lean signed GET over a kept-alive
        socket per thread (a tenth of botocore's client CPU per object, which matters when
        scoring fetches on the cores that decode and infer); anything but a 200 or a 404
        (throttling, a 5xx, a dropped connection) is asked again through boto3 and its
        retries."""
        from malaria.io.s3get import FastGetUnavailable, path_style_client

        lean = path_style_client(self.client, self.bucket)
        if lean is not None:
            try:
                return lean.get(self._key(key))
            except ObjectNotFound:
                raise ObjectNotFound(key) from None
            except FastGetUnavailable:
                pass
        return self._boto3_get(key)

    def _boto3_get(self, key: str) -> bytes:
        """The regular client's GET, with its retries: the fallback of the lean paths."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if _is_missing(error):
                raise ObjectNotFound(key) from error
            raise
        body = response["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def get_many(self, keys: Sequence[str]) -> list[bytes | ObjectNotFound]:
        """Each key's bytes, or ``ObjectNotFound`` for a missing one, in order. Through the
        lean GET with the requests pipelined on one connection (the server then spends about
        0.6 of the CPU per object: see ``benchmarks/README.md``); a key the fast path cannot
        answer goes straight to boto3 (not to the lean path once more)."""
        from malaria.io.s3get import path_style_client

        lean = path_style_client(self.client, self.bucket)
        if lean is None:
            return [_get_or_missing(self._boto3_get, key) for key in keys]
        answers = lean.get_many([self._key(key) for key in keys])
        results: list[bytes | ObjectNotFound] = []
        for key, answer in zip(keys, answers, strict=True):
            if isinstance(answer, bytes):
                results.append(answer)
            elif isinstance(answer, ObjectNotFound):
                results.append(ObjectNotFound(key))
            else:  # FastGetUnavailable: throttled, refused, out of step
                results.append(_get_or_missing(self._boto3_get, key))
        return results

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None,
                  metadata: dict[str, str] | None = None) -> None:
        extra: dict[str, Any] = {}
        if content_type:
            extra["ContentType"] = content_type
        if metadata:
            extra["Metadata"] = metadata
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)

    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        # upload_file switches to multipart for large files; the object appears only when the
        # upload completes, so readers still never see a partial object.
        extra = {"ContentType": content_type} if content_type else None
        self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs=extra)

    def download_file(self, key: str, path: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._key(key), str(path))
        except ClientError as error:
            if _is_missing(error):
                raise ObjectNotFound(key) from error
            raise

    def copy(self, src_key: str, dst_key: str) -> None:
        """Server-side copy: the bytes never travel through this process."""
        try:
            self.client.copy_object(
                Bucket=self.bucket,
                Key=self._key(dst_key),
                CopySource={"Bucket": self.bucket, "Key": self._key(src_key)},
            )
        except ClientError as error:
            if _is_missing(error):
                raise ObjectNotFound(src_key) from error
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def head(self, key: str) -> ObjectInfo | None:
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if _is_missing(error):
                return None
            raise
        return ObjectInfo(
            key=key,
            size=int(response["ContentLength"]),
            etag=str(response.get("ETag", "")).strip('"'),
            last_modified=response["LastModified"],
        )

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)


# ------------------------------------------------------------------------------- local folder


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

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
        start = self.root / base if base else self.root
        if not start.is_dir():
            return

        def walk(folder: Path, rel: str) -> Iterator[ObjectInfo]:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
            # Keys sort as strings, so a file "a" and a folder "a/..." interleave by full key.
            keyed = sorted(
                ((f"{rel}{e.name}/" if e.is_dir() else f"{rel}{e.name}"), e) for e in entries
            )
            for key, entry in keyed:
                if entry.name.startswith(".tmp-"):
                    continue  # in-flight atomic writes
                if entry.is_dir():
                    if key.startswith(prefix) or prefix.startswith(key):
                        yield from walk(Path(entry.path), key)
                elif key.startswith(prefix):
                    yield self._info(Path(entry.path))

        yield from walk(start, f"{base}/" if base else "")

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as error:
            raise ObjectNotFound(key) from error

    def get_many(self, keys: Sequence[str]) -> list[bytes | ObjectNotFound]:
        return [_get_or_missing(self.get_bytes, key) for key in keys]

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None,
                  metadata: dict[str, str] | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        self.put_bytes(key, path.read_bytes())

    def download_file(self, key: str, path: Path) -> None:
        path.write_bytes(self.get_bytes(key))

    def copy(self, src_key: str, dst_key: str) -> None:
        self.put_bytes(dst_key, self.get_bytes(src_key))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        return self._info(path) if path.is_file() else None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


# ------------------------------------------------------------------------------------ helpers


def open_store(url: str, *, endpoint_url: str | None = None,
               pool_size: int = DEFAULT_POOL_SIZE) -> S3Store | LocalStore:
    """``s3://bucket[/prefix]`` or ``file:///abs/path`` (a plain path is taken as a folder)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"no bucket in {url!r}")
        return S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url,
                       pool_size=pool_size)
    if parsed.scheme == "file":
        return LocalStore(Path(unquote(parsed.path)))
    if parsed.scheme == "":
        return LocalStore(Path(url))
    raise StorageError(f"unsupported storage URL scheme {parsed.scheme!r} in {url!r}")


def put_json(store: Store, key: str, payload: Any) -> None:
    """Write a JSON document as one whole object."""
    data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
    store.put_bytes(key, data, content_type="application/json")


def get_json(store: Store, key: str) -> Any:
    return json.loads(store.get_bytes(key))


def put_csv(store: Store, key: str, frame: pd.DataFrame) -> None:
    """Write a data frame as one whole CSV object (never a partially written file)."""
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    store.put_bytes(key, buffer.getvalue().encode(), content_type="text/csv")


def get_csv(store: Store, key: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.get_bytes(key)), keep_default_na=False)
