"""Where a local stack keeps its state and which loopback ports it opens.

Every port is set by a ``MALARIA_*_PORT`` variable (``PORT_VARIABLES``) or takes its
default. Precedence, highest first: the environment (the CLI puts ``--state-dir``,
``--s3-port`` and ``--prefect-port`` there), what the state folder's last ``up`` recorded in
``stack.json``, the defaults. A gRPC port not set follows its HTTP port + 10000, as in weed.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from malaria.io.atomic import write_atomic

SERVICES: tuple[str, ...] = ("s3", "prefect")
REGION = "us-east-1"
# SeaweedFS listens on a gRPC port next to each HTTP port; its default offset is +10000.
GRPC_OFFSET = 10000

# Config field -> environment variable. admin_grpc_port has none: `weed mini`'s maintenance
# worker always dials admin_port + 10000, so that port moves with MALARIA_ADMIN_PORT.
PORT_VARIABLES: dict[str, str] = {
    "s3_port": "MALARIA_S3_PORT",
    "prefect_port": "MALARIA_PREFECT_PORT",
    "master_port": "MALARIA_MASTER_PORT",
    "volume_port": "MALARIA_VOLUME_PORT",
    "filer_port": "MALARIA_FILER_PORT",
    "admin_port": "MALARIA_ADMIN_PORT",
    "s3_grpc_port": "MALARIA_S3_GRPC_PORT",
    "master_grpc_port": "MALARIA_MASTER_GRPC_PORT",
    "volume_grpc_port": "MALARIA_VOLUME_GRPC_PORT",
    "filer_grpc_port": "MALARIA_FILER_GRPC_PORT",
}
STATE_DIR_VARIABLE = "MALARIA_STATE_DIR"
BUCKET_VARIABLE = "MALARIA_BUCKET"
# gRPC port field -> the HTTP port field it follows when not set.
_GRPC_OF = {f"{name}_grpc_port": f"{name}_port" for name in ("s3", "master", "volume", "filer")}
_WEED_PORT_FIELDS = (
    "s3_port", "master_port", "volume_port", "filer_port", "admin_port",
    "s3_grpc_port", "master_grpc_port", "volume_grpc_port", "filer_grpc_port", "admin_grpc_port",
)  # fmt: skip


class StackError(RuntimeError):
    """The stack could not be started, reached or stopped; the message says why."""


def port_label(name: str) -> str:
    """``filer_port`` -> ``filer_port, MALARIA_FILER_PORT``: what to change when it is busy."""
    return f"{name}, {PORT_VARIABLES.get(name, 'MALARIA_ADMIN_PORT + 10000')}"


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError as exc:
        raise StackError(f"{name} must be an integer port, got {raw!r}") from exc
    if not 0 < value < 65536:
        raise StackError(f"{name} must be a port between 1 and 65535, got {value}")
    return value


@dataclass(frozen=True)
class StackConfig:
    """The state folder, the bucket and every loopback port of one local stack.

    A gRPC port left at 0 becomes its HTTP port + 10000 (weed's own rule), so
    ``StackConfig(s3_port=18333)`` listens for S3 gRPC on 28333, not on the default's 18333.
    Keep the ports stable for a given state folder: the SeaweedFS master keeps its metadata
    in a folder named after its port (``seaweedfs/m<master_port>``); ``stack.json`` records
    them for that reason.
    """

    state_dir: Path = field(default_factory=lambda: Path(".malaria"))
    host: str = "127.0.0.1"
    s3_port: int = 8333
    prefect_port: int = 4200
    bucket: str = "malaria"
    master_port: int = 9333
    volume_port: int = 9340
    filer_port: int = 8888
    admin_port: int = 23646
    s3_grpc_port: int = 0  # 0: s3_port + GRPC_OFFSET
    master_grpc_port: int = 0
    volume_grpc_port: int = 0
    filer_grpc_port: int = 0

    def __post_init__(self) -> None:
        # Relative paths would change meaning when a server is started from another cwd.
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser().resolve())
        for grpc, http in _GRPC_OF.items():
            if not getattr(self, grpc):
                object.__setattr__(self, grpc, getattr(self, http) + GRPC_OFFSET)
        if not _is_loopback(self.host):
            raise StackError(f"the local stack binds to loopback only, not {self.host!r}")
        for name, port in self.all_ports().items():
            if not 0 < port < 65536:
                raise StackError(
                    f"{name} {port} is not a valid port (a gRPC port defaults to its HTTP "
                    f"port + {GRPC_OFFSET}; pick a lower HTTP port or set "
                    f"{PORT_VARIABLES.get(name, 'a lower MALARIA_ADMIN_PORT')})"
                )

    # ----------------------------------------------------------------- from the environment

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *,
                 recorded: bool = True) -> StackConfig:
        """The config named by MALARIA_STATE_DIR, MALARIA_BUCKET and the MALARIA_*_PORT
        variables; what they leave unset comes from the state folder's ``stack.json``
        (unless ``recorded`` is false), then from the defaults."""
        env = os.environ if env is None else env
        state_dir = Path(env.get(STATE_DIR_VARIABLE) or ".malaria")
        explicit: dict[str, Any] = {
            name: port for name, variable in PORT_VARIABLES.items()
            if (port := _env_int(env, variable)) is not None
        }
        if env.get(BUCKET_VARIABLE):
            explicit["bucket"] = env[BUCKET_VARIABLE]
        settings = {**(_read_record(state_dir) if recorded else {}), **explicit}
        for grpc, http in _GRPC_OF.items():
            # A recorded gRPC port was derived from the recorded HTTP port: it must not
            # survive a new HTTP port given now.
            if http in explicit and grpc not in explicit:
                settings.pop(grpc, None)
        return cls(state_dir=state_dir, **settings)

    def to_env(self) -> dict[str, str]:
        """The variables that name this stack: a child process given them (a Prefect worker,
        a flow run) finds the same state folder and ports."""
        env = {STATE_DIR_VARIABLE: str(self.state_dir), BUCKET_VARIABLE: self.bucket}
        env.update({variable: str(getattr(self, name))
                    for name, variable in PORT_VARIABLES.items()})
        return env

    @classmethod
    def with_free_ports(cls, state_dir: Path, **overrides: Any) -> StackConfig:
        """A config on currently free loopback ports: for tests and throwaway stacks."""
        from malaria_dev.stack.ports import grab_port

        socks: list[socket.socket] = []
        try:
            # The admin port needs its +10000 neighbour free too; the others are independent.
            for _ in range(200):
                admin = grab_port(socks)
                try:
                    grab_port(socks, admin + GRPC_OFFSET)
                    break
                except (OSError, OverflowError):
                    continue
            else:
                raise StackError("found no free admin port with a free +10000 neighbour")
            ports = {name: grab_port(socks) for name in PORT_VARIABLES if name != "admin_port"}
        finally:
            for s in socks:
                s.close()
        return replace(cls(state_dir=state_dir, admin_port=admin, **ports), **overrides)

    # -------------------------------------------------------------------------------- ports

    @property
    def admin_grpc_port(self) -> int:
        return self.admin_port + GRPC_OFFSET

    def weed_ports(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _WEED_PORT_FIELDS}

    def all_ports(self) -> dict[str, int]:
        return {**self.weed_ports(), "prefect_port": self.prefect_port}

    # ----------------------------------- derived locations and URLs: one place for all users

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def master_url(self) -> str:
        return f"https://{self.host}:{self.master_port}"  # client certificate required

    @property
    def seaweedfs_dir(self) -> Path:
        return self.state_dir / "seaweedfs"

    @property
    def prefect_home(self) -> Path:
        return self.state_dir / "prefect"

    @property
    def identities_file(self) -> Path:
        return self.state_dir / "s3-identities.json"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "stack.env"

    @property
    def record_file(self) -> Path:
        return self.state_dir / "stack.json"

    def log_file(self, service: str) -> Path:
        return self.state_dir / "logs" / f"{process_name(service)}.log"

    def pid_file(self, service: str) -> Path:
        return self.state_dir / "run" / f"{process_name(service)}.pid"


def record_config(cfg: StackConfig) -> None:
    """Remember the bucket and ports in ``stack.json`` (no secrets), so that a later command
    given only the state folder reaches this stack."""
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg)
                if f.name not in ("state_dir", "host")}
    write_atomic(cfg.record_file, json.dumps(settings, indent=2) + "\n")


def _read_record(state_dir: Path) -> dict[str, Any]:
    path = Path(state_dir).expanduser() / "stack.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StackError(f"{path} is not readable JSON ({exc}); delete it to use the "
                         "defaults") from exc
    if not isinstance(doc, dict):
        raise StackError(f"{path} does not hold a JSON object; delete it to use the defaults")
    bucket = doc.get("bucket")
    record: dict[str, Any] = {"bucket": bucket} if isinstance(bucket, str) and bucket else {}
    # type() is int: not a bool, not a string.
    record.update({k: v for k, v in doc.items() if k in PORT_VARIABLES and type(v) is int})
    return record


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1") or host.startswith("127.")


def process_name(service: str) -> str:
    """The name of a service's process, its pid file and its log: ``s3`` -> ``seaweedfs``."""
    if service == "s3":
        return "seaweedfs"
    if service == "prefect":
        return "prefect"
    if service.startswith("worker-") and service[7:].replace("-", "").isalnum():
        return service
    raise StackError(f"unknown service {service!r}; expected one of {SERVICES}")
