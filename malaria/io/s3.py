"""``S3Store``: the store over S3 (and any S3-compatible server).

Reads (``get_bytes``, ``get_many``) go through ``obstore`` (Rust ``object_store``): its
requests run without the GIL, with retries on 5xx and dropped connections, on a connection
pool of its own; ``get_many`` sends a batch as concurrent requests from one event loop.
Listing, writes, copies and deletes go through boto3: its paginator lists any key S3 can
hold (``object_store`` refuses keys with empty segments, folds folder markers into objects
and lists by folder, not by name prefix), and writes are not on a hot path.
``benchmarks/s3_clients.py`` measured the choice (``benchmarks/README.md``). Both clients
come from :mod:`malaria.io.s3_clients`, configured in one place.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import obstore
from botocore.exceptions import ClientError
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import InvalidPathError

from malaria.io import s3_clients
from malaria.io.s3_clients import (
    LOOP,
    Connection,
    ExplicitCredentials,
    connection,
    explicit_credentials,
    object_store,
    s3_client,
    use_credentials,
)
from malaria.io.store import (
    DEFAULT_POOL_SIZE,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    WriteConflict,
    check_key,
    get_or_missing,
    join_key,
)

__all__ = ["ExplicitCredentials", "S3Store", "connection", "explicit_credentials",
           "object_store", "reset_clients", "s3_client", "use_credentials"]

log = logging.getLogger(__name__)
LIST_PAGE_SIZE = 1000
# Whether an endpoint honours If-None-Match / If-Match on PUT, probed once per endpoint.
_conditional_support: dict[Connection, bool] = {}


def reset_clients() -> None:
    """Forget cached clients and what was probed of each endpoint (tests switch endpoints
    and credentials)."""
    s3_clients.reset_clients()
    with s3_clients.client_lock:
        _conditional_support.clear()


def _is_missing(error: ClientError) -> bool:
    code = str(error.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def _failed_condition(error: ClientError) -> bool:
    """A conditional PUT refused because of its condition: 412, or AWS's 409 for two
    conditional writes at once; an If-Match on a missing object is a 404."""
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")
            or _is_missing(error))


class _Unparsable(Exception):
    """A key object_store's paths cannot hold (a control character, an empty segment)."""


def _read_failed(key: str, error: Exception) -> StorageError:
    # obstore's message holds the URL and the server's answer, never the credentials.
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return StorageError(f"cannot read {key!r}: {first_line}")


# ------------------------------------------------------------------------------ S3Store


