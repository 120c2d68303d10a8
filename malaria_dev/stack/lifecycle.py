"""Bring the whole stack up, down, and report its status."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from malaria.io.processes import pid_alive
from malaria_dev.stack.config import SERVICES, StackConfig, StackError, process_name, record_config
from malaria_dev.stack.credentials import ensure_identities, write_env_file
from malaria_dev.stack.ports import require_free_ports
from malaria_dev.stack.prefect_server import (
    prefect_answers,
    prefect_argv,
    start_prefect,
    wait_prefect_healthy,
)
from malaria_dev.stack.processes import locked, read_pid, recorded_argv, stop_groups
from malaria_dev.stack.seaweedfs import (
    remove_weed_sockets,
    s3_answers,
    seaweedfs_argv,
    start_seaweedfs,
    wait_s3_healthy,
)
from malaria_dev.stack.workers import stop_workers


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    alive: bool
    healthy: bool
    url: str


@dataclass(frozen=True)
class StackStatus:
    s3: ServiceStatus
    prefect: ServiceStatus
    s3_endpoint: str
    prefect_api_url: str
    ui_url: str
    bucket: str

    @property
    def healthy(self) -> bool:
        return self.s3.healthy and self.prefect.healthy

    def summary(self) -> str:
        """Human-readable lines for the CLI; URLs only, never credentials."""
        lines = []
        for svc in (self.s3, self.prefect):
            state = "healthy" if svc.healthy else ("running, not healthy" if svc.alive else "stopped")
            pid = f"pid {svc.pid}" if svc.pid else "no pid"
            lines.append(f"{svc.name:<8} {state:<22} {pid:<12} {svc.url}")
        lines += [
            f"S3 endpoint      {self.s3_endpoint}  (bucket s3://{self.bucket})",
            f"Prefect API URL  {self.prefect_api_url}",
            f"Prefect UI       {self.ui_url}",
        ]
        return "\n".join(lines)


def _check_services(services: Sequence[str]) -> list[str]:
    names = [services] if isinstance(services, str) else list(services)
    for name in names:
        process_name(name)  # raises on an unknown name
    return names


def _check_same_settings(cfg: StackConfig, service: str) -> None:
    """A running server is reused only if it was started with today's command line (ports,
    folders); otherwise health checks would probe ports it does not listen on."""
    recorded = recorded_argv(cfg, service)
    wanted = seaweedfs_argv(cfg) if service == "s3" else prefect_argv(cfg)
    if recorded and recorded[1:] != wanted[1:]:  # [0] may differ: another venv, same server
        raise StackError(
            f"{process_name(service)} is running with other settings (ports or folders); "
            "run `malaria stack down` first"
        )


def _ports_of(cfg: StackConfig, services: Sequence[str]) -> dict[str, int]:
    ports: dict[str, int] = {}
    if "s3" in services:
        ports.update(cfg.weed_ports())
    if "prefect" in services:
        ports["prefect_port"] = cfg.prefect_port
    return ports


def stack_up(cfg: StackConfig, *, services: Sequence[str] = SERVICES,
             timeout: float = 120) -> StackStatus:
    """Start the services not already running (both in parallel), wait until they are
    healthy and the bucket exists, and return the status. Idempotent: a running server from
    this state folder is reused. Refuses to start anything when a port it needs is busy;
    on a later failure, servers started by this call are stopped."""
    names = _check_services(services)
    deadline = time.monotonic() + timeout
    starters = {"s3": start_seaweedfs, "prefect": start_prefect}
    with locked(cfg):
        running = {name: pid for name in names if (pid := read_pid(cfg, name)) is not None}
        for name in running:
            _check_same_settings(cfg, name)
        to_start = [name for name in names if name not in running]
        # Every port checked before anything starts: a busy Prefect port must not leave a
        # SeaweedFS behind, and the error lists all the clashes at once.
        require_free_ports(" and ".join(process_name(n) for n in to_start), cfg.host,
                           _ports_of(cfg, to_start))
        ensure_identities(cfg)
        write_env_file(cfg)
        record_config(cfg)
        pids = dict(running)
        started: dict[str, int] = {}
        try:
            for name in to_start:
                pids[name] = started[name] = starters[name](cfg)
            if "s3" in pids:
                wait_s3_healthy(cfg, timeout=max(0.0, deadline - time.monotonic()),
                                pid=pids["s3"])
            if "prefect" in pids:
                wait_prefect_healthy(cfg, timeout=max(0.0, deadline - time.monotonic()),
                                     pid=pids["prefect"])
        except BaseException:
            # Leave nothing half-started behind; servers we merely reused stay up.
            with contextlib.suppress(StackError):
                stop_groups(started, timeout=5)
            for name in started:
                cfg.pid_file(name).unlink(missing_ok=True)
            raise
    return stack_status(cfg)


def stack_down(cfg: StackConfig, *, timeout: float = 15) -> None:
    """Stop the workers, then both servers: SIGTERM to each process group, then SIGKILL
    after ``timeout``. Data, credentials and logs stay in the state folder."""
    stop_workers(cfg, timeout=timeout)
    with locked(cfg):
        pgids = {name: pid for name in SERVICES if (pid := read_pid(cfg, name)) is not None}
        try:
            stop_groups(pgids, timeout)
        finally:
            for name in pgids:
                if not pid_alive(pgids[name]):
                    cfg.pid_file(name).unlink(missing_ok=True)
        if read_pid(cfg, "s3") is None:
            remove_weed_sockets(cfg)


def _service_status(cfg: StackConfig, service: str) -> ServiceStatus:
    pid = read_pid(cfg, service)
    if service == "s3":
        url, healthy = cfg.s3_endpoint, pid is not None and s3_answers(cfg)
    else:
        url, healthy = cfg.prefect_api_url, pid is not None and prefect_answers(cfg)
    return ServiceStatus(name=service, pid=pid, alive=pid is not None, healthy=healthy, url=url)


def stack_status(cfg: StackConfig) -> StackStatus:
    """Per service: pid from the pid file, whether it is alive, whether it answers its health
    check. A server not started from this state folder counts as not running."""
    return StackStatus(
        s3=_service_status(cfg, "s3"),
        prefect=_service_status(cfg, "prefect"),
        s3_endpoint=cfg.s3_endpoint,
        prefect_api_url=cfg.prefect_api_url,
        ui_url=cfg.ui_url,
        bucket=cfg.bucket,
    )
