"""`malaria deploy`: work pools, the time-zone variable, the deployments of prefect.yaml, the
failure automation and one worker per pool, on the local stack (or any Prefect server that
PREFECT_API_URL names)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate
from prefect.events.actions import RunDeployment
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.exceptions import ObjectNotFound

from malaria.stack import StackConfig, start_worker

PROJECT_DIR = Path(__file__).resolve().parent.parent
PREFECT_FILE = PROJECT_DIR / "deployments" / "prefect.yaml"
POOLS = ("gpu-training", "cpu-scoring")
AUTOMATION_NAME = "malaria-pipeline-failure"
PIPELINE_TAG = "malaria-pipeline"


def _prefect(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args],
                            cwd=PROJECT_DIR, capture_output=True, text=True, check=False,
                            env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    if result.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{result.stdout[-2000:]}"
                           f"{result.stderr[-2000:]}")
    return result.stdout


def ensure_pools() -> None:
    with get_client(sync_client=True) as client:
        existing = {pool.name for pool in client.read_work_pools()}
    for pool in POOLS:
        if pool not in existing:
            # Process pools here; on a cluster, create them with the base job templates in
            # deployments/job-templates/ (Docker device requests, Kubernetes nvidia.com/gpu).
            _prefect("work-pool", "create", pool, "--type", "process")


def ensure_timezone_variable(default: str = "UTC") -> str:
    value = os.environ.get("MALARIA_TIMEZONE", default)
    with get_client(sync_client=True) as client:
        current = client.read_variable_by_name("malaria_timezone")
        if current is None:
            client.create_variable(VariableCreate(name="malaria_timezone", value=value))
            return value
        return str(current.value)


def deploy_all() -> list[str]:
    _prefect("deploy", "--all", "--prefect-file", str(PREFECT_FILE))
    with get_client(sync_client=True) as client:
        return sorted(d.name for d in client.read_deployments())


def ensure_failure_automation() -> str:
    """Failed or crashed runs of tagged pipeline flows start the failure-alert deployment."""
    with get_client(sync_client=True) as client:
        alert = client.read_deployment_by_name("failure-alert/failure-alert")
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except (ValueError, ObjectNotFound):
        existing = None
    if existing is not None:
        return str(existing.id)
    automation = Automation(
        name=AUTOMATION_NAME,
        description="A pipeline flow run failed or crashed: record it and notify "
                    "(flows/alerts.py; set MALARIA_ALERT_WEBHOOK_URL for a webhook).",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.id": f"prefect.tag.{PIPELINE_TAG}"},
            posture=Posture.Reactive, threshold=1,
        ),
        actions=[RunDeployment(source="selected", deployment_id=alert.id,
                               parameters={"failed_run": "{{ event.resource.id }}"})],
    ).create()
    return str(automation.id)


def deploy_local(cfg: StackConfig, *, start_workers: bool = True) -> dict[str, object]:
    ensure_pools()
    timezone = ensure_timezone_variable()
    deployments = deploy_all()
    automation = ensure_failure_automation()
    workers = {pool: start_worker(cfg, pool, cwd=PROJECT_DIR) for pool in POOLS} \
        if start_workers else {}
    return {"pools": list(POOLS), "timezone": timezone, "deployments": deployments,
            "automation": automation, "workers": workers}