class S3Store:
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.pool_size = pool_size
        self.list_page_size = LIST_PAGE_SIZE  # boto3's listing only
        self.fast_listing = True  # folder prefixes through obstore (see ``list``)
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")

    @property
    def client(self) -> Any:
        return s3_client(self.endpoint_url, pool_size=self.pool_size)

    @property
    def reader(self) -> Any:
        """The obstore store that GETs go through."""
        return object_store(self.bucket, self.endpoint_url)

    def _key(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def _rel(self, full_key: str) -> str:
        if self.prefix:
            return full_key[len(self.prefix) + 1:]
        return full_key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Stream the objects under ``prefix`` (a name prefix, which may end inside a
        name) in key order, a page at a time; folder markers some tools create are not
        objects.

        A folder prefix (empty, or ending in ``/``) is listed by obstore, ~7x less client
        CPU per object than botocore's parser (benchmarks/README.md); a prefix inside a name
        (object_store lists by path segment) goes through boto3's paginator, and so does
        the rest of a listing object_store cannot finish (a key it cannot name, such as one
        with an empty segment)."""
        full_prefix = join_key(self.prefix, prefix) if prefix else (
            f"{self.prefix}/" if self.prefix else "")
        after = ""
        if self.fast_listing and (not full_prefix or full_prefix.endswith("/")):
            try:
                for info in self._list_obstore(full_prefix):
                    after = info.key
                    yield info
                return
            except (ObstoreError, ValueError, OSError) as error:  # boto3 says if it is real
                log.info("listing %s goes on through boto3 after %r: %s", full_prefix, after,
                         str(error).splitlines()[0] if str(error) else type(error).__name__)
        yield from self._list_boto3(full_prefix, self._key(after) if after else "")

    def _list_obstore(self, full_prefix: str) -> Iterator[ObjectInfo]:
        """object_store folds a folder marker (``a/``) into an empty object ``a``: an empty
        object whose name, plus ``/``, starts a later key is held back and dropped. Keys
        between the two (``a-b`` sorts before ``a/``) are held with it to keep key order.
        (An empty object ``a`` beside a folder ``a/`` is taken for its marker: it would be
        refused as empty anyway.)"""
        held: list[ObjectInfo] = []  # an empty object and what follows it, until decided
        for chunk in obstore.list(self.reader, full_prefix or None, chunk_size=1000):
            for meta in chunk:
                info = ObjectInfo(key=self._rel(meta["path"]), size=int(meta["size"]),
                                  etag=str(meta.get("e_tag") or "").strip('"'),
                                  last_modified=meta["last_modified"])
                while held:
                    marker = held[0].key + "/"
                    if info.key.startswith(marker):  # it was a folder: drop the marker
                        held.pop(0)
                    elif info.key > marker:  # past where its children would be: an object
                        yield held.pop(0)
                    else:  # ``info`` sorts between the empty object and its children
                        break
                    while held and held[0].size != 0:  # decided: nothing empty before them
                        yield held.pop(0)
                if held or info.size == 0:
                    held.append(info)
                else:
                    yield info
        yield from held

    def _list_boto3(self, full_prefix: str, start_after: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        extra = {"StartAfter": start_after} if start_after else {}
        pages = paginator.paginate(Bucket=self.bucket, Prefix=full_prefix,
                                   PaginationConfig={"PageSize": self.list_page_size}, **extra)
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"]
                if key.endswith("/"):
                    continue
                yield ObjectInfo(
                    key=self._rel(key),
                    size=int(item["Size"]),
                    etag=str(item.get("ETag", "")).strip('"'),
                    last_modified=item["LastModified"],
                )

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes (``ObjectNotFound`` when there is none)."""
        full_key = self._key(key)
        try:
            return bytes(obstore.get(self.reader, full_key).bytes())
        except FileNotFoundError:  # obstore's NotFoundError
            raise ObjectNotFound(key) from None
        except (ValueError, InvalidPathError):  # a key S3 holds but object_store cannot name
            return self._boto3_get(key)
        except Exception as error:
            raise _read_failed(key, error) from None

    def _boto3_get(self, key: str) -> bytes:
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
        """Each key's bytes, or ``ObjectNotFound`` for a missing one, in order: the GETs
        run concurrently (at most ``pool_size`` at once), so a batch costs about one round
        trip on a distant server. Any other failure, after obstore's retries, raises."""
        if not keys:
            return []
        full_keys = [self._key(key) for key in keys]
        reader = self.reader
        limit = self.pool_size

        async def fetch_all() -> list[bytes | ObjectNotFound | Exception]:
            gate = asyncio.Semaphore(limit)

            async def fetch(key: str, full_key: str) -> bytes | ObjectNotFound | Exception:
                async with gate:
                    try:
                        result = await obstore.get_async(reader, full_key)
                        return bytes(await result.bytes_async())
                    except FileNotFoundError:
                        return ObjectNotFound(key)
                    except (ValueError, InvalidPathError):
                        return _Unparsable(key)
                    except Exception as error:
                        return _read_failed(key, error)

            return await asyncio.gather(*(fetch(k, f) for k, f in
                                          zip(keys, full_keys, strict=True)))

        answers = LOOP.run(fetch_all())
        results: list[bytes | ObjectNotFound] = []
        for key, answer in zip(keys, answers, strict=True):
            if isinstance(answer, _Unparsable):
                results.append(get_or_missing(self._boto3_get, key))
            elif isinstance(answer, Exception) and not isinstance(answer, ObjectNotFound):
                raise answer
            else:
                results.append(answer)
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

    # -- conditional writes (see malaria.io.store.Store)

    def conditional_writes(self, near: str) -> bool:
        """Whether the server honours ``If-None-Match: *`` and ``If-Match`` on PUT (AWS
        since 2024, SeaweedFS, moto do; older MinIO and others ignore them). Probed once per
        endpoint with a throwaway object beside ``near``: written, then overwritten under
        each condition, which must be refused."""
        conn = connection(self.endpoint_url)
        with s3_clients.client_lock:
            known = _conditional_support.get(conn)
        if known is not None:
            return known
        probe = self._key(f"{near}.probe-{uuid.uuid4().hex}")
        client = self.client
        client.put_object(Bucket=self.bucket, Key=probe, Body=b"probe")
        honoured = True
        try:
            for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"' + "0" * 32 + '"'}):
                try:
                    client.put_object(Bucket=self.bucket, Key=probe, Body=b"x", **condition)
                    honoured = False  # written despite the condition: ignored
                except ClientError as error:
                    if not _failed_condition(error):
                        honoured = False  # e.g. 501 NotImplemented
                if not honoured:
                    break
        finally:
            client.delete_object(Bucket=self.bucket, Key=probe)
        if not honoured:
            log.warning("%s ignores conditional writes: leases and champion.json fall back "
                        "to check-then-write", conn.endpoint_url or "S3")
        with s3_clients.client_lock:
            return _conditional_support.setdefault(conn, honoured)

    def put_if_absent(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        """Create ``key`` only if there is no such object (``If-None-Match: *``)."""
        if self.conditional_writes(key):
            self._put_conditional(key, data, content_type, {"IfNoneMatch": "*"})
        else:  # check-then-write: a rival's write can land in between (callers settle)
            if self.head(key) is not None:
                raise WriteConflict(f"{key!r} already exists")
            self.put_bytes(key, data, content_type=content_type)

    def put_if_match(self, key: str, data: bytes, etag: str, *,
                     content_type: str | None = None) -> None:
        """Replace ``key`` only if it is still the object whose ETag is ``etag``."""
        if self.conditional_writes(key):
            quoted = etag if etag.startswith('"') else f'"{etag}"'
            self._put_conditional(key, data, content_type, {"IfMatch": quoted})
        else:
            current = self.head(key)
            if current is None or current.etag != etag.strip('"'):
                raise WriteConflict(f"{key!r} changed since it was read")
            self.put_bytes(key, data, content_type=content_type)

    def _put_conditional(self, key: str, data: bytes, content_type: str | None,
                         condition: dict[str, str]) -> None:
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                   **condition, **extra)
        except ClientError as error:
            if not _failed_condition(error):
                raise
            # boto3 retries a PUT whose answer was lost (a reset, a 5xx after the write):
            # the retry then fails its own condition. Holding exactly our bytes means the
            # write that landed was ours (lease tokens and history entries are unique).
            try:
                if self.get_bytes(key) == data:
                    return
            except ObjectNotFound:
                pass
            raise WriteConflict(f"{key!r} was written by another writer "
                                f"({error.response.get('Error', {}).get('Code')})") from None
