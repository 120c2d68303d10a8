"""Event-driven scoring through a real Prefect server: `prefect deploy` of deployments/
prefect.yaml's bulk-scoring creates its trigger automations and its concurrency rule, and the
events the pipeline emits (tasks/events.py) create bulk-scoring flow runs; a run that would
start while one is running is cancelled, not queued. No worker: the runs stay scheduled."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
POOL = "cpu-scoring"


def _automation_runs(deployment_id: Any, at_least: int, timeout: float = 90) -> list[Any]:
    """Runs of the deployment that an automation created (the scheduler's are
    auto-scheduled), once there are ``at_least`` of them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs: list[Any] = []
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[deployment_id]))) if not r.auto_scheduled]
            if len(runs) >= at_least or time.monotonic() > deadline:
                break
            time.sleep(1)
    return runs


@pytest.fixture(scope="module")
def bulk_scoring(prefect_harness: None) -> Iterator[Any]:
    """bulk-scoring deployed from prefect.yaml onto the test server, as `malaria deploy`
    does it (the `prefect deploy` command); removed afterwards with what it owns."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import get_current_settings
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        created_pool = POOL not in {p.name for p in client.read_work_pools()}
        if created_pool:
            client.create_work_pool(WorkPoolCreate(
                name=POOL, type="process",
                base_job_template=ProcessWorker.get_default_base_job_template()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_API_URL": str(get_current_settings().api.url),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "bulk-scoring",
         "--prefect-file", str(ROOT / "deployments" / "prefect.yaml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("score/bulk-scoring")
    try:
        yield deployment
    finally:
        with get_client(sync_client=True) as client:
            client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
            client.delete_deployment(deployment.id)
            if created_pool:
                client.delete_work_pool(POOL)


def test_prefect_yaml_gives_bulk_scoring_triggers_and_cancel_new(bulk_scoring: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.events.actions import RunDeployment

    assert bulk_scoring.global_concurrency_limit.limit == 1
    assert bulk_scoring.concurrency_options.collision_strategy \
        == ConcurrencyLimitStrategy.CANCEL_NEW
    assert [s.schedule.interval.total_seconds() for s in bulk_scoring.schedules] == [3600]
    with get_client(sync_client=True) as client:
        automations = {a.name: a for a in client.read_resource_related_automations(
            f"prefect.deployment.{bulk_scoring.id}")}
    assert set(automations) == {"bulk-scoring-on-promotion", "bulk-scoring-on-new-scans"}
    for automation in automations.values():
        [action] = automation.actions
        assert isinstance(action, RunDeployment)
        assert action.deployment_id == bulk_scoring.id and action.parameters is None


def test_promotion_and_new_scans_start_bulk_scoring(bulk_scoring: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Pending, Running

    from tasks.events import emit_model_promoted, emit_scans_uploaded, flush_events

    time.sleep(2)  # the server's trigger service loads new automations on its own clock
    version = f"test-{uuid.uuid4().hex[:8]}"
    event = emit_model_promoted(version, "gate: better AUC on the test slides",
                                data_url="s3://events-test/lab", previous="v0")
    assert event is not None and event.resource.id == f"malaria.model.{version}"
    assert event.payload["previous"] == "v0"
    flush_events()
    [promoted] = _automation_runs(bulk_scoring.id, 1)
    assert promoted.state.is_scheduled() and promoted.parameters == {"runner": "threads"}

    scans = emit_scans_uploaded("s3://events-test/lab", 12, "scans/", ["s2", "s1", "s1"])
    assert scans is not None and scans.resource.id == "malaria.bucket.events-test"
    assert scans.payload["slides"] == ["s1", "s2"]
    flush_events()
    runs = _automation_runs(bulk_scoring.id, 2)
    assert len(runs) == 2

    # CANCEL_NEW: while one run holds the deployment's slot, the other is cancelled when a
    # worker would start it, instead of waiting for the slot.
    first, second = runs
    with get_client(sync_client=True) as client:
        assert client.set_flow_run_state(first.id, Pending()).state.is_pending()
        client.set_flow_run_state(first.id, Running())
        try:
            answer = client.set_flow_run_state(second.id, Pending())
            assert answer.state.is_cancelled(), answer
        finally:
            client.set_flow_run_state(first.id, Completed())


def test_uploading_scans_with_the_cli_starts_bulk_scoring(
        bulk_scoring: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`malaria data upload DIR --scans` puts <slide>/<file> under scans/ and announces it."""
    from malaria_cli.main import main

    before = len(_automation_runs(bulk_scoring.id, 0, timeout=0))
    source = tmp_path / "new-scans"
    for slide in ("901", "902"):
        (source / slide).mkdir(parents=True)
        (source / slide / "cell-1.png").write_bytes(b"not checked here")
    bucket = tmp_path / "bucket"
    monkeypatch.setenv("MALARIA_STATE_DIR", str(tmp_path / "no-stack"))
    assert main(["data", "upload", str(source), "--scans", "--to", bucket.as_uri()]) == 0
    assert sorted(p.relative_to(bucket).as_posix() for p in bucket.rglob("*.png")) == [
        "scans/901/cell-1.png", "scans/902/cell-1.png"]
    assert len(_automation_runs(bulk_scoring.id, before + 1)) == before + 1
