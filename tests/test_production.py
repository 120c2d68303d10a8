"""Production path end to end: the local stack (real SeaweedFS + Prefect server), `malaria
deploy` (work pools, deployments from prefect.yaml, automation, workers), deployment runs of
ingest, nightly retraining (tiny) and bulk scoring through the server and its workers; then a
real headless Chromium looks at the Prefect UI.

Everything Prefect-side runs in subprocesses against this test's own server (not the
session's test harness); the assertions read the server's REST API and the bucket.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from malaria.core import layout
from malaria.io.store import S3Store, get_csv, reset_clients
from malaria_dev.stack import StackConfig, prefect_api_client, stack_down, stack_env, stack_up
from malaria_dev.synthetic import generate_cells, generate_scan_cells

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parent.parent
SCREENSHOTS = PROJECT / "out" / "browser-test"
CHROMIUM = "/usr/bin/chromium"


@dataclass
class Production:
    cfg: StackConfig
    env: dict[str, str]
    api: str
    ui: str
    store: S3Store
    runs: dict[str, dict[str, Any]]


def _client_env(cfg: StackConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(stack_env(cfg))
    env.update({"MALARIA_STATE_DIR": str(cfg.state_dir), "PREFECT_WORKER_QUERY_SECONDS": "2",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2"})
    for name, port in cfg.weed_ports().items():
        if name != "admin_grpc_port":
            env[f"MALARIA_{name.upper()}"] = str(port)
    env["MALARIA_PREFECT_PORT"] = str(cfg.prefect_port)
    return env


def _python(env: dict[str, str], code: str, timeout: float = 600) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=env, text=True,
                            capture_output=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _run_deployment(env: dict[str, str], name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    out = _python(env, "import json; from deployments.local import run_and_wait; "
                  f"print(json.dumps(run_and_wait({name!r}, {parameters!r}, timeout=500)))")
    run_name, state, message = json.loads(out.strip().splitlines()[-1])
    return {"name": run_name, "state": state, "message": message}


def _triggered_run(cfg: StackConfig, deployment: str, timeout: float = 500
                   ) -> dict[str, Any]:
    """The first run of ``deployment`` that an automation created (not the scheduler's),
    once it has finished: its name, state and message, as ``_run_deployment`` gives them."""
    import time

    with prefect_api_client(cfg) as api:
        flow_name, name = deployment.split("/")
        deployment_id = api.get(f"/deployments/name/{flow_name}/{name}").json()["id"]
        deadline = time.monotonic() + timeout
        while True:
            runs = api.post("/flow_runs/filter", json={
                "deployments": {"id": {"any_": [deployment_id]}},
                "sort": "EXPECTED_START_TIME_ASC"}, timeout=30).json()
            triggered = [r for r in runs if not r.get("auto_scheduled")]
            state = triggered[0].get("state") or {} if triggered else {}
            if state.get("type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return {"name": triggered[0]["name"], "state": state["type"],
                        "message": state.get("message") or ""}
            if time.monotonic() > deadline:
                pytest.fail(f"no triggered {deployment} run finished within {timeout} s: "
                            f"{[(r['name'], (r.get('state') or {}).get('type')) for r in runs]}")
            time.sleep(2)


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Production]:
    cfg = StackConfig.with_free_ports(tmp_path_factory.mktemp("prod"))
    status = stack_up(cfg)
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    try:
        env = _client_env(cfg)
        creds = stack_env(cfg)
        reset_clients()
        store = S3Store(cfg.bucket, endpoint_url=creds["AWS_ENDPOINT_URL"])
        os.environ["AWS_ACCESS_KEY_ID"] = creds["AWS_ACCESS_KEY_ID"]
        os.environ["AWS_SECRET_ACCESS_KEY"] = creds["AWS_SECRET_ACCESS_KEY"]
        uploads = {f"incoming/{c.class_name}/{c.file_name}": c.data
                   for c in generate_cells(240, slides=6, seed=31)}
        for slide in (401, 402):
            uploads.update({layout.scan_key(str(slide), c.file_name): c.data
                            for c in generate_scan_cells(40, slide_id=slide, seed=slide)})
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda kv: store.put_bytes(*kv), uploads.items()))

        deployed = subprocess.run([sys.executable, "-m", "malaria_cli.main", "deploy"], cwd=PROJECT,
                                  env=env, text=True, capture_output=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        runs = {
            "ingest": _run_deployment(env, "ingest/ingest", {}),
            "nightly": _run_deployment(env, "nightly/nightly-retrain", {
                "arch": "cellnet-tiny", "input_size": 48, "epochs": 4, "batch_size": 16,
                "tta": False, "max_minutes": 2, "gif_cells": 10,
                # The pipeline is under test here, not accuracy: the first model serves.
                "min_auc": 0.0, "min_accuracy": 0.0}),
        }
        if not store.exists(layout.CHAMPION_KEY):  # say why before scoring fails on it
            gates = [i.key for i in store.list(layout.MODELS) if i.key.endswith("gate.json")]
            pytest.fail(f"nightly promoted nothing: {[store.get_bytes(k) for k in gates]}")
        # The promotion's event starts bulk-scoring through the deployment's trigger (the
        # hourly schedule is only the backstop): wait for that run instead of starting one.
        runs["scoring"] = _triggered_run(cfg, "score/bulk-scoring")
        yield Production(cfg, env, status.prefect_api_url, status.ui_url, store, runs)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_clients()
        stack_down(cfg)


def test_a_failed_run_raises_an_alert(production: Production) -> None:
    """The automation turns a failed pipeline run into a failure-alert run, which records
    the failure in the bucket (and would POST it to $MALARIA_ALERT_WEBHOOK_URL)."""
    import time

    failed = _run_deployment(production.env, "ingest/ingest",
                             {"data_url": "s3://no-such-bucket-for-this-test"})
    assert failed["state"] == "FAILED" and "NoSuchBucket" in failed["message"]
    deadline = time.monotonic() + 180
    alerts: list[str] = []
    while time.monotonic() < deadline and not alerts:
        alerts = [i.key for i in production.store.list("alerts/")]
        time.sleep(2)
    assert alerts, "no alert recorded within 3 minutes"
    alert = json.loads(production.store.get_bytes(alerts[0]))
    assert alert["flow_run_name"] == failed["name"] and alert["deployment"] == "ingest"
    assert alert["state"] == "FAILED"


def _api(production: Production) -> httpx.Client:
    """The server wants its auth string (and a CSRF token on POSTs): stack.env has it."""
    return prefect_api_client(production.cfg)


def _flow_runs(production: Production) -> list[dict[str, Any]]:
    response = _api(production).post("/flow_runs/filter", json={"limit": 200})
    response.raise_for_status()
    return response.json()


def test_deployments_pools_and_schedules(production: Production) -> None:
    deployments = _api(production).post("/deployments/filter", json={},
                             timeout=30).json()
    by_name = {d["name"]: d for d in deployments}
    assert set(by_name) >= {"nightly-retrain", "bulk-scoring", "ingest", "failure-alert"}
    assert by_name["nightly-retrain"]["work_pool_name"] == "gpu-training"
    assert by_name["bulk-scoring"]["work_pool_name"] == "cpu-scoring"
    nightly = by_name["nightly-retrain"]["schedules"][0]["schedule"]
    assert nightly["cron"] == "0 2 * * *" and nightly["timezone"] == "UTC"
    assert by_name["bulk-scoring"]["schedules"][0]["schedule"]["interval"] == 3600
    pools = {p["name"]: p for p in _api(production).post("/work_pools/filter", json={},
                                              timeout=30).json()}
    assert {pools["gpu-training"]["type"], pools["cpu-scoring"]["type"]} == {"process"}
    automations = _api(production).post("/automations/filter", json={},
                             timeout=30).json()
    assert {"malaria-pipeline-failure", "bulk-scoring-on-promotion",
            "bulk-scoring-on-new-scans"} <= {a["name"] for a in automations}


def test_runs_through_workers_complete(production: Production) -> None:
    for name, run in production.runs.items():
        assert run["state"] == "COMPLETED", (name, run)
    runs = _flow_runs(production)
    by_name = {r["name"]: r for r in runs}
    nightly = by_name[production.runs["nightly"]["name"]]
    assert nightly["deployment_id"] and nightly["work_pool_name"] == "gpu-training"
    # ingest and train ran as subflows of the nightly run.
    children = _api(production).post("/flow_runs/filter", json={
        "flow_runs": {"parent_flow_run_id": {"operator": "and_", "any_": [nightly["id"]]}}},
        timeout=30).json()
    flows = {_api(production).get(f"/flows/{r['flow_id']}").json()["name"]
             for r in children}
    assert flows >= {"ingest", "train"}
    summary = _api(production).post("/artifacts/filter", timeout=30, json={
        "artifacts": {"key": {"any_": ["score-summary"]}}, "limit": 1}).json()[0]
    assert "Drift against the champion's validation slides" in summary["data"]
    assert "no reference" not in summary["data"]


def test_bucket_holds_what_the_runs_wrote(production: Production) -> None:
    store = production.store
    assert len(list(store.list("dataset/"))) == 240
    champion = json.loads(store.get_bytes(layout.CHAMPION_KEY))
    assert store.exists(layout.model_prefix(champion["version"]) + "model.keras")
    summary = get_csv(store, layout.PREDICTION_SUMMARY_KEY)
    assert sorted(summary.slide.astype(str)) == ["401", "402"]
    for slide in ("401", "402"):
        rows = get_csv(store, layout.prediction_key(slide))
        assert len(rows) == 40 and set(rows.model_version) == {champion["version"]}
    assert [i.key for i in store.list("reports/") if i.key.endswith(".gif")]


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed by the test setup when missing (Playwright's own browser
    download cannot work without the network)."""
    if not Path(CHROMIUM).exists() and shutil.which("apt-get") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(install, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=600)
            subprocess.run(install, capture_output=True, timeout=900)
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed and could not be installed with apt-get")
    return CHROMIUM


def test_prefect_ui_shows_runs_and_training_report(production: Production, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    nightly_name = production.runs["nightly"]["name"]
    # Run names say what ran: the night it was for, how many slides were scored.
    assert re.fullmatch(r"nightly-\d{4}-\d{2}-\d{2}", nightly_name), nightly_name
    assert re.fullmatch(r"score-\d+-slides", production.runs["scoring"]["name"]), \
        production.runs["scoring"]["name"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-quic",
                  "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            # The UI asks for the API's auth string first (the server requires it).
            page.goto(f"{production.ui}/runs", wait_until="domcontentloaded")
            password = page.locator("input[type=password]")
            password.wait_for(timeout=60_000)
            password.fill(production.env["PREFECT_API_AUTH_STRING"])
            page.get_by_role("button", name="Login").click()
            page.goto(f"{production.ui}/runs", wait_until="domcontentloaded")
            page.get_by_text(nightly_name).first.wait_for(timeout=60_000)
            page.screenshot(path=str(SCREENSHOTS / "runs.png"), full_page=True)

            page.goto(f"{production.ui}/artifacts", wait_until="domcontentloaded")
            page.get_by_text("training-report").first.wait_for(timeout=60_000)
            page.screenshot(path=str(SCREENSHOTS / "artifacts.png"), full_page=True)

            report = _api(production).post("/artifacts/filter", timeout=30, json={
                "artifacts": {"key": {"any_": ["training-report"]}}, "limit": 1}).json()[0]
            page.goto(f"{production.ui}/artifacts/artifact/{report['id']}",
                      wait_until="domcontentloaded")
            page.get_by_text("Held-out test slides").first.wait_for(timeout=60_000)
            assert page.get_by_text("Gate:").first.is_visible()
            # The plots are in the report itself, and the browser draws them.
            page.wait_for_function(
                "() => Array.from(document.images).filter("
                "i => i.src.startsWith('data:image/png') && i.naturalWidth > 100).length >= 2",
                timeout=60_000)
            page.screenshot(path=str(SCREENSHOTS / "training-report.png"), full_page=True)

            gif = _api(production).post("/artifacts/filter", timeout=30, json={
                "artifacts": {"key": {"like_": "cell-gif-"}}, "limit": 1}).json()[0]
            page.goto(f"{production.ui}/artifacts/artifact/{gif['id']}",
                      wait_until="domcontentloaded")
            page.wait_for_function(
                "() => Array.from(document.images).some("
                "i => i.src.startsWith('data:image/gif') && i.naturalWidth > 0)",
                timeout=60_000)
            page.screenshot(path=str(SCREENSHOTS / "cell-gif.png"), full_page=True)
        finally:
            browser.close()
    assert (SCREENSHOTS / "training-report.png").stat().st_size > 10_000
