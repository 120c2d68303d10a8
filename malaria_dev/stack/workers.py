"""Prefect workers are processes of the stack too: `malaria deploy` starts one per work pool,
`malaria stack down` stops them first. A worker ignores a single SIGTERM (it finishes its
loop), so it gets SIGINT twice, then SIGKILL after a timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from malaria.io.processes import pid_alive
from malaria_dev.stack.config import StackConfig
from malaria_dev.stack.credentials import stack_env
from malaria_dev.stack.processes import group_alive, locked, read_pid, spawn, stop_groups


def _worker_service(pool: str) -> str:
    return f"worker-{pool}"


def worker_pids(cfg: StackConfig) -> dict[str, int]:
    """Running workers started from this state folder, by pool."""
    run_dir = cfg.state_dir / "run"
    pids: dict[str, int] = {}
    for path in sorted(run_dir.glob("worker-*.pid")) if run_dir.is_dir() else []:
        pool = path.stem.removeprefix("worker-")
        pid = read_pid(cfg, _worker_service(pool))
        if pid is not None:
            pids[pool] = pid
    return pids


def worker_env(cfg: StackConfig) -> dict[str, str]:
    """A worker's environment: the caller's, whose Prefect settings give way to the stack's
    (except worker tuning, e.g. its poll interval), plus the variables that name this stack,
    so its flow runs use the same state folder and ports as the command that started it."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") or k.startswith("PREFECT_WORKER_")}
    env.update(stack_env(cfg))
    env.update(cfg.to_env())
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # The domain library logs to malaria.* without Prefect; this sends those lines to the
    # flow run's log in the UI too (the process worker passes its environment on).
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "malaria")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def start_worker(cfg: StackConfig, pool: str, *, cwd: Path, limit: int = 1) -> int:
    """Start `prefect worker start --pool <pool>` detached (idempotent); returns its pid."""
    service = _worker_service(pool)
    with locked(cfg):
        pid = read_pid(cfg, service)
        if pid is not None:
            return pid
        argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                "--type", "process", "--limit", str(limit), "--name", f"{pool}-local"]
        return spawn(cfg, service, argv, worker_env(cfg), cwd=cwd)


def stop_workers(cfg: StackConfig, *, timeout: float = 20) -> None:
    pids = worker_pids(cfg)
    if not pids:
        return
    for _ in range(2):  # the second SIGINT makes it stop without waiting for its loop
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGINT)
        time.sleep(0.5)
    try:
        stop_groups({_worker_service(p): pid for p, pid in pids.items()
                     if group_alive(pid)}, timeout)
    finally:
        for pool, pid in pids.items():
            if not pid_alive(pid):
                cfg.pid_file(_worker_service(pool)).unlink(missing_ok=True)
