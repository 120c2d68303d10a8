"""The stack's server processes: start detached, pid files, readiness waits, stop, lock.

Each server runs in its own session (own process group, no terminal), so it outlives the
command that started it and can be stopped as a whole group. Linux/macOS only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from malaria.io.processes import finished_zombie, pid_alive, reap
from malaria_dev.stack.config import StackConfig, StackError, process_name


def proc_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell our process from a reused pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counted after the ")" closing the command name.
    return text.rsplit(")", 1)[1].split()[19]


def group_alive(pgid: int) -> bool:
    """Is any process of the group ``pgid`` still running (zombies do not count)?"""
    reap(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) also succeeds for zombies; the leader being gone and reaped is what counts
    # unless children linger, which /proc tells us.
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and not finished_zombie(int(entry.name)):
            return True
    return False


def read_pid(cfg: StackConfig, service: str) -> int | None:
    """The pid of our running server for ``service``, or None; removes a stale pid file."""
    path = cfg.pid_file(service)
    try:
        record = json.loads(path.read_text())
        pid = int(record["pid"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):
        path.unlink(missing_ok=True)
        return None
    started = record.get("start_time")
    if pid_alive(pid) and (started is None or proc_start_time(pid) in (None, started)):
        return pid
    path.unlink(missing_ok=True)  # the process died or the pid now belongs to another one
    return None


def recorded_argv(cfg: StackConfig, service: str) -> list[str] | None:
    """The command line a running service was started with, from its pid file."""
    try:
        argv = json.loads(cfg.pid_file(service).read_text()).get("argv")
    except (OSError, ValueError, AttributeError):
        return None
    return list(argv) if isinstance(argv, list) else None


def _write_pid(cfg: StackConfig, service: str, pid: int, argv: Sequence[str]) -> None:
    record = {"pid": pid, "start_time": proc_start_time(pid), "argv": list(argv)}
    path = cfg.pid_file(service)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record) + "\n")


def spawn(cfg: StackConfig, service: str, argv: Sequence[str], env: Mapping[str, str],
          cwd: Path) -> int:
    """Start ``argv`` detached in its own session, output appended to the service's log
    file, and record its pid."""
    log_path = cfg.log_file(service)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n=== {stamp} starting: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )
    _write_pid(cfg, service, proc.pid, argv)
    return proc.pid


def log_tail(cfg: StackConfig, service: str, lines: int = 25) -> str:
    try:
        with open(cfg.log_file(service), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_ready(cfg: StackConfig, service: str, pid: int | None, deadline: float,
               ready: Callable[[], bool], what: str) -> None:
    """Poll ``ready`` until it returns True; fail with the log tail if ``pid`` dies or the
    deadline passes (``what`` says what was awaited)."""
    last_error = ""
    while True:
        if pid is not None and not pid_alive(pid):
            cfg.pid_file(service).unlink(missing_ok=True)
            raise StackError(
                f"{process_name(service)} (pid {pid}) exited while starting; "
                f"last lines of {cfg.log_file(service)}:\n{log_tail(cfg, service)}"
            )
        try:
            if ready():
                return
        except Exception as exc:  # not ready yet: keep the reason for the timeout message
            last_error = f" (last error: {type(exc).__name__}: {exc})"
        if time.monotonic() >= deadline:
            raise StackError(
                f"{process_name(service)} did not become ready ({what}) in time{last_error}; "
                f"last lines of {cfg.log_file(service)}:\n{log_tail(cfg, service)}"
            )
        time.sleep(0.2)


def stop_groups(pgids: Mapping[str, int], timeout: float) -> None:
    """SIGTERM each process group, wait up to ``timeout`` for all, then SIGKILL the rest.

    Whole groups, because `prefect server start` and weed may have children; SIGKILL at the
    end because weed's graceful stop can hang on its internal gRPC streams.
    """
    for pgid in pgids.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(group_alive(g) for g in pgids.values()):
        time.sleep(0.1)
    for pgid in pgids.values():
        if group_alive(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(group_alive(g) for g in pgids.values()):
        time.sleep(0.05)
    left = {name: g for name, g in pgids.items() if group_alive(g)}
    if left:
        raise StackError(f"processes survived SIGKILL: {left}")


@contextlib.contextmanager
def locked(cfg: StackConfig) -> Iterator[None]:
    """Serialise up/down on one state folder: two `up`s must not both start servers."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(cfg.state_dir / "stack.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
