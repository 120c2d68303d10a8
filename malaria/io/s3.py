"""S3 (and any S3-compatible server): the one client factory, and ``S3Store``.

Reads (``get_bytes``, ``get_many``) go through ``obstore`` (Rust ``object_store``): its
requests run without the GIL, with retries on 5xx and dropped connections, on a connection
pool of its own; ``get_many`` sends a batch as concurrent requests from one event loop.
Listing, writes, copies and deletes go through boto3: its paginator lists any key S3 can
hold (``object_store`` refuses keys with empty segments, folds folder markers into objects
and lists by folder, not by name prefix), and writes are not on a hot path.
``benchmarks/s3_clients.py`` measured the choice (``benchmarks/README.md``).

Both clients are configured from one place (``connection``): the endpoint
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``), the region, path-style addressing for a
custom endpoint and virtual-hosted for AWS (``MALARIA_S3_ADDRESSING_STYLE`` overrides), the
CA bundle (``AWS_CA_BUNDLE``), proxies (``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``)
and credentials from boto3's chain (environment, profiles, SSO, roles), which obstore asks
again before they expire. A caller may name credentials for the whole process instead
(``use_credentials``: the task layer reads them from a Prefect credentials block); they win
over the environment, and an explicit argument wins over them. Credentials never reach a log
or an error message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import obstore
from botocore.config import Config
from botocore.credentials import RefreshableCredentials
from botocore.exceptions import ClientError
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import InvalidPathError

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

log = logging.getLogger(__name__)

# Attempts per request, both clients: 5xx, throttling and dropped connections are retried
# with exponential back-off.
MAX_ATTEMPTS = 8
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
# obstore's bound on one read, retries included: a black-holed endpoint fails within it.
# boto3 has no such total: its bound is MAX_ATTEMPTS x the timeouts plus back-off.
RETRY_TIMEOUT_S = 120
# The same limits from the environment, for a deployment on a slow link and for tests that
# must see a dead endpoint fail in seconds; unset, the constants above apply.
ENV_MAX_ATTEMPTS = "MALARIA_S3_MAX_ATTEMPTS"
ENV_CONNECT_TIMEOUT = "MALARIA_S3_CONNECT_TIMEOUT_S"
ENV_READ_TIMEOUT = "MALARIA_S3_READ_TIMEOUT_S"
ENV_RETRY_TIMEOUT = "MALARIA_S3_RETRY_TIMEOUT_S"
# Refreshable (role, SSO) credentials are handed to obstore for this long, then asked again.
CREDENTIAL_REFRESH = timedelta(minutes=5)
LIST_PAGE_SIZE = 1000


@dataclass(frozen=True)
class Connection:
    """Where and how to reach S3, resolved once from the arguments and the environment."""

    endpoint_url: str | None
    region: str
    addressing_style: str  # "path" or "virtual"

    @property
    def https(self) -> bool:
        return self.endpoint_url is None or self.endpoint_url.startswith("https://")


@dataclass(frozen=True)
class ExplicitCredentials:
    """Credentials (and optionally region and endpoint) named by the caller rather than found
    by boto3's chain. The secrets stay out of ``repr``: this object may end up in a log."""

    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None
    endpoint_url: str | None = None


_explicit: ExplicitCredentials | None = None


def use_credentials(credentials: ExplicitCredentials | None) -> None:
    """Every client this process opens from now on uses ``credentials`` (``None``: boto3's
    chain again). Cached clients are dropped so none keeps the previous identity."""
    global _explicit
    with _client_lock:
        _explicit = credentials
    reset_clients()


def explicit_credentials() -> ExplicitCredentials | None:
    return _explicit


def _session() -> boto3.session.Session:
    """A boto3 session with the named credentials, or boto3's chain when there are none."""
    named = _explicit
    if named is None or not named.access_key:
        return boto3.session.Session()
    return boto3.session.Session(aws_access_key_id=named.access_key,
                                 aws_secret_access_key=named.secret_key,
                                 aws_session_token=named.session_token)


