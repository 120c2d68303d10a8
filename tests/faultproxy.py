"""A fault-injecting HTTP/1.1 proxy on loopback, for tests: put it in front of an S3 server
and point the clients at it (``AWS_ENDPOINT_URL``); at a set rate it answers a request with
one of these faults instead of (or on top of) the server's answer:

``500``        ``500 InternalError`` (S3 XML body); the request never reaches the server.
``503``        ``503 SlowDown`` (S3 XML body); the request never reaches the server.
``reset``      the request IS forwarded (a write lands), then the answer is cut off half
               way and the connection reset (RST): the client cannot know it succeeded.
``stall``      the request waits ``stall_s`` (shorter than the clients' read timeout),
               then goes through: a slow server.
``blackhole``  the request is held and never forwarded or answered, until the client
               gives up (longer than any client timeout): a dead endpoint.

Pipelining is refused always: a client that sends a second request before the first is
answered gets the first answer with ``Connection: close``, and the connection is closed
(counted in ``injected["pipelining"]``). Each request goes to the server on a connection of
its own, so a fault never leaves the server half way through a response.

``choose`` (a function of the request head returning a kind, or None for the random draw)
picks the fault of chosen requests whatever the rate, e.g. a stall for one client's lease
PUT. The random draw is seeded: the same seed and request order give the same faults.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress
from urllib.parse import urlsplit

import pytest

from malaria.io.s3 import reset_clients

KINDS = ("500", "503", "reset", "stall", "blackhole")


def _s3_error(status: int, reason: str, code: str) -> bytes:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>injected by the fault proxy</Message></Error>").encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


_ANSWERS = {"500": _s3_error(500, "Internal Server Error", "InternalError"),
            "503": _s3_error(503, "Service Unavailable", "SlowDown")}


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip() or 0)
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            raise ValueError("chunked request bodies are not supported by the fault proxy")
    return 0


def _header(head: bytes, wanted: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == wanted:
            return value.strip()
    return None


def _framed(response_head: bytes) -> bool:
    return (_header(response_head, b"content-length") is not None
            or b"chunked" in (_header(response_head, b"transfer-encoding") or b"").lower())


class FaultProxy:
    """Forwards 127.0.0.1:<port> to ``target``; a share ``rate`` of requests get a fault
    drawn from ``kinds`` (seeded). ``injected`` counts the faults by kind, ``requests`` all
    requests seen."""

    def __init__(self, target_host: str, target_port: int, *, rate: float = 0.0,
                 kinds: Sequence[str] = ("500", "503", "reset", "stall"), seed: int = 0,
                 stall_s: float = 0.5,
                 choose: Callable[[bytes], str | None] | None = None) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        self.target = (target_host, target_port)
        self.rate = rate
        self.kinds = tuple(kinds)
        self.stall_s = stall_s
        self.choose = choose
        self.requests = 0
        self.injected: Counter[str] = Counter()
        self.port = 0
        self._random = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)

    # -- life cycle

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_rate(self, rate: float, kinds: Sequence[str] | None = None) -> None:
        self.rate = rate
        if kinds is not None:
            self.kinds = tuple(kinds)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    # -- one client connection

    def _draw(self, head: bytes) -> str | None:
        if self.choose is not None and (chosen := self.choose(head)) is not None:
            return chosen
        # Drawn in the loop thread, in arrival order: reproducible for a given seed.
        if self.rate > 0 and self._random.random() < self.rate:
            return self._random.choice(self.kinds)
        return None

    async def _handle(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError, OSError, asyncio.IncompleteReadError,
                      asyncio.LimitOverrunError, asyncio.CancelledError, ValueError):
            while True:
                head = await client_r.readuntil(b"\r\n\r\n")
                if (_header(head, b"expect") or b"").lower() == b"100-continue":
                    client_w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await client_w.drain()
                length = _content_length(head[:-4])
                body = await client_r.readexactly(length) if length > 0 else b""
                self.requests += 1
                fault = self._draw(head)
                if fault is not None:
                    self.injected[fault] += 1
                if fault in _ANSWERS:
                    client_w.write(_ANSWERS[fault])
                    await client_w.drain()
                    break
                if fault == "blackhole":
                    await client_r.read()  # until the client gives up and closes
                    break
                if fault == "stall":
                    await asyncio.sleep(self.stall_s)
                response = await self._forward(head, body)
                if fault == "reset":
                    client_w.write(response[: max(1, len(response) // 2)])
                    await client_w.drain()
                    self._reset(client_w)
                    return
                # Bytes already waiting are a pipelined request: answered by closing.
                pipelined = bool(getattr(client_r, "_buffer", b""))
                if pipelined:
                    self.injected["pipelining"] += 1
                # An answer that ends only with its stream cannot be kept alive.
                close = pipelined or not _framed(response.partition(b"\r\n\r\n")[0])
                client_w.write(self._with_connection(response, close=close))
                await client_w.drain()
                if close:
                    break
        with suppress(OSError):
            client_w.close()

    @staticmethod
    def _reset(client_w: asyncio.StreamWriter) -> None:
        sock = client_w.get_extra_info("socket")
        if sock is not None:  # linger 0: close sends RST, not FIN
            with suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client_w.transport.abort()

    async def _forward(self, head: bytes, body: bytes) -> bytes:
        """The server's whole answer, asked on a fresh connection with ``Connection:
        close`` (so the end of its stream is the end of the answer)."""
        lines = [line for line in head[:-4].split(b"\r\n")
                 if not line.lower().startswith((b"connection:", b"expect:"))]
        request = b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body
        server_r, server_w = await asyncio.open_connection(*self.target)
        try:
            server_w.write(request)
            await server_w.drain()
            return await server_r.read(-1)
        finally:
            server_w.close()

    @staticmethod
    def _with_connection(response: bytes, *, close: bool) -> bytes:
        head, _, body = response.partition(b"\r\n\r\n")
        kept = [line for line in head.split(b"\r\n")
                if not line.lower().startswith(b"connection:")]
        kept.append(b"Connection: close" if close else b"Connection: keep-alive")
        return b"\r\n".join(kept) + b"\r\n\r\n" + body


# ------------------------------------------------- wiring it to the project's S3 clients


def proxy(endpoint: str, rate: float, kinds: tuple[str, ...], seed: int = 13,
          choose: Callable[[bytes], str | None] | None = None) -> FaultProxy:
    """A proxy in front of the S3 server at ``endpoint`` (stalls of 0.4 s)."""
    target = urlsplit(endpoint)
    return FaultProxy(str(target.hostname), int(target.port or 80), rate=rate, kinds=kinds,
                      seed=seed, stall_s=0.4, choose=choose)


class Through:
    """Every client opened from now on (flows open theirs from URLs) goes through
    ``faults`` with ``limits`` (client timeouts and retries, as environment variables); on
    leaving, back to the server itself."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, faults: FaultProxy,
                 limits: dict[str, str]) -> None:
        self.monkeypatch, self.faults, self.limits = monkeypatch, faults, limits

    def __enter__(self) -> FaultProxy:
        self.saved = {n: os.environ.get(n) for n in ("AWS_ENDPOINT_URL", *self.limits)}
        self.faults.__enter__()
        self.monkeypatch.setenv("AWS_ENDPOINT_URL", self.faults.url)
        for name, value in self.limits.items():
            self.monkeypatch.setenv(name, value)
        reset_clients()
        return self.faults

    def __exit__(self, *exc: object) -> None:
        for name, value in self.saved.items():
            if value is None:
                self.monkeypatch.delenv(name, raising=False)
            else:
                self.monkeypatch.setenv(name, value)
        reset_clients()
        self.faults.__exit__(None, None, None)
