"""Free loopback ports for throwaway stacks, and the check that a stack's ports are free."""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping

from malaria_dev.stack.config import StackError, port_label

# How long a start waits for its ports to be released before calling them taken.
PORT_RELEASE_GRACE = 5.0


def grab_port(socks: list[socket.socket], port: int = 0, host: str = "127.0.0.1") -> int:
    """Bind ``port`` (0: any free one) and keep the socket in ``socks`` so the same port is
    not handed out twice while a set of ports is being chosen."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
    except BaseException:
        s.close()
        raise
    socks.append(s)
    return int(s.getsockname()[1])


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now (all sockets held open until all are chosen)."""
    socks: list[socket.socket] = []
    try:
        return [grab_port(socks, 0, host) for _ in range(n)]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def busy_ports(host: str, ports: Mapping[str, int]) -> dict[str, int]:
    """The named ports that something else listens on (or has bound) right now."""
    busy = {}
    for name, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # SO_REUSEADDR as the servers do, so TIME_WAIT leftovers don't count as busy.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                busy[name] = port
    return busy


def require_free_ports(what: str, host: str, ports: Mapping[str, int]) -> None:
    """Raise a StackError naming each busy port and the variable that moves it, after up to
    PORT_RELEASE_GRACE s (a server stopped a moment ago can hold its ports a little longer
    than its pid lives)."""
    deadline = time.monotonic() + PORT_RELEASE_GRACE
    while (busy := busy_ports(host, ports)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if busy:
        listed = ", ".join(f"{port} ({port_label(name)})" for name, port in busy.items())
        raise StackError(
            f"cannot start {what}: port already in use on {host}: {listed}. Stop what holds "
            "it, or move this stack with the variable named (or --s3-port/--prefect-port)"
        )