def connection(endpoint_url: str | None = None, region: str | None = None) -> Connection:
    named = _explicit or ExplicitCredentials()
    endpoint = (endpoint_url or named.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or None)
    region = (region or named.region or os.environ.get("AWS_DEFAULT_REGION")
              or os.environ.get("AWS_REGION") or "us-east-1")
    # Path-style works with every S3-compatible server on loopback; AWS wants virtual-hosted.
    style = os.environ.get("MALARIA_S3_ADDRESSING_STYLE") or ("path" if endpoint else "virtual")
    if style not in ("path", "virtual"):
        raise StorageError(f"MALARIA_S3_ADDRESSING_STYLE must be 'path' or 'virtual', not {style!r}")
    return Connection(endpoint, region, style)


@dataclass(frozen=True)
class Limits:
    """How long a request may take and how often it is tried, both clients."""

    max_attempts: int
    connect_timeout: float
    read_timeout: float
    retry_timeout: float


def limits() -> Limits:
    def number(name: str, default: float) -> float:
        raw = os.environ.get(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise StorageError(f"{name} must be a number, not {raw!r}") from None
        if value <= 0:
            raise StorageError(f"{name} must be positive, not {raw!r}")
        return value

    return Limits(max(1, int(number(ENV_MAX_ATTEMPTS, MAX_ATTEMPTS))),
                  number(ENV_CONNECT_TIMEOUT, CONNECT_TIMEOUT_S),
                  number(ENV_READ_TIMEOUT, READ_TIMEOUT_S),
                  number(ENV_RETRY_TIMEOUT, RETRY_TIMEOUT_S))


# -------------------------------------------------------------------------------- boto3

_client_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}


def s3_client(endpoint_url: str | None = None, *, pool_size: int = DEFAULT_POOL_SIZE,
              region: str | None = None, access_key: str | None = None,
              secret_key: str | None = None, max_attempts: int | None = None,
              connect_timeout: float | None = None,
              read_timeout: float | None = None) -> Any:
    """The project's boto3 S3 client, shared by all threads of the process (one per set of
    arguments).

    boto3 clients are thread-safe (sessions are not), so one client with a connection pool
    as large as our thread pools is the cheapest way to run concurrent requests. Retries are
    adaptive (client-side rate limiting plus exponential back-off on throttling and 5xx).
    ``access_key``/``secret_key`` override boto3's credential chain (the local stack's
    generated identity); ``max_attempts`` and the timeouts let a health probe fail fast
    (unset: ``limits()``, so every request has a connect and read timeout and a bounded
    number of tries, and a black-holed endpoint is an error, not a hang).
    """
    conn = connection(endpoint_url, region)
    bounds = limits()
    max_attempts = bounds.max_attempts if max_attempts is None else max_attempts
    connect_timeout = bounds.connect_timeout if connect_timeout is None else connect_timeout
    read_timeout = bounds.read_timeout if read_timeout is None else read_timeout
    # The named identity is part of the key: a client never outlives a change of it.
    cache_key = (os.getpid(), conn, pool_size, access_key, secret_key, max_attempts,
                 connect_timeout, read_timeout, _explicit)
    with _client_lock:
        client = _clients.get(cache_key)
        if client is None:
            config = Config(
                retries={"max_attempts": max_attempts, "mode": "adaptive"},
                max_pool_connections=pool_size,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                s3={"addressing_style": conn.addressing_style},
                # New botocore computes CRC checksums on every PUT; not every server
                # (SeaweedFS, older MinIO) accepts them, and MD5/TLS already protect transfers.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            # Explicit arguments first (the stack's identity), then the named credentials.
            session = boto3.session.Session() if access_key else _session()
            client = session.client(
                "s3", endpoint_url=conn.endpoint_url, region_name=conn.region, config=config,
                aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            )
            _clients[cache_key] = client
        return client


# ------------------------------------------------------------------------------ obstore

_object_stores: dict[tuple[Any, ...], Any] = {}


class _Boto3Credentials:
    """obstore's credential provider: boto3's chain, frozen per call; refreshable ones are
    handed out for ``CREDENTIAL_REFRESH`` and then asked for again."""

    def __init__(self) -> None:
        credentials = _session().get_credentials()
        if credentials is None:
            raise StorageError("no S3 credentials: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY, or an AWS profile or role")
        self._credentials = credentials

    def __call__(self) -> dict[str, Any]:
        frozen = self._credentials.get_frozen_credentials()
        refreshable = isinstance(self._credentials, RefreshableCredentials)
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token,
                "expires_at": datetime.now(UTC) + CREDENTIAL_REFRESH if refreshable else None}


