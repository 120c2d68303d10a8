"""Failure alerts: run by a Prefect automation when a pipeline flow run fails or crashes.

It records the failure in the bucket (alerts/<time>-<run>.json), leaves a markdown artifact
and logs an error. The notification itself is the server's: when `malaria deploy` saved the
webhook block, the automation ``malaria-notify-failure`` calls it with no worker involved
(deployments/local.py), and this flow posts nothing. Without the block it falls back to
POSTing the JSON to $MALARIA_ALERT_WEBHOOK_URL when the worker has that set. It never fails
itself: an alert about the alert would loop.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

import httpx
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client

from malaria.core import defaults, layout
from malaria.core.settings import data_url as resolve_data_url
from malaria.core.settings import redact
from malaria.io.store import open_store
from tasks.notify import load_webhook_block, use_credentials_block


def _failed_run(resource_id: str) -> dict[str, Any]:
    run_id = resource_id.removeprefix("prefect.flow-run.")
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        deployment = client.read_deployment(run.deployment_id).name if run.deployment_id else None
    return {"flow_run_id": run_id, "flow_run_name": run.name, "deployment": deployment,
            "state": run.state.type.value if run.state else None,
            "message": redact(run.state.message or "") if run.state else ""}


def _has_webhook_block() -> bool:
    try:
        return load_webhook_block() is not None
    except Exception:  # the API is unwell: fall back to the environment's webhook
        return False


@flow(name="failure-alert", description="Record and forward a pipeline failure.",
      timeout_seconds=defaults.ALERT_FLOW_TIMEOUT_S)
def failure_alert_flow(failed_run: str = "", data_url: str | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    now = datetime.now(UTC)
    alert: dict[str, Any] = {"at": now.isoformat(), "failed_run": failed_run}
    try:
        alert.update(_failed_run(failed_run))
    except Exception as error:  # the run may be gone; still raise the alarm
        alert["lookup_error"] = str(error)
    logger.error("pipeline failure: %s", json.dumps(alert))
    try:
        use_credentials_block()
        store = open_store(resolve_data_url(data_url))
        key = layout.alert_key(now, alert.get("flow_run_id", "x"))
        store.put_bytes(key, json.dumps(alert, indent=2).encode(),
                        content_type="application/json")
        alert["bucket_key"] = key
    except Exception as error:
        logger.error("could not record the alert in the bucket: %s", redact(str(error)))
    # The block's automation has notified already; posting here too would say it twice.
    webhook = None if _has_webhook_block() else os.environ.get("MALARIA_ALERT_WEBHOOK_URL")
    if webhook:
        try:
            httpx.post(webhook, json=alert, timeout=10).raise_for_status()
        except Exception as error:
            logger.error("webhook delivery failed: %s", redact(str(error)))
    create_markdown_artifact(
        key="failure-alert", description="A pipeline flow run failed",
        markdown=(f"# Pipeline failure\n\n- run: `{alert.get('flow_run_name')}` "
                  f"({alert.get('deployment')})\n- state: {alert.get('state')}\n"
                  f"- message: {alert.get('message')}\n- recorded: `{alert.get('bucket_key')}`\n"))
    return alert
