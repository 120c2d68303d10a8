"""Is a process still running? Shared by the local stack and the scoring leases."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def reap(pid: int) -> None:
    # A dead child of *this* process stays a zombie (and "alive" to kill(0)) until reaped,
    # which happens when tests start and stop servers in the same interpreter.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def finished_zombie(pid: int) -> bool:
    """A zombie whose threads have all exited: dead, its sockets closed, just not reaped (by
    us, or by a PID 1 that does not reap, as in some containers). A multi-threaded server
    (weed is Go) shows its main thread as a zombie while the others still tear down and
    still hold its ports; those remain listed under /proc/<pid>/task."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state not in ("Z", "X"):
            return False
        return len(os.listdir(f"/proc/{pid}/task")) <= 1
    except (OSError, IndexError):
        return False


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped) counts as gone."""
    reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not finished_zombie(pid)


def holder_is_live(holder: dict[str, object] | None, this_host: str, now: float) -> bool:
    """The one liveness rule of the bucket's leases and locks: a holder document counts
    while it has not expired and, when written on this host, its process is alive (a
    SIGKILLed run's lease is stale at once)."""
    if not holder:
        return False
    try:
        if float(holder["expires_at"]) <= now:  # type: ignore[arg-type]
            return False
        host, pid = str(holder.get("host", "")), int(holder.get("pid", 0))  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError):
        return False
    return not (host == this_host and pid > 0 and not pid_alive(pid))
