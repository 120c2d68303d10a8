"""Shared fixtures: a moto S3 server for fast unit tests; real servers live in
tests/integration_support.py and are started once per pytest run."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from buckets import drop_bucket

from malaria.io.store import LocalStore, S3Store, reset_clients

if TYPE_CHECKING:
    from malaria_dev.stack import StackConfig

# Tests never talk to a real AWS account, and Prefect never phones home.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-access-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Importing prefect configures its console log handler on the sys.stderr of that moment.
# Do it here, under pytest's session-long capture, and not first inside a test that uses
# capsys, whose stream is closed after the test (later log lines would hit a closed file).
import prefect  # noqa: F401


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def clients_find_moto(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Clients opened from a URL (flows, ScoringPaths, Dask workers) find the moto server in
    the environment, as production clients find their endpoint."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    reset_clients()
    yield
    reset_clients()


@pytest.fixture
def s3_store(moto_endpoint: str) -> S3Store:
    """A fresh, empty bucket on the moto server."""
    reset_clients()
    store = S3Store(f"test-{uuid.uuid4().hex[:12]}", endpoint_url=moto_endpoint)
    store.ensure_bucket()
    return store


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "bucket")


@pytest.fixture(params=["s3", "local"])
def any_store(request: pytest.FixtureRequest, moto_endpoint: str, tmp_path: Path) -> S3Store | LocalStore:
    if request.param == "s3":
        reset_clients()
        store = S3Store(f"test-{uuid.uuid4().hex[:12]}", endpoint_url=moto_endpoint)
        store.ensure_bucket()
        return store
    return LocalStore(tmp_path / "bucket")


# ------------------------------------------------------------ real servers, once per run


_SESSION_SEAWEEDFS: list[StackConfig] = []  # the session stack's config, once started


@pytest.fixture(scope="session")
def seaweedfs_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackConfig]:
    """A real SeaweedFS S3 server on loopback for the whole test session (its StackConfig)."""
    from malaria_dev.stack import StackConfig, stack_down, stack_up

    cfg = StackConfig.with_free_ports(tmp_path_factory.mktemp("stack"))
    stack_up(cfg, services=("s3",))
    _SESSION_SEAWEEDFS.append(cfg)
    try:
        yield cfg
    finally:
        _SESSION_SEAWEEDFS.clear()
        stack_down(cfg)


@pytest.fixture(scope="session")
def seaweedfs(seaweedfs_stack: StackConfig) -> dict[str, str]:
    """The env a client of the session's SeaweedFS needs (endpoint and the stack's generated
    credentials)."""
    from malaria_dev.stack import stack_env

    return stack_env(seaweedfs_stack)


@pytest.fixture(autouse=True)
def _seaweedfs_buckets_dropped_after_each_test() -> Iterator[None]:
    """SeaweedFS gives each bucket a volume of its own and allows free disk / 128 MB volumes
    (`weed mini`): buckets left behind by earlier tests made PutObject fail with
    InternalError on a CI machine with less free disk. Every test drops the buckets it made
    on the session's server (all but the stack's own)."""
    yield
    if not _SESSION_SEAWEEDFS:
        return
    from malaria_dev.stack.credentials import stack_s3_client

    cfg = _SESSION_SEAWEEDFS[0]
    client = stack_s3_client(cfg)
    for bucket in client.list_buckets().get("Buckets", []):
        if bucket["Name"] != cfg.bucket:
            drop_bucket(client, bucket["Name"])


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One throwaway Prefect server (SQLite) shared by every flow test of the run."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def seaweed_bucket(seaweedfs: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """A fresh bucket on the session's SeaweedFS, with the client environment pointing at it."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, seaweedfs[name])
    reset_clients()
    store = S3Store(f"it-{uuid.uuid4().hex[:12]}")
    store.ensure_bucket()
    monkeypatch.setenv("MALARIA_DATA_URL", store.url)
    yield store  # type: ignore[misc]
    reset_clients()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ``cellnet-tiny`` at 32 px, saved as the product saves a model: for the
    tests that score or register one (nobody writes to the file)."""
    from malaria.model.architectures import build_model
    from malaria.model.checkpoints import save_for_serving

    path = tmp_path_factory.mktemp("model") / "model.keras"
    save_for_serving(build_model("cellnet-tiny", 32), path)
    return path
