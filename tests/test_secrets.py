"""Secrets never reach a log, an artifact, a manifest, an alert or a CSV.

Unit tests of ``redact`` over every credential input, then one end-to-end run: a small
``malaria demo`` on its own stack with a recognisable secret planted in every credential
input (the S3 key pair and the Prefect auth string in stack.env, the alert webhook's token in
the environment), a failed run so the failure alert posts to the webhook (which answers 500,
so httpx raises an error naming the URL), then a search of everything the run left: zero hits.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from malaria.core import settings
from malaria.core.settings import redact

PROJECT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- unit tests


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    token = secrets.token_hex(4)
    values = {
        "AWS_ACCESS_KEY_ID": f"PLANTEDAK{token.upper()}XYZ",
        "AWS_SECRET_ACCESS_KEY": f"planted-aws-secret-{token}",
        "PREFECT_API_AUTH_STRING": f"malaria:planted-auth-{token}",
        "PREFECT_SERVER_API_AUTH_STRING": f"malaria:planted-server-auth-{token}",
        "MALARIA_ALERT_WEBHOOK_URL": f"https://hooks.example.org/services/T0/B0/planted{token}",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    state = tmp_path / "state"
    state.mkdir()
    stack_only = f"planted-stack-env-secret-{token}"
    other = f"planted-unnamed-stack-value-{token}"  # any stack.env value counts
    (state / "stack.env").write_text(f"# secrets\nAWS_SECRET_ACCESS_KEY={stack_only}\n"
                                     f"MALARIA_SOMETHING={other}\n"
                                     "AWS_ENDPOINT_URL=http://127.0.0.1:8333\n")
    monkeypatch.setenv("MALARIA_STATE_DIR", str(state))
    return {**values, "STACK_ENV_SECRET": stack_only, "STACK_ENV_OTHER": other}


def test_redact_covers_every_credential_input(planted: dict[str, str]) -> None:
    for name, value in planted.items():
        assert value not in redact(f"before {value} after"), name
    auth = planted["PREFECT_API_AUTH_STRING"]
    header = "Authorization: Basic " + base64.b64encode(auth.encode()).decode()
    assert base64.b64encode(auth.encode()).decode() not in redact(header)
    # Ordinary settings stay readable.
    assert redact("endpoint http://127.0.0.1:8333 region us-east-1") == (
        "endpoint http://127.0.0.1:8333 region us-east-1")


def test_redact_removes_url_credentials_anywhere() -> None:
    text = redact("failed: https://user:hunter2secret@example.org/path")
    assert "hunter2secret" not in text and "example.org/path" in text


def test_a_webhook_error_is_logged_without_its_token(planted: dict[str, str]) -> None:
    """The error httpx raises for a failed webhook POST names the full URL (the token is in
    its path): what flows/alerts.py logs is that error through redact()."""
    url = planted["MALARIA_ALERT_WEBHOOK_URL"]
    request = httpx.Request("POST", url)
    error = httpx.HTTPStatusError("Server error '500 Internal Server Error' for url "
                                  f"'{request.url}'", request=request,
                                  response=httpx.Response(500, request=request))
    token = url.rsplit("/", 1)[-1]
    assert token in str(error)
    assert token not in redact(str(error)) and "/services/" not in redact(str(error))
    assert token not in redact(repr(error))


def test_secret_values_reads_stack_env(planted: dict[str, str]) -> None:
    assert planted["STACK_ENV_SECRET"] in settings.secret_values()
    assert "http://127.0.0.1:8333" not in settings.secret_values()


# ---------------------------------------------------------------------- end to end, demo


class _Webhook(http.server.BaseHTTPRequestHandler):
    """A webhook that fails: httpx's raise_for_status then names the URL in its error."""

    posted: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Webhook.posted.append(self.path)
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _plant_stack_credentials(cfg: object, token: str) -> dict[str, str]:
    """An S3 identity and a Prefect auth string that are easy to search for, written where
    `malaria stack up` keeps them (it keeps both once they exist)."""
    from malaria.io.atomic import write_atomic
    from malaria_dev.stack import StackConfig
    from malaria_dev.stack.credentials import PRIVATE, write_env_file

    assert isinstance(cfg, StackConfig)
    access = f"PLANTED{token.upper()}"[:20].ljust(20, "Q")
    secret = f"plantedS3secret{token}"
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    doc = {"identities": [{"name": "malaria",
                           "credentials": [{"accessKey": access, "secretKey": secret}],
                           "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
    write_atomic(cfg.identities_file, json.dumps(doc), mode=PRIVATE)
    write_env_file(cfg)
    auth = f"malaria:plantedPrefectAuth{token}"
    lines = [f"PREFECT_API_AUTH_STRING={auth}" if line.startswith("PREFECT_API_AUTH_STRING=")
             else line for line in cfg.env_file.read_text().splitlines()]
    write_atomic(cfg.env_file, "\n".join(lines) + "\n", mode=PRIVATE)
    return {"s3 access key (stack.env)": access, "s3 secret key (stack.env)": secret,
            "prefect auth string (stack.env)": auth,
            "prefect auth, base64 (Basic header)": base64.b64encode(auth.encode()).decode()}


def _everything_the_run_left(cfg: object, outputs: str) -> dict[str, str]:
    """Every log line, artifact, flow-run state message, bucket object that is text, and
    local log file, as text keyed by where it came from."""
    from malaria_dev.stack import StackConfig, prefect_api_client, stack_s3_client

    assert isinstance(cfg, StackConfig)
    found: dict[str, str] = {"demo output": outputs}
    with prefect_api_client(cfg) as api:
        offset = 0
        while True:
            logs = api.post("/logs/filter", json={"offset": offset, "limit": 200}).json()
            found.update({f"log {offset + i}": log["message"] for i, log in enumerate(logs)})
            if len(logs) < 200:
                break
            offset += 200
        for i, artifact in enumerate(api.post("/artifacts/filter", json={}).json()):
            found[f"artifact {artifact.get('key')} {i}"] = json.dumps(artifact)
        for run in api.post("/flow_runs/filter", json={}).json():
            found[f"flow run {run['name']}"] = json.dumps(
                {"state": run.get("state"), "parameters": run.get("parameters")})
    s3 = stack_s3_client(cfg)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=cfg.bucket)
    for page in pages:
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith((".csv", ".json", ".md", ".txt", ".log")):
                body = s3.get_object(Bucket=cfg.bucket, Key=key)["Body"].read()
                found[f"s3://{cfg.bucket}/{key}"] = body.decode("utf-8", "replace")
    for path in (cfg.state_dir / "logs").glob("*.log"):
        found[str(path)] = path.read_text(errors="replace")
    return found


@pytest.mark.integration
def test_no_planted_secret_in_anything_a_demo_run_leaves(tmp_path: Path, webhook: str) -> None:
    from malaria_dev.stack import StackConfig, stack_down, stack_env

    token = secrets.token_hex(6)
    cfg = StackConfig.with_free_ports(tmp_path / "state")
    planted = _plant_stack_credentials(cfg, token)
    hook_token = f"plantedWebhookToken{token}"
    hook_url = f"{webhook}/services/T0/B0/{hook_token}"
    planted["webhook token (env)"] = hook_token
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(cfg.to_env())
    env.update({"MALARIA_ALERT_WEBHOOK_URL": hook_url, "PREFECT_WORKER_QUERY_SECONDS": "2",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2"})
    try:
        demo = subprocess.run(
            [sys.executable, "-m", "malaria_cli.main", "demo", "--n", "80", "--slides", "4",
             "--epochs", "2", "--minutes", "0.5", "--scan-cells", "20"],
            cwd=PROJECT, env=env, text=True, capture_output=True, timeout=900, check=False)
        # Kept small, the demo's model may miss the promotion gate (then its scoring run
        # fails: no champion). Training must have run; the champion is then promoted here,
        # as an operator would, and scoring runs again so predictions exist to search.
        assert "nightly-retrain" in demo.stdout and ": COMPLETED" in demo.stdout, (
            demo.stdout[-3000:] + demo.stderr[-3000:])
        client_env = {**env, **stack_env(cfg)}
        code = ("import json, os, time\n"
                "from deployments.local import run_and_wait\n"
                "from malaria.io.store import open_store\n"
                "from malaria.registry.registry import ModelRegistry\n"
                "registry = ModelRegistry(open_store(os.environ['MALARIA_DATA_URL']))\n"
                "if registry.champion_version() is None:\n"
                "    registry.promote(registry.versions()[-1], reason='secrets test')\n"
                "    print(json.dumps(run_and_wait('score/bulk-scoring', timeout=300)))\n"
                # A failed run: the automation starts failure-alert, which posts to the webhook.
                "print(json.dumps(run_and_wait('ingest/ingest', "
                "{'data_url': 's3://no-such-bucket-for-secrets'}, timeout=300)))\n"
                "from prefect.client.orchestration import get_client\n"
                "from prefect.client.schemas.filters import DeploymentFilter, "
                "DeploymentFilterName\n"
                "deadline = time.monotonic() + 300\n"
                "while time.monotonic() < deadline:\n"
                "    with get_client(sync_client=True) as c:\n"
                "        runs = c.read_flow_runs(deployment_filter=DeploymentFilter("
                "name=DeploymentFilterName(any_=['failure-alert'])))\n"
                "    if runs and all(r.state and r.state.is_final() for r in runs): break\n"
                "    time.sleep(2)\n"
                "print('alert runs', [r.state.type.value for r in runs if r.state])\n")
        failed = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=client_env,
                                text=True, capture_output=True, timeout=700, check=False)
        assert failed.returncode == 0, failed.stdout[-3000:] + failed.stderr[-3000:]
        assert "COMPLETED" in failed.stdout.splitlines()[-1], failed.stdout
        assert "FAILED" not in failed.stdout.splitlines()[-1], failed.stdout
        assert _Webhook.posted, "the failure alert never posted to the webhook"

        everything = _everything_the_run_left(
            cfg, demo.stdout + demo.stderr + failed.stdout + failed.stderr)
        # The search covers what it should: the server's own log (where it called the
        # failing webhook through the Webhook block), manifests, CSVs and alerts.
        assert any(key.endswith("prefect.log") for key in everything)
        assert any(k.startswith(f"s3://{cfg.bucket}/manifests/") for k in everything)
        assert any(k.startswith(f"s3://{cfg.bucket}/alerts/") for k in everything)
        assert any(k.startswith(f"s3://{cfg.bucket}/predictions/") for k in everything)
        hits = {name: [where for where, text in everything.items() if value in text]
                for name, value in planted.items()}
        table = "\n".join(f"{name:40s} {len(where)} hits {where[:3]}"
                          for name, where in hits.items())
        print(f"secrets planted and searched in {len(everything)} texts:\n{table}")
        assert all(not where for where in hits.values()), table
    finally:
        stack_down(cfg)
