"""The stack's Prefect server: its command line and environment, start, readiness."""

from __future__ import annotations

import os
import sys
import time

from malaria_dev.stack.config import StackConfig
from malaria_dev.stack.credentials import prefect_auth_string
from malaria_dev.stack.ports import require_free_ports
from malaria_dev.stack.processes import spawn, wait_ready
from malaria_dev.stack.seaweedfs import http_ok


def prefect_argv(cfg: StackConfig) -> list[str]:
    # `python -m prefect` runs the Prefect installed with this interpreter; --analytics-off
    # because the CLI flag, not only the env var, decides the server's analytics setting.
    return [
        sys.executable, "-m", "prefect", "server", "start",
        "--host", cfg.host, "--port", str(cfg.prefect_port), "--analytics-off",
    ]  # fmt: skip


def prefect_server_env(cfg: StackConfig) -> dict[str, str]:
    """The server's environment: the caller's, minus any PREFECT_* (a profile or API URL for
    another server or for Prefect Cloud must not leak in), plus settings that keep all state
    in the state folder and make no calls outside this machine, and lock the API: every
    request but GET /api/health needs the auth string of stack.env (HTTP Basic; the UI asks
    for it at login), cross-origin calls are allowed from the UI's own origin only, and
    state-changing calls need a CSRF token (Prefect's clients and UI fetch one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    db = cfg.prefect_home / "prefect.db"
    env.update({
        "PREFECT_HOME": str(cfg.prefect_home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}",
        "PREFECT_API_URL": cfg.prefect_api_url,
        "PREFECT_UI_URL": cfg.ui_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no sens-o-matic.prefect.io beacon
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        "PREFECT_SERVER_API_AUTH_STRING": prefect_auth_string(cfg),
        # The server's own clients (automations, UI settings) use the same string.
        "PREFECT_API_AUTH_STRING": prefect_auth_string(cfg),
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": cfg.ui_url,
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
    })  # fmt: skip
    return env


def start_prefect(cfg: StackConfig) -> int:
    """Start the Prefect server detached and return its pid (see wait_prefect_healthy)."""
    cfg.prefect_home.mkdir(parents=True, exist_ok=True)
    require_free_ports("Prefect", cfg.host, {"prefect_port": cfg.prefect_port})
    return spawn(cfg, "prefect", prefect_argv(cfg), prefect_server_env(cfg), cwd=cfg.state_dir)


def prefect_answers(cfg: StackConfig) -> bool:
    return http_ok(f"{cfg.prefect_api_url}/health")


def wait_prefect_healthy(cfg: StackConfig, *, timeout: float = 120, pid: int | None = None) -> None:
    """Wait until GET /api/health answers 200 (the first start also migrates the database)."""
    deadline = time.monotonic() + timeout
    wait_ready(cfg, "prefect", pid, deadline, lambda: prefect_answers(cfg),
               f"GET {cfg.prefect_api_url}/health")
