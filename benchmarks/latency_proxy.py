"""A loopback TCP proxy that adds a fixed delay to every HTTP request, to show what
concurrency buys against a remote object store (a LAN or cloud S3 is 1-50 ms away)."""

from __future__ import annotations

import asyncio
import threading
from contextlib import suppress


class LatencyProxy:
    """Forwards 127.0.0.1:<port> to ``target``; each request waits ``delay_ms`` first.

    A request is the first bytes a client sends after the server last answered on that
    connection, so keep-alive connections pay the delay once per request, as on a network
    whose round trip is ``delay_ms``.
    """

    def __init__(self, target_host: str, target_port: int, delay_ms: float) -> None:
        self.target = (target_host, target_port)
        self.delay = delay_ms / 1000
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
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        answered = asyncio.Event()
        answered.set()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if answered.is_set():  # the start of a new request
                    answered.clear()
                    await asyncio.sleep(self.delay)
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                answered.set()
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        with suppress(ConnectionError, OSError):
            await asyncio.gather(upstream(), downstream())
