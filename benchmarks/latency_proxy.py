"""A loopback HTTP/1.1 proxy that adds a fixed delay to every request, to show what
concurrency buys against a remote object store (a LAN or cloud S3 is 1-50 ms away), and
that can misbehave on purpose for tests (answer 503 first, close after every response)."""

from __future__ import annotations

import asyncio
import threading
from contextlib import suppress

_SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
              b"<Message>injected by the test proxy</Message></Error>")


class _RequestFramer:
    """Counts the HTTP/1.1 requests in a client's byte stream: a head up to a blank line,
    then ``Content-Length`` bytes of body. A chunked body stops the counting for the rest of
    that connection (none of our clients send one)."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._body_left = 0
        self._unframed = False

    def feed(self, data: bytes) -> int:
        """How many requests start in ``data``."""
        if self._unframed:
            return 0
        starts, view = 0, memoryview(data)
        while view:
            if self._body_left:
                taken = min(self._body_left, len(view))
                self._body_left -= taken
                view = view[taken:]
                continue
            if not self._head:
                starts += 1
            self._head += view
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return starts
            rest = bytes(self._head[end + 4:])
            self._body_left = _content_length(bytes(self._head[:end]))
            self._head.clear()
            if self._body_left < 0:
                self._unframed = True
                return starts
            view = memoryview(rest)
        return starts


def _content_length(head: bytes) -> int:
    """The body size a request head announces: 0 without one, -1 when chunked."""
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip() or 0)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            return -1
    return length


class LatencyProxy:
    """Forwards 127.0.0.1:<port> to ``target``; each request waits ``delay_ms`` first.

    Every request is delayed ``delay_ms`` from the moment it reaches the proxy and counted
    in ``requests``, so pipelined requests sent together all arrive ``delay_ms`` later, as
    on a network whose round trip is ``delay_ms``, and each counts as one request.

    Faults, for tests: ``fail_first`` requests are answered ``503 SlowDown`` without
    reaching the server; ``close_each`` answers every request with ``Connection: close``
    and closes the client's connection after it.
    """

    def __init__(self, target_host: str, target_port: int, delay_ms: float = 0.0, *,
                 fail_first: int = 0, close_each: bool = False) -> None:
        self.target = (target_host, target_port)
        self.delay = delay_ms / 1000
        self.fail_first = fail_first
        self.close_each = close_each
        self.requests = 0  # requests seen (forwarded or failed on purpose)
        self.failed = 0
        self.connections = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LatencyProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _shutdown(self) -> None:
        # Cancel open connections so nothing is left pending when the loop stops.
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        handler = self._handle_each if (self.fail_first or self.close_each) else self._handle
        server = self._loop.run_until_complete(
            asyncio.start_server(handler, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """Streaming mode: bytes flow both ways; a chunk that starts a request is held
        until ``delay`` after it arrived (later chunks queue behind it, in order)."""
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        framer = _RequestFramer()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def receive() -> None:
            while data := await client_r.read(65536):
                starts = framer.feed(data)
                self.requests += starts
                queue.put_nowait((loop.time() + self.delay if starts else 0.0, data))
            queue.put_nowait(None)

        async def upstream() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        # Cancelled: the proxy is shutting down.
        with suppress(ConnectionError, OSError, asyncio.CancelledError):
            await asyncio.gather(receive(), upstream(), downstream())

    async def _handle_each(self, client_r: asyncio.StreamReader,
                           client_w: asyncio.StreamWriter) -> None:
        """Fault mode: one request at a time, each on a fresh connection to the server."""
        self.connections += 1
        with suppress(ConnectionError, OSError, asyncio.IncompleteReadError,
                      asyncio.CancelledError):
            while True:
                head = await client_r.readuntil(b"\r\n\r\n")
                length = _content_length(head[:-4])
                body = await client_r.readexactly(length) if length > 0 else b""
                self.requests += 1
                await asyncio.sleep(self.delay)
                if self.failed < self.fail_first:
                    self.failed += 1
                    response = (b"HTTP/1.1 503 Service Unavailable\r\n"
                                b"Content-Type: application/xml\r\n"
                                + f"Content-Length: {len(_SLOW_DOWN)}\r\n".encode()
                                + (b"Connection: close\r\n" if self.close_each else b"")
                                + b"\r\n" + _SLOW_DOWN)
                else:
                    response = await self._forward_one(head, body)
                client_w.write(response)
                await client_w.drain()
                if self.close_each:
                    break
        client_w.close()

    async def _forward_one(self, head: bytes, body: bytes) -> bytes:
        """The server's whole response to one request, asked with ``Connection: close``
        (so its end is the end of the stream), with our own Connection header."""
        lines = [line for line in head[:-4].split(b"\r\n")
                 if not line.lower().startswith(b"connection:")]
        request = b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body
        server_r, server_w = await asyncio.open_connection(*self.target)
        try:
            server_w.write(request)
            await server_w.drain()
            response = await server_r.read(-1)
        finally:
            server_w.close()
        response_head, _, response_body = response.partition(b"\r\n\r\n")
        kept = [line for line in response_head.split(b"\r\n")
                if not line.lower().startswith(b"connection:")]
        kept.append(b"Connection: close" if self.close_each else b"Connection: keep-alive")
        return b"\r\n".join(kept) + b"\r\n\r\n" + response_body
