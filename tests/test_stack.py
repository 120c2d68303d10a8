"""The local stack: unit tests for config, credentials and pid files; one integration test
that starts real SeaweedFS and Prefect servers on free loopback ports in a temp folder."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from malaria.io.processes import pid_alive
from malaria_dev.stack import (
    GRPC_OFFSET,
    PORT_VARIABLES,
    StackConfig,
    StackError,
    free_ports,
    load_stack_env,
    prefect_argv,
    prefect_server_env,
    s3_credentials,
    seaweedfs_argv,
    stack_down,
    stack_env,
    stack_s3_client,
    stack_status,
    stack_up,
    start_seaweedfs,
)
from malaria_dev.stack import ports as stack_ports
from malaria_dev.stack.config import record_config
from malaria_dev.stack.credentials import ensure_identities, write_env_file
from malaria_dev.stack.processes import group_alive, read_pid
from malaria_dev.stack.seaweedfs import weed_socket_files
from malaria_dev.stack.workers import worker_env

# ------------------------------------------------------------------------------ unit tests


def test_config_defaults_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no .malaria/stack.json from a real stack
    default = StackConfig.from_env({})
    assert default.state_dir == (tmp_path / ".malaria").resolve()
    assert (default.host, default.s3_port, default.prefect_port, default.bucket) == (
        "127.0.0.1", 8333, 4200, "malaria",
    )  # fmt: skip

    cfg = StackConfig.from_env({
        "MALARIA_STATE_DIR": str(tmp_path / "state"),
        "MALARIA_S3_PORT": "18333",
        "MALARIA_PREFECT_PORT": "14200",
        "MALARIA_BUCKET": "cells",
        "MALARIA_MASTER_PORT": "19333",
        "MALARIA_FILER_GRPC_PORT": "20001",
    })  # fmt: skip
    assert cfg.state_dir == (tmp_path / "state").resolve()
    assert (cfg.s3_port, cfg.prefect_port, cfg.bucket) == (18333, 14200, "cells")
    # gRPC ports follow their HTTP port unless set, as in weed itself.
    assert cfg.s3_grpc_port == 18333 + GRPC_OFFSET
    assert cfg.master_grpc_port == 19333 + GRPC_OFFSET
    assert cfg.filer_grpc_port == 20001
    assert cfg.s3_endpoint == "http://127.0.0.1:18333"
    assert cfg.prefect_api_url == "http://127.0.0.1:14200/api"
    assert cfg.ui_url == "http://127.0.0.1:14200"

    with pytest.raises(StackError, match="MALARIA_S3_PORT"):
        StackConfig.from_env({"MALARIA_S3_PORT": "eighty"})
    with pytest.raises(StackError, match="s3_grpc_port 70000"):
        StackConfig.from_env({"MALARIA_S3_PORT": "60000"})
    with pytest.raises(StackError, match="loopback"):
        StackConfig(state_dir=tmp_path, host="0.0.0.0")
    # Built directly, a gRPC port follows its HTTP port too (no clash on the default 18333).
    moved = StackConfig(state_dir=tmp_path, s3_port=28000, filer_port=28001)
    assert (moved.s3_grpc_port, moved.filer_grpc_port) == (38000, 38001)
    assert moved.master_grpc_port == 9333 + GRPC_OFFSET


def test_every_port_has_a_variable_and_round_trips(tmp_path: Path) -> None:
    cfg = StackConfig.with_free_ports(tmp_path / "state", bucket="cells")
    env = cfg.to_env()
    assert set(PORT_VARIABLES.values()) <= set(env)
    assert StackConfig.from_env(env, recorded=False) == cfg
    # Only the admin gRPC port has no variable: weed's worker always dials admin + 10000.
    assert set(cfg.all_ports()) - set(PORT_VARIABLES) == {"admin_grpc_port"}


def test_a_state_folder_remembers_its_ports(tmp_path: Path) -> None:
    cfg = StackConfig.with_free_ports(tmp_path / "state", bucket="cells")
    record_config(cfg)
    only_folder = {"MALARIA_STATE_DIR": str(cfg.state_dir)}
    assert StackConfig.from_env(only_folder) == cfg
    # An explicit port wins, and its gRPC port follows it rather than the recorded one.
    moved = StackConfig.from_env({**only_folder, "MALARIA_S3_PORT": "20000"})
    assert (moved.s3_port, moved.s3_grpc_port) == (20000, 30000)
    assert moved.filer_port == cfg.filer_port and moved.bucket == "cells"
    cfg.record_file.write_text("{not json")
    with pytest.raises(StackError, match=r"stack\.json"):
        StackConfig.from_env(only_folder)


def test_seaweedfs_opens_only_the_configured_ports(tmp_path: Path) -> None:
    cfg = StackConfig.with_free_ports(tmp_path / "state")
    argv = seaweedfs_argv(cfg)
    flags = dict(a.lstrip("-").split("=", 1) for a in argv if a.startswith("-") and "=" in a)
    for name, port in cfg.weed_ports().items():
        if name == "admin_grpc_port":
            continue
        flag = name.removesuffix("_port").replace("_grpc", ".port.grpc")
        flag = flag if flag.endswith(".port.grpc") else f"{flag}.port"
        assert flags[flag] == str(port), (name, flag)
    # Ports weed would open by default on its own are switched off.
    assert flags["s3.port.iceberg"] == flags["s3.port.lance"] == "0"
    assert flags["webdav"] == "false"


def test_prefect_server_follows_the_config(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # another server's
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "elsewhere"))
    cfg = StackConfig.with_free_ports(tmp_path / "state")
    argv = prefect_argv(cfg)
    assert argv[argv.index("--port") + 1] == str(cfg.prefect_port)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    env = prefect_server_env(cfg)
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{cfg.prefect_port}/api"
    assert env["PREFECT_HOME"] == str(cfg.state_dir / "prefect")
    assert str(cfg.state_dir / "prefect" / "prefect.db") in env[
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"]


def test_workers_get_the_stack_they_were_started_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")
    monkeypatch.delenv("MALARIA_STATE_DIR", raising=False)
    cfg = StackConfig.with_free_ports(tmp_path / "state")
    ensure_identities(cfg)
    write_env_file(cfg)
    env = worker_env(cfg)
    assert env["PREFECT_API_URL"] == cfg.prefect_api_url
    assert env["PREFECT_WORKER_QUERY_SECONDS"] == "2"  # worker tuning is kept
    assert env["MALARIA_STATE_DIR"] == str(cfg.state_dir)
    assert env["MALARIA_S3_PORT"] == str(cfg.s3_port)
    assert env["AWS_ENDPOINT_URL"] == cfg.s3_endpoint


def test_free_ports_are_distinct_and_admin_pair_fits(tmp_path: Path) -> None:
    ports = free_ports(12)
    assert len(set(ports)) == 12
    cfg = StackConfig.with_free_ports(tmp_path)
    values = [*cfg.weed_ports().values(), cfg.prefect_port]
    assert len(set(values)) == len(values)
    assert cfg.admin_grpc_port == cfg.admin_port + GRPC_OFFSET <= 65535


def test_credentials_created_once_private_and_not_overriding_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = StackConfig(state_dir=tmp_path / "state", s3_port=18333, prefect_port=14200)
    with pytest.raises(StackError, match="stack up"):
        stack_env(cfg)

    ensure_identities(cfg)
    first = s3_credentials(cfg)
    ensure_identities(cfg)  # a later `up` keeps the keys
    assert s3_credentials(cfg) == first
    write_env_file(cfg)
    for path in (cfg.identities_file, cfg.env_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    env = stack_env(cfg)
    auth = env.pop("PREFECT_API_AUTH_STRING")  # the Prefect API's, kept beside the S3 keys
    assert auth.startswith("malaria:") and len(auth) > 24
    assert env == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:18333",
        "AWS_ACCESS_KEY_ID": first[0],
        "AWS_SECRET_ACCESS_KEY": first[1],
        "AWS_DEFAULT_REGION": "us-east-1",
        "PREFECT_API_URL": "http://127.0.0.1:14200/api",
        "MALARIA_DATA_URL": "s3://malaria",
    }
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "already-set")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    load_stack_env(cfg)
    assert os.environ["AWS_ACCESS_KEY_ID"] == "already-set"
    assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:18333"
    # Status text carries URLs, never the secret.
    assert first[1] not in stack_status(cfg).summary()


def test_stale_pid_files_are_cleaned(tmp_path: Path) -> None:
    cfg = StackConfig.with_free_ports(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid_file = cfg.pid_file("s3")
    pid_file.parent.mkdir(parents=True)

    # A process that has exited.
    pid_file.write_text(json.dumps({"pid": dead.pid, "start_time": None}))
    assert read_pid(cfg, "s3") is None
    assert not pid_file.exists()

    # A live pid that now belongs to another process (start time differs).
    pid_file.write_text(json.dumps({"pid": os.getpid(), "start_time": "1"}))
    assert read_pid(cfg, "s3") is None
    assert not pid_file.exists()

    # Garbage.
    cfg.pid_file("prefect").write_text("not json")
    status = stack_status(cfg)
    assert not cfg.pid_file("prefect").exists()
    assert (status.s3.alive, status.s3.healthy, status.s3.pid) == (False, False, None)
    assert (status.prefect.alive, status.prefect.healthy) == (False, False)
    stack_down(cfg)  # nothing to stop is not an error


def test_start_refuses_busy_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack_ports, "PORT_RELEASE_GRACE", 0.3)
    cfg = StackConfig.with_free_ports(tmp_path)
    with socket.socket() as blocker:
        blocker.bind((cfg.host, cfg.filer_port))
        blocker.listen()
        with pytest.raises(StackError, match=f"{cfg.filer_port}.*MALARIA_FILER_PORT"):
            start_seaweedfs(cfg)
    assert not cfg.pid_file("s3").exists()


def test_up_refuses_before_starting_anything_when_a_port_is_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack_ports, "PORT_RELEASE_GRACE", 0.3)
    # A weed that would run: it must not even be started while Prefect's port is taken.
    monkeypatch.setenv("MALARIA_WEED_BIN", _fake_weed(tmp_path, "exec sleep 60"))
    cfg = StackConfig.with_free_ports(tmp_path / "state")
    with socket.socket() as blocker:
        blocker.bind((cfg.host, cfg.prefect_port))
        blocker.listen()
        with pytest.raises(StackError, match=f"{cfg.prefect_port}.*MALARIA_PREFECT_PORT"):
            stack_up(cfg, timeout=10)
    assert not cfg.pid_file("s3").exists() and not cfg.log_file("s3").exists()


def _fake_weed(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-weed"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_up_reports_a_server_that_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALARIA_WEED_BIN", _fake_weed(tmp_path, "echo 'fatal: boom' >&2; exit 3"))
    cfg = StackConfig.with_free_ports(tmp_path / "state")
    with pytest.raises(StackError, match=r"(?s)exited while starting.*fatal: boom"):
        stack_up(cfg, services=("s3",), timeout=20)
    assert not cfg.pid_file("s3").exists()


def test_up_times_out_and_stops_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MALARIA_WEED_BIN", _fake_weed(tmp_path, "echo pid=$$; exec sleep 60"))
    cfg = StackConfig.with_free_ports(tmp_path / "state")
    with pytest.raises(StackError, match=r"(?s)did not become ready.*pid="):
        stack_up(cfg, services=("s3",), timeout=1.5)
    pid = int(cfg.log_file("s3").read_text().split("pid=")[1].split()[0])
    assert not pid_alive(pid)  # the half-started server was stopped
    assert not cfg.pid_file("s3").exists()
    assert not stack_status(cfg).s3.alive


# ----------------------------------------------------------------------- integration tests


def _no_listener(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) != 0


@pytest.mark.integration
def test_stack_up_status_roundtrip_down(tmp_path: Path) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    cfg = StackConfig.with_free_ports(tmp_path / "state", bucket="cells")
    try:
        t0 = time.monotonic()
        first = stack_up(cfg, timeout=75)
        up_s = time.monotonic() - t0
        assert first.healthy, first.summary()
        assert first.s3.pid and first.prefect.pid

        # Idempotent: the same servers are reused, quickly.
        t0 = time.monotonic()
        again = stack_up(cfg, timeout=30)
        assert time.monotonic() - t0 < 10
        assert (again.s3.pid, again.prefect.pid) == (first.s3.pid, first.prefect.pid)

        status = stack_status(cfg)
        assert status.s3.alive and status.s3.healthy and status.prefect.healthy
        assert status.s3_endpoint == cfg.s3_endpoint
        assert status.prefect_api_url == cfg.prefect_api_url

        env = stack_env(cfg)
        assert env["MALARIA_DATA_URL"] == "s3://cells"

        def client(key: str, secret: str) -> Any:
            return boto3.client(
                "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=key,
                aws_secret_access_key=secret, region_name=env["AWS_DEFAULT_REGION"],
                config=Config(retries={"max_attempts": 1}),
            )

        good = client(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
        good.put_object(Bucket="cells", Key="incoming/a.txt", Body=b"parasitized")
        body = good.get_object(Bucket="cells", Key="incoming/a.txt")["Body"].read()
        assert body == b"parasitized"

        # With identities configured, wrong keys are refused. "testing-access-key" is what
        # conftest puts in os.environ: weed must not have turned it into an identity.
        wrong = [
            (env["AWS_ACCESS_KEY_ID"], "not-the-secret"),
            ("testing-access-key", "testing-secret-key"),
        ]
        for key, secret in wrong:
            with pytest.raises(ClientError) as refused:
                client(key, secret).get_object(Bucket="cells", Key="incoming/a.txt")
            assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        with pytest.raises(ClientError):  # no silent bucket creation on a typo
            good.put_object(Bucket="celss", Key="a.txt", Body=b"x")
        import httpx

        anonymous = httpx.get(f"{cfg.s3_endpoint}/cells/incoming/a.txt", trust_env=False)
        assert anonymous.status_code == 403

        # The secret appears in no log.
        for log in (cfg.log_file("s3"), cfg.log_file("prefect")):
            assert env["AWS_SECRET_ACCESS_KEY"] not in log.read_text(errors="replace")
    finally:
        t0 = time.monotonic()
        stack_down(cfg, timeout=15)
        down_s = time.monotonic() - t0

    pids = (first.s3.pid, first.prefect.pid)
    for pid in pids:
        assert pid is not None and not pid_alive(pid)
        assert not group_alive(pid)
    for port in [*cfg.weed_ports().values(), cfg.prefect_port]:
        assert _no_listener(cfg.host, port), port
    after = stack_status(cfg)
    assert not after.s3.alive and not after.prefect.alive
    assert not after.s3.healthy and not after.prefect.healthy
    assert not cfg.pid_file("s3").exists() and not cfg.pid_file("prefect").exists()
    assert not [p for p in weed_socket_files(cfg) if p.exists()]
    print(f"stack up {up_s:.1f}s, down {down_s:.1f}s")


@pytest.mark.integration
def test_s3_data_survives_a_killed_server(tmp_path: Path) -> None:
    import signal

    cfg = StackConfig.with_free_ports(tmp_path / "state")
    try:
        first = stack_up(cfg, services=("s3",), timeout=60)
        assert first.s3.healthy and not first.prefect.alive
        client = stack_s3_client(cfg)
        client.put_object(Bucket=cfg.bucket, Key="dataset/p/a.png", Body=b"cell")

        # An unclean stop leaves a stale pid file; the next `up` cleans it and restarts.
        assert first.s3.pid is not None
        os.killpg(first.s3.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid_alive(first.s3.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not stack_status(cfg).s3.alive

        second = stack_up(cfg, services=("s3",), timeout=60)
        assert second.s3.pid != first.s3.pid
        # Readable at once: `up` waited until the master knew the volumes again.
        body = client.get_object(Bucket=cfg.bucket, Key="dataset/p/a.png")["Body"].read()
        assert body == b"cell"
    finally:
        stack_down(cfg)
    assert not stack_status(cfg).s3.alive


@pytest.mark.integration
def test_two_stacks_run_side_by_side(tmp_path: Path) -> None:
    """Two state folders, two sets of ports: both healthy at once, and independent. Only
    SeaweedFS runs (the Prefect server's ports and folders are covered by the unit tests)."""
    from botocore.exceptions import ClientError

    first = StackConfig.with_free_ports(tmp_path / "one")
    second: StackConfig | None = None
    try:
        stack_up(first, services=("s3",), timeout=60)
        # Chosen while the first stack holds its ports, so none can be handed out twice.
        second = StackConfig.with_free_ports(tmp_path / "two")
        assert not set(first.all_ports().values()) & set(second.all_ports().values())
        stack_up(second, services=("s3",), timeout=60)
        assert stack_status(first).s3.healthy and stack_status(second).s3.healthy
        assert s3_credentials(first) != s3_credentials(second)

        one, two = stack_s3_client(first), stack_s3_client(second)
        one.put_object(Bucket=first.bucket, Key="incoming/only-here.txt", Body=b"one")
        body = one.get_object(Bucket=first.bucket, Key="incoming/only-here.txt")["Body"]
        assert body.read() == b"one"
        with pytest.raises(ClientError) as missing:
            two.get_object(Bucket=second.bucket, Key="incoming/only-here.txt")
        assert missing.value.response["Error"]["Code"] in ("NoSuchKey", "404")
        two.put_object(Bucket=second.bucket, Key="incoming/only-there.txt", Body=b"two")
        keys = [o["Key"] for o in one.list_objects_v2(Bucket=first.bucket)["Contents"]]
        assert keys == ["incoming/only-here.txt"]
    finally:
        stack_down(first)
        if second is not None:
            stack_down(second)
    for cfg in (first, second):
        assert cfg is not None and not stack_status(cfg).s3.alive
        for port in cfg.weed_ports().values():
            assert _no_listener(cfg.host, port), port
