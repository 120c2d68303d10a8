"""The S3 clients: where and how to reach S3 (``connection``, ``limits``), whose
credentials (``use_credentials``), and the cached client factories for boto3 (``s3_client``)
and obstore (``object_store``). ``malaria.io.s3.S3Store`` reads and writes through them.

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
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.credentials import RefreshableCredentials

from malaria.io.store import DEFAULT_POOL_SIZE, StorageError

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
    with client_lock:
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

client_lock = threading.Lock()
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
    with client_lock:
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
    with client_lock:
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
    with client_lock:
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


LOOP = _EventLoop()


def reset_clients() -> None:
    """Forget cached clients (tests switch endpoints and credentials)."""
    with client_lock:
        _clients.clear()
        _object_stores.clear()