def _proxy_options(conn: Connection) -> dict[str, str]:
    names = ("HTTPS_PROXY", "https_proxy") if conn.https else ("HTTP_PROXY", "http_proxy")
    proxy = next((os.environ[n] for n in names if os.environ.get(n)), None)
    if not proxy:
        return {}
    options = {"proxy_url": proxy}
    excludes = os.environ.get("NO_PROXY") or os.environ.get("no_proxy")
    if excludes:
        options["proxy_excludes"] = excludes
    return options


def _ca_bundle() -> str | None:
    path = os.environ.get("AWS_CA_BUNDLE")
    if not path:
        return None
    try:
        return Path(path).read_text()
    except OSError as error:
        raise StorageError(f"AWS_CA_BUNDLE {path!r} cannot be read: {error.strerror}") from None


def object_store(bucket: str, endpoint_url: str | None = None) -> Any:
    """The obstore ``S3Store`` for ``bucket``, configured like ``s3_client`` (one per
    endpoint, bucket and process: it holds its own connection pool)."""
    conn = connection(endpoint_url)
    # Read per call, not at import: tests lower MAX_ATTEMPTS for a failure they can wait for.
    bounds = limits()
    cache_key = (os.getpid(), conn, bucket, bounds, _explicit)
    with _client_lock:
        store = _object_stores.get(cache_key)
    if store is not None:
        return store
    from obstore.store import S3Store as ObstoreS3

    # object_store's durations are humantime strings: whole milliseconds parse everywhere.
    options: dict[str, Any] = {"connect_timeout": f"{round(bounds.connect_timeout * 1000)}ms",
                               "timeout": f"{round(bounds.read_timeout * 1000)}ms",
                               **_proxy_options(conn)}
    config: dict[str, Any] = {"region": conn.region,
                              "virtual_hosted_style_request": conn.addressing_style == "virtual"}
    if conn.https:
        bundle = _ca_bundle()
        if bundle:
            options["root_certificate"] = bundle
    else:
        options["allow_http"] = True
    if conn.endpoint_url:
        endpoint = conn.endpoint_url.rstrip("/")
        if conn.addressing_style == "virtual":  # object_store wants the bucket in the host
            parts = urlsplit(endpoint)
            endpoint = f"{parts.scheme}://{bucket}.{parts.netloc}{parts.path}"
        # Both keys: object_store prefers AWS_ENDPOINT_URL_S3 from the environment otherwise.
        config["endpoint"] = config["aws_endpoint_url_s3"] = endpoint
    store = ObstoreS3(bucket, config=config, client_options=options,
                      retry_config={"max_retries": bounds.max_attempts - 1,
                                    "retry_timeout": timedelta(seconds=bounds.retry_timeout)},
                      credential_provider=_Boto3Credentials())
    with _client_lock:
        return _object_stores.setdefault(cache_key, store)


class _EventLoop:
    """One event loop thread per process, on which ``get_many`` gathers its GETs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():  # a forked child: a new one
                self._loop = asyncio.new_event_loop()
                self._pid = os.getpid()
                threading.Thread(target=self._loop.run_forever, name="s3-get-loop",
                                 daemon=True).start()
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()


_LOOP = _EventLoop()


def reset_clients() -> None:
    """Forget cached clients (tests switch endpoints and credentials)."""
    with _client_lock:
        _clients.clear()
        _object_stores.clear()
        _conditional_support.clear()


def _is_missing(error: ClientError) -> bool:
    code = str(error.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


# Whether an endpoint honours If-None-Match / If-Match on PUT, probed once per endpoint.
_conditional_support: dict[Connection, bool] = {}


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

        answers = _LOOP.run(fetch_all())
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
        with _client_lock:
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
        with _client_lock:
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
