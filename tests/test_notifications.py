"""Server-side notifications and the morning digest, through the shared Prefect test server
(loopback only): `ensure_notifications` saves the webhook block and its automations; a
failed deployment run and a drift event each reach a local webhook from the server's own
automation loop (no worker); the digest flow summarises a seeded bucket; a named
AwsCredentials block reaches the S3 client factory."""

from __future__ import annotations

import http.server
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from digestbucket import digest_bucket

pytestmark = pytest.mark.integration


class _Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {"unparsable": body.decode("utf-8", "replace")}
        _Hook.received.append((self.path, payload))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def hook_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # The token in the path is what must never show: it stands for a Slack token.
        yield (f"http://127.0.0.1:{server.server_address[1]}/services/T0/B0/"
               f"plantedHookToken{secrets.token_hex(6)}")
    finally:
        server.shutdown()


def _posts(kind: str, at_least: int = 1, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [p for _, p in _Hook.received if p.get("kind") == kind]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.fixture(scope="module")
def notifications(prefect_harness: None, hook_url: str) -> Iterator[dict[str, str]]:
    import pytest as _pytest

    from deployments.local import ensure_notifications

    with _pytest.MonkeyPatch.context() as patch:
        patch.setenv("MALARIA_ALERT_WEBHOOK_URL", hook_url)
        first = ensure_notifications()
        created = ensure_notifications()  # a second deploy replaces, never duplicates
    assert set(first) == set(created)
    time.sleep(2)  # the server's trigger service loads new automations on its own clock
    yield created
    from prefect.automations import Automation

    for automation_id in created.values():
        Automation.read(id=uuid.UUID(automation_id)).delete()


def test_deploy_saves_the_block_without_showing_its_url(notifications: dict[str, str],
                                                        hook_url: str) -> None:
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client

    from tasks.notify import WEBHOOK_BLOCK, load_webhook_block

    token = hook_url.rsplit("/", 1)[-1]
    assert set(notifications) == {"malaria-notify-failure", "malaria-notify-drift",
                                  "malaria-notify-parasitemia-changed"}
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(WEBHOOK_BLOCK, "webhook",
                                                       include_secrets=False)
        # The API shows the URL obfuscated; only a reader asking for secrets sees it.
        assert token not in json.dumps(document.data, default=str)
        names = [a.name for a in client.read_automations()]
    for name in notifications:
        assert names.count(name) == 1
        automation = Automation.read(name=name)
        assert token not in automation.model_dump_json()
    block = load_webhook_block()
    assert block is not None and block.url.get_secret_value() == hook_url
    assert token not in repr(block) and token not in str(block.url)


def test_a_failed_deployment_run_is_posted_by_the_server(notifications: dict[str, str]
                                                         ) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("notify-test-flow")
        deployment_id = client.create_deployment(
            flow_id=flow_id, name=f"notify-{uuid.uuid4().hex[:6]}", tags=["malaria-pipeline"])
        run = client.create_flow_run_from_deployment(deployment_id)
        client.set_flow_run_state(run.id, Failed(message="boom"), force=True)
    posts = [p for p in _posts("flow-run-failure") if p.get("flow_run") == run.name]
    if not posts:  # other failures may have come first
        deadline = time.monotonic() + 60
        while not posts and time.monotonic() < deadline:
            time.sleep(0.5)
            posts = [p for _, p in _Hook.received
                     if p.get("kind") == "flow-run-failure" and p.get("flow_run") == run.name]
    assert posts, f"no webhook post for {run.name}: {_Hook.received}"
    [post] = posts[:1]
    assert post["state"] == "Failed" and post["deployment"].startswith("notify-")
    assert post["flow_run_id"] == str(run.id) and run.name in post["text"]
    assert "boom" not in json.dumps(post)  # state messages are never forwarded


def test_drift_and_parasitemia_events_are_posted_by_the_server(
        notifications: dict[str, str]) -> None:
    from prefect.events import emit_event

    from tasks.events import PARASITEMIA_CHANGED, emit_drift_flagged, flush_events

    version = f"drift-{uuid.uuid4().hex[:6]}"
    event = emit_drift_flagged(version, "DRIFT: positive rate 30.0% vs 5.0% on validation",
                               cells=1200, psi=float("nan"), positive_rate=0.3,
                               reference_positive_rate=0.05, data_url="s3://lab/out")
    assert event is not None and event.payload["psi"] is None
    emit_event(event=PARASITEMIA_CHANGED,
               resource={"prefect.resource.id": "malaria.slide.s-77"},
               payload={"slide": "s-77", "parasitemia_pct": 4.5,
                        "previous_parasitemia_pct": 1.5, "shift_pp": 3.0,
                        "model_version": "v2", "previous_model_version": "v1"})
    flush_events()
    drift = [p for p in _posts("scoring-drift") if p.get("model_version") == version]
    assert drift, _Hook.received
    assert drift[0]["cells"] == 1200 and "positive rate" in drift[0]["text"]
    changed = _posts("parasitemia-changed")
    assert changed and changed[0]["slide"] == "s-77" and changed[0]["shift_pp"] == 3.0


def test_the_digest_summarises_the_last_day(notifications: dict[str, str], tmp_path: Path,
                                            hook_url: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    from flows.digest import ARTIFACT_KEY, digest_flow

    token = hook_url.rsplit("/", 1)[-1]
    caplog.set_level(logging.DEBUG)
    # A failed deployment run of its own (untagged: the failure automation leaves it alone),
    # so the test does not lean on another test's run.
    deployment = f"digest-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(
            flow_id=client.create_flow_from_name("digest-test-flow"), name=deployment)
        run = client.create_flow_run_from_deployment(deployment_id)
        client.set_flow_run_state(run.id, Failed(message="boom"), force=True)
    digest_bucket(tmp_path / "bucket")
    result = digest_flow(data_url=str(tmp_path / "bucket"))
    assert result["webhook"] == "delivered", result
    assert result["models_registered"] == 1 and result["promotions"] == 1
    assert result["slides_scored"] == 2 and result["parasitemia_changes"] == 1
    assert result["ingest_runs"] == 1 and result["quarantined"] == 3
    assert result["runs"].get("Failed", 0) >= 1
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts(limit=50)
        [digest] = [a for a in artifact if a.key == ARTIFACT_KEY]
    markdown = str(digest.data)
    assert "slides scored: 2" in markdown and "quarantined: 3" in markdown
    assert "| unreadable_image | 2 |" in markdown and "`v-new`" in markdown
    assert f"| {deployment} |" in markdown and "boom" not in markdown
    [post] = _posts("morning-digest")
    assert post["counts"]["slides_scored"] == 2 and post["text"] == markdown
    assert token not in markdown and token not in caplog.text


def test_a_named_credentials_block_reaches_the_s3_clients(prefect_harness: None,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """An AwsCredentials block (prefect-aws's block type, saved here as a plain document:
    prefect-aws is not a dependency) gives the clients its key, region and endpoint."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        BlockDocumentCreate,
        BlockSchemaCreate,
        BlockTypeCreate,
    )

    from malaria.io import s3
    from tasks.notify import AWS_CREDENTIALS_TYPE, use_credentials_block

    name = f"lab-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        try:
            block_type = client.read_block_type_by_slug(AWS_CREDENTIALS_TYPE)
        except Exception:
            block_type = client.create_block_type(BlockTypeCreate(
                name="AWS Credentials", slug=AWS_CREDENTIALS_TYPE))
        schema = client.create_block_schema(BlockSchemaCreate(
            block_type_id=block_type.id, fields={"title": "AwsCredentials", "type": "object",
                                                 "properties": {}}, capabilities=[]))
        client.create_block_document(BlockDocumentCreate(
            name=name, block_type_id=block_type.id, block_schema_id=schema.id,
            data={"aws_access_key_id": "AKIABLOCKKEY", "aws_secret_access_key": "block-secret",
                  "region_name": "eu-west-3",
                  "aws_client_parameters": {"endpoint_url": "http://127.0.0.1:9"}}))
    monkeypatch.setenv("MALARIA_AWS_CREDENTIALS_BLOCK", name)
    try:
        assert use_credentials_block() == name
        named = s3.explicit_credentials()
        assert named is not None and named.access_key == "AKIABLOCKKEY"
        assert "block-secret" not in repr(named)
        conn = s3.connection()
        assert conn.endpoint_url == "http://127.0.0.1:9" and conn.region == "eu-west-3"
        client = s3.s3_client()
        frozen = client._request_signer._credentials.get_frozen_credentials()
        assert (frozen.access_key, frozen.secret_key) == ("AKIABLOCKKEY", "block-secret")
        assert client.meta.region_name == "eu-west-3"
    finally:
        s3.use_credentials(None)
    assert s3.explicit_credentials() is None
