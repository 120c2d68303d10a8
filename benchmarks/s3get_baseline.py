"""The hand-written S3 GET client the project shipped until issue 12, kept only as the
baseline of ``benchmarks/s3_clients.py``: SigV4 header signing and HTTP/1.1 pipelining on a
kept-alive socket per thread. Path-style only; no CA bundle, no proxies. Nothing in
``malaria/`` uses it (the store reads through obstore: ``malaria/io/s3.py``).

Anything but a 200 or a 404 is ``FastGetUnavailable`` (the benchmark treats it as a failed
GET). Credentials go only into the signature.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

from malaria.io.store import ObjectNotFound

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_SIGNED_HEADERS = "host;x-amz-content-sha256;x-amz-date"
_SIGNED_HEADERS_TOKEN = "host;x-amz-content-sha256;x-amz-date;x-amz-security-token"


class FastGetUnavailable(RuntimeError):
    """This request should go through the regular client (and its retries) instead."""


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


class SigV4Signer:
    """AWS Signature Version 4 for unsigned-body GETs, with the signing key cached per day,
    access key and region (deriving it is four HMACs; the per-request part is two hashes)."""

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._keys: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()

    def _signing_key(self, secret: str, access: str, day: str) -> bytes:
        cache_key = (access, day)
        with self._lock:
            key = self._keys.get(cache_key)
            if key is None:
                key = _hmac(("AWS4" + secret).encode(), day)
                for part in (self.region, self.service, "aws4_request"):
                    key = _hmac(key, part)
                self._keys = {cache_key: key}  # one day, one identity at a time
            return key

    def headers(self, host: str, path: str, access: str, secret: str, token: str | None,
                now: datetime | None = None, query: str = "") -> dict[str, str]:
        """Headers that authorise ``GET path?query`` on ``host`` (``path`` URI-encoded,
        ``query`` canonical: see ``canonical_query``)."""
        moment = now or datetime.now(UTC)
        stamp = moment.strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        canonical_headers = (f"host:{host}\nx-amz-content-sha256:{EMPTY_SHA256}\n"
                             f"x-amz-date:{stamp}\n")
        signed = _SIGNED_HEADERS
        if token:
            canonical_headers += f"x-amz-security-token:{token}\n"
            signed = _SIGNED_HEADERS_TOKEN
        canonical_request = f"GET\n{path}\n{query}\n{canonical_headers}\n{signed}\n{EMPTY_SHA256}"
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = ("AWS4-HMAC-SHA256\n" f"{stamp}\n{scope}\n"
                   + hashlib.sha256(canonical_request.encode()).hexdigest())
        signature = hmac.new(self._signing_key(secret, access, day), to_sign.encode(),
                             hashlib.sha256).hexdigest()
        headers = {
            "Host": host,
            "x-amz-content-sha256": EMPTY_SHA256,
            "x-amz-date": stamp,
            "Authorization": (f"AWS4-HMAC-SHA256 Credential={access}/{scope}, "
                              f"SignedHeaders={signed}, Signature={signature}"),
        }
        if token:
            headers["x-amz-security-token"] = token
        return headers


class PathStyleGetter:
    """``get(full_key) -> bytes`` against ``endpoint/bucket/key``, one connection per thread.

    Built from a boto3 S3 client configured for path-style addressing (what
    ``malaria.io.store.s3_client`` makes); ``credentials`` is anything with
    ``get_frozen_credentials()`` (botocore's credential objects).
    """

    def __init__(self, endpoint_url: str, bucket: str, region: str, credentials: Any,
                 *, timeout: float = 60.0) -> None:
        parts = urlsplit(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("endpoint must be an http(s) URL")
        self._https = parts.scheme == "https"
        self._netloc = parts.netloc  # the Host header: host[:port] as the client sends it
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._base = parts.path.rstrip("/") + "/" + quote(bucket, safe="") + "/"
        self._credentials = credentials
        self._signer = SigV4Signer(region)
        self._timeout = timeout
        self._local = threading.local()

    def _socket(self) -> socket.socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._https:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self._host)
            self._local.sock = sock
        return sock

    def _drop_socket(self) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            self._local.sock = None
            sock.close()

    def get(self, full_key: str) -> bytes:
        # S3 canonical URIs encode each byte but "/" and the unreserved set, exactly once.
        status, body = self._request(self._base + quote(full_key, safe="/-_.~"))
        if status == 200:
            return body
        if status == 404:
            raise ObjectNotFound(full_key)
        raise FastGetUnavailable(f"HTTP {status}")

    def get_many(self, full_keys: Sequence[str]) -> list[bytes | Exception]:
        """Each key's bytes, or the error for that key (``ObjectNotFound``, or
        ``FastGetUnavailable`` for the caller's fallback), in order, with the requests
        pipelined on this thread's connection: one write carries them all and the responses
        are read back to back, so the server handles the batch in one wake-up instead of one
        per object. A connection that breaks part-way gets the rest once more on a new one."""
        requests = [self._request_bytes(self._base + quote(key, safe="/-_.~"))
                    for key in full_keys]
        results: list[bytes | Exception] = []
        for attempt in range(2):
            pending = requests[len(results):]
            if not pending:
                break
            try:
                sock = self._socket()
                sock.sendall(b"".join(pending))
                reader = _ResponseReader(sock)
                for _ in pending:
                    status, body, keep = reader.read()
                    key = full_keys[len(results)]
                    if status == 200:
                        results.append(body)
                    elif status == 404:
                        results.append(ObjectNotFound(key))
                    else:
                        results.append(FastGetUnavailable(f"HTTP {status}"))
                    if not keep:  # the server stops here: the rest go on a new connection
                        self._drop_socket()
                        break
            except FastGetUnavailable:
                self._drop_socket()  # out of step: the rest go through the fallback
                break
            except OSError:
                self._drop_socket()
                if attempt:
                    break
        unavailable = FastGetUnavailable("pipelined request not answered")
        return results + [unavailable] * (len(full_keys) - len(results))

    def _request_bytes(self, path: str, query: str = "") -> bytes:
        frozen = self._credentials.get_frozen_credentials()
        headers = self._signer.headers(self._netloc, path, frozen.access_key,
                                       frozen.secret_key, frozen.token, query=query)
        target = f"{path}?{query}" if query else path
        return (f"GET {target} HTTP/1.1\r\n"
                + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
                + "\r\n").encode("latin-1")

    def _request(self, path: str, query: str = "") -> tuple[int, bytes]:
        request = self._request_bytes(path, query)
        for attempt in range(2):  # a kept-alive connection the server closed: once more
            try:
                status, body, keep = _exchange(self._socket(), request)
            except FastGetUnavailable:
                self._drop_socket()
                raise
            except OSError as error:
                self._drop_socket()
                if attempt:
                    raise FastGetUnavailable(type(error).__name__) from None
                continue
            if not keep:
                self._drop_socket()
            return status, body
        raise FastGetUnavailable("unreachable")  # pragma: no cover


_MAX_HEADER = 64 * 1024


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, bytes, bool]:
    """Send one request, read one response: ``(status, body, connection reusable)``."""
    sock.sendall(request)
    reader = _ResponseReader(sock)
    response = reader.read()
    if reader.buffered:  # more than the one response announced: the stream is out of step
        raise FastGetUnavailable("body longer than Content-Length")
    return response


class _ResponseReader:
    """HTTP/1.1 responses read one after the other from a socket; bytes that arrive beyond
    one response are kept for the next (pipelining).

    Only what a GET of an object needs: a status line, headers and a body of
    ``Content-Length`` bytes. A chunked or unframed response, or anything malformed, is
    ``FastGetUnavailable`` (the caller drops the connection and asks boto3 instead)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _fill(self, size: int = 65536) -> None:
        chunk = self._sock.recv(size)
        if not chunk:
            raise ConnectionResetError("closed before the response ended")
        self._buffer += chunk

    def read(self) -> tuple[int, bytes, bool]:
        """``(status, body, connection reusable)`` of the next response."""
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > _MAX_HEADER:
                raise FastGetUnavailable("response header too large")
            self._fill()
        lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        try:
            status = int(rest[:3])
        except ValueError:
            raise FastGetUnavailable("malformed status line") from None
        keep = version == "HTTP/1.1"
        length = -1
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value) if value.strip().isdigit() else -2
            elif name == "transfer-encoding":
                raise FastGetUnavailable("transfer-encoding")
            elif name == "connection" and value.strip().lower() == "close":
                keep = False
        if length < 0:
            raise FastGetUnavailable("no usable Content-Length")
        start = end + 4
        while len(self._buffer) < start + length:
            self._fill(max(65536, start + length - len(self._buffer)))
        body = bytes(self._buffer[start:start + length])
        del self._buffer[:start + length]
        return status, body, keep
