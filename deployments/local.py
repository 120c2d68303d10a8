"""`malaria deploy`: work pools, the time-zone variable, the deployments of prefect.yaml (with
bulk-scoring's event triggers, which `prefect deploy` turns into automations), the failure
automation, the webhook notification automations (when $MALARIA_ALERT_WEBHOOK_URL is set)
and one worker per pool, on the local stack (or any Prefect server that PREFECT_API_URL
names)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate
from prefect.events.actions import CallWebhook, RunDeployment
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.exceptions import ObjectNotFound

from malaria_dev.stack import StackConfig, start_worker
from tasks.events import (
    PARASITEMIA_CHANGED,
    SCORING_DRIFT,
    emit_cells_uploaded,
    emit_scans_uploaded,
    flush_events,
)
from tasks.notify import WEBHOOK_BLOCK, WEBHOOK_ENV, save_webhook_block

PROJECT_DIR = Path(__file__).resolve().parent.parent
PREFECT_FILE = PROJECT_DIR / "deployments" / "prefect.yaml"
POOLS = ("gpu-training", "cpu-scoring")
AUTOMATION_NAME = "malaria-pipeline-failure"
PIPELINE_TAG = "malaria-pipeline"
# The server's own automations call the webhook block: no worker slot, and a busy or dead
# cpu-scoring pool cannot hold back the news that it is busy or dead.
NOTIFY_FAILURE = "malaria-notify-failure"
NOTIFY_DRIFT = "malaria-notify-drift"
NOTIFY_PARASITEMIA = "malaria-notify-parasitemia-changed"
FAILURE_STATES = ("Failed", "Crashed", "TimedOut")


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


def _json_template(fields: dict[str, str]) -> str:
    """A JSON object whose values are Jinja expressions, each rendered through ``tojson`` so a
    quote in a run or slide name cannot break the document. Only names, states, counts and
    UI links: never a state message (it may quote an exception) nor the webhook URL."""
    # default(none): a field the event lacks (no flow run behind it) is JSON null, since
    # tojson refuses Jinja's undefined.
    return "{" + ", ".join(f"{json.dumps(key)}: {{{{ ({expression}) | default(none) | tojson }}}}"
                           for key, expression in fields.items()) + "}"


# `text` first: Slack and Mattermost show it; other receivers read the structured fields.
FAILURE_PAYLOAD = _json_template({
    "text": '"Malaria pipeline: flow run " ~ event.resource.name ~ " of " ~ deployment.name'
            ' ~ " is " ~ event.resource["prefect.state-name"] ~ ". " ~ ((flow_run | ui_url) or "")',
    "kind": '"flow-run-failure"',
    "flow_run": "event.resource.name",
    "flow_run_id": "flow_run.id | string",
    "state": 'event.resource["prefect.state-name"]',
    "deployment": "deployment.name",
    "flow": "flow.name",
    "url": "flow_run | ui_url",
    "at": "event.occurred | string",
})
DRIFT_PAYLOAD = _json_template({
    "text": '"Malaria scoring drift with model " ~ event.payload.version ~ ": "'
            ' ~ event.payload.message ~ " (" ~ event.payload.cells ~ " cells, run "'
            ' ~ flow_run.name ~ "). " ~ (flow_run | ui_url)',
    "kind": '"scoring-drift"',
    "model_version": "event.payload.version",
    "message": "event.payload.message",
    "cells": "event.payload.cells",
    "psi": "event.payload.psi",
    "positive_rate": "event.payload.positive_rate",
    "reference_positive_rate": "event.payload.reference_positive_rate",
    "flow_run": "flow_run.name",
    "url": "flow_run | ui_url",
    "at": "event.occurred | string",
})
PARASITEMIA_PAYLOAD = _json_template({
    "text": '"Malaria slide " ~ event.payload.slide ~ ": parasitemia "'
            ' ~ event.payload.previous_parasitemia_pct ~ "% -> " ~ event.payload.parasitemia_pct'
            ' ~ "% after re-scoring with " ~ event.payload.model_version ~ " (run "'
            ' ~ flow_run.name ~ "). " ~ (flow_run | ui_url)',
    "kind": '"parasitemia-changed"',
    "slide": "event.payload.slide",
    "parasitemia_pct": "event.payload.parasitemia_pct",
    "previous_parasitemia_pct": "event.payload.previous_parasitemia_pct",
    "shift_pp": "event.payload.shift_pp",
    "model_version": "event.payload.model_version",
    "previous_model_version": "event.payload.previous_model_version",
    "flow_run": "flow_run.name",
    "url": "flow_run | ui_url",
    "at": "event.occurred | string",
})


def notification_automations(block_id: object) -> list[Automation]:
    """The three server-side notifications, each calling the webhook block."""
    def automation(name: str, description: str, trigger: EventTrigger,
                   payload: str) -> Automation:
        return Automation(name=name, description=description, trigger=trigger,
                          actions=[CallWebhook(block_document_id=block_id, payload=payload)])

    return [
        automation(
            NOTIFY_FAILURE, "A pipeline flow run failed, crashed or timed out: post it to "
            f"the webhook block {WEBHOOK_BLOCK}.",
            EventTrigger(expect={f"prefect.flow-run.{s}" for s in FAILURE_STATES},
                         match={"prefect.resource.id": "prefect.flow-run.*"},
                         match_related={"prefect.resource.id": f"prefect.tag.{PIPELINE_TAG}"},
                         posture=Posture.Reactive, threshold=1),
            FAILURE_PAYLOAD),
        automation(
            NOTIFY_DRIFT, "Scores drifted from the champion's validation slides "
            f"({SCORING_DRIFT}): post it to the webhook block {WEBHOOK_BLOCK}.",
            EventTrigger(expect={SCORING_DRIFT},
                         match={"prefect.resource.id": "malaria.model.*"},
                         posture=Posture.Reactive, threshold=1),
            DRIFT_PAYLOAD),
        automation(
            NOTIFY_PARASITEMIA, "A re-scored slide's parasitemia moved "
            f"({PARASITEMIA_CHANGED}): post it to the webhook block {WEBHOOK_BLOCK}.",
            EventTrigger(expect={PARASITEMIA_CHANGED},
                         match={"prefect.resource.id": "malaria.slide.*"},
                         posture=Posture.Reactive, threshold=1),
            PARASITEMIA_PAYLOAD),
    ]


def ensure_notifications(url: str | None = None) -> dict[str, str]:
    """With a webhook URL (argument or $MALARIA_ALERT_WEBHOOK_URL): save the webhook block
    and (re)create the notification automations; returns {name: id}. Without one: nothing
    (an earlier deploy's block and automations stay as they are)."""
    url = url or os.environ.get(WEBHOOK_ENV) or None
    if not url:
        return {}
    block_id = save_webhook_block(url)
    created = {}
    for automation in notification_automations(block_id):
        # Replaced whole on every deploy, like the deployments' own triggers: a template or
        # trigger changed in this file takes effect.
        with contextlib.suppress(ValueError, ObjectNotFound):
            Automation.read(name=automation.name).delete()
        created[automation.name] = str(automation.create().id)
    return created


def trigger_automations(deployment: str = "score/bulk-scoring") -> list[str]:
    """The automations `prefect deploy` made from a deployment's `triggers:`."""
    with get_client(sync_client=True) as client:
        target = client.read_deployment_by_name(deployment)
        return sorted(a.name for a in client.read_resource_related_automations(
            f"prefect.deployment.{target.id}"))


def deploy_local(cfg: StackConfig, *, start_workers: bool = True) -> dict[str, object]:
    ensure_pools()
    timezone = ensure_timezone_variable()
    deployments = deploy_all()
    automation = ensure_failure_automation()
    notifications = ensure_notifications()
    workers = {pool: start_worker(cfg, pool, cwd=PROJECT_DIR) for pool in POOLS} \
        if start_workers else {}
    return {"pools": list(POOLS), "timezone": timezone, "deployments": deployments,
            "automation": automation, "notifications": notifications,
            "scoring_triggers": trigger_automations(),
            "workers": workers}


# --------------------------------------------------------------------------------- the demo


def upload_demo_data(data_url: str, *, labelled: int, slides: int, seed: int,
                     real_data: Path | None, scan_slides: dict[int, float],
                     cells_per_scan: int) -> dict[str, int]:
    """Synthetic (or real) labelled cells plus the bad-input corpus into incoming/, and
    synthetic new scans into scans/<slide>/; both announced as Prefect events (new scans
    start bulk-scoring once it is deployed)."""
    import tempfile

    from malaria.core import layout
    from malaria.io.store import open_store
    from malaria_dev import datasets
    from malaria_dev.synthetic import bad_inputs, generate_scan_cells, write_labelled_tree

    store = open_store(data_url)
    with tempfile.TemporaryDirectory() as folder:
        source = real_data or Path(folder)
        if real_data is None:
            write_labelled_tree(source, labelled, slides=slides, seed=seed)
        uploaded = datasets.upload_tree(source, data_url, progress=False)
    bad = [] if real_data else bad_inputs()
    for item in bad:
        store.put_bytes(f"{layout.INCOMING}demo-bad/{item.key}", item.data)
    scans = 0
    for slide, fraction in scan_slides.items():
        for cell in generate_scan_cells(cells_per_scan, slide_id=slide, seed=seed,
                                        parasitized_fraction=fraction):
            store.put_bytes(layout.scan_key(str(slide), cell.file_name), cell.data)
            scans += 1
    emit_cells_uploaded(data_url, uploaded.uploaded + len(bad), layout.INCOMING)
    if scans:
        emit_scans_uploaded(data_url, scans, layout.SCANS, [str(s) for s in scan_slides])
    flush_events()
    return {"labelled": uploaded.uploaded, "bad": len(bad), "scan_cells": scans,
            "scan_slides": len(scan_slides)}


def run_and_wait(name: str, parameters: dict[str, object] | None = None,
                 timeout: float = 900) -> tuple[str, str, str]:
    """Trigger a deployment through the server (a worker picks it up) and wait for it."""
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters=parameters or {}, timeout=timeout)
    state = run.state.type.value if run.state else "UNKNOWN"
    return run.name, state, (run.state.message or "") if run.state else ""
