"""The deployment files are consistent, with no Docker, cluster or Prefect server: the base
job templates, the worker Dockerfile and deployments/prefect.yaml."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = ROOT / "deployments"
TEMPLATES = DEPLOYMENTS / "job-templates"
# The same pattern as prefect.utilities.templating.PLACEHOLDER_CAPTURE_REGEX.
PLACEHOLDER = re.compile(r"{{\s*([\w\.\-\[\]$]+)\s*}}")
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def load_template(name: str) -> dict[str, Any]:
    return json.loads((TEMPLATES / name).read_text())


def placeholders(value: Any) -> set[str]:
    return set(PLACEHOLDER.findall(json.dumps(value)))


def k8s_container(template: dict[str, Any]) -> dict[str, Any]:
    manifest = template["job_configuration"]["job_manifest"]
    return manifest["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", ["docker-gpu.json", "kubernetes-gpu.json"])
def test_template_placeholders_are_declared_variables(name: str) -> None:
    template = load_template(name)
    assert set(template) == {"job_configuration", "variables"}
    properties = template["variables"]["properties"]
    used = placeholders(template["job_configuration"])
    assert used, "a job configuration without placeholders ignores every job variable"
    # What Prefect's server checks when the pool is created (validate_base_job_template).
    assert used <= set(properties), f"undeclared: {sorted(used - set(properties))}"
    # Variable defaults may only point at Prefect Secret blocks, never at other variables.
    for placeholder in placeholders({k: v.get("default") for k, v in properties.items()}):
        assert placeholder.startswith("prefect.blocks.secret."), placeholder


def test_docker_template_requests_all_gpus_and_keeps_secrets_out() -> None:
    properties = load_template("docker-gpu.json")["variables"]["properties"]
    kwargs = properties["container_create_kwargs"]["default"]
    assert kwargs["device_requests"] == [
        {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    assert properties["image"]["default"].startswith("malaria-worker")
    env = properties["env"]["default"]
    for name in SECRET_NAMES:
        assert PLACEHOLDER.fullmatch(env[name]), f"{name} must come from a Secret block"


def test_kubernetes_template_requests_a_gpu_and_reads_credentials_from_a_secret() -> None:
    template = load_template("kubernetes-gpu.json")
    properties = template["variables"]["properties"]
    container = k8s_container(template)
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert template["job_configuration"]["job_manifest"]["kind"] == "Job"

    gpu = container["resources"]["limits"]["nvidia.com/gpu"]
    gpu_var = PLACEHOLDER.fullmatch(gpu).group(1) if isinstance(gpu, str) else None
    assert (properties[gpu_var]["default"] if gpu_var else gpu) == 1
    requests = container["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests)
    for key in ("cpu", "memory"):
        assert properties[PLACEHOLDER.fullmatch(requests[key]).group(1)]["default"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
        in pod["tolerations"]
    assert "nodeSelector" in pod

    env = {entry["name"]: entry for entry in container["env"]}
    for name in SECRET_NAMES:
        assert "value" not in env[name]
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == name and ref.get("optional") is not True
        secret = PLACEHOLDER.fullmatch(ref["name"])
        assert properties[secret.group(1)]["default"] if secret else ref["name"]
    # No literal credential anywhere: not in the manifest, not in a variable default.
    for entry in container["env"]:
        if any(word in entry["name"] for word in ("SECRET", "ACCESS_KEY", "TOKEN")):
            assert set(entry) == {"name", "valueFrom"}, entry["name"]
    defaults = json.dumps({k: v.get("default") for k, v in properties.items()})
    assert not any(name in defaults for name in SECRET_NAMES)


def test_worker_dockerfile_starts_a_worker_as_non_root() -> None:
    lines = [line.strip() for line in (DEPLOYMENTS / "Dockerfile.worker").read_text()
             .splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    cmd = json.loads(next(line for line in reversed(lines) if line.startswith("CMD"))[3:])
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert cmd[cmd.index("--pool") + 1] == "gpu-training"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    text = "\n".join(lines)
    assert "TF_CPP_MIN_LOG_LEVEL=2" in text
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in text
    assert re.search(r"pip install (-e )?\"?\.\[\$\{?EXTRAS\}?\]", text)
    assert "ARG EXTRAS=gpu" in text


def flow_functions(path: Path) -> set[str]:
    """Top-level functions of a module decorated with ``@flow`` or ``@flow(...)``."""
    def is_flow(decorator: ast.expr) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return isinstance(target, ast.Name) and target.id == "flow"

    return {node.name for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and any(is_flow(d) for d in node.decorator_list)}


def test_prefect_yaml_declares_the_deployments() -> None:
    config = yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) >= {"nightly-retrain", "bulk-scoring", "ingest", "failure-alert"}
    pools = {name: d["work_pool"]["name"] for name, d in deployments.items()}
    assert pools["nightly-retrain"] == "gpu-training"
    assert {pools[n] for n in ("bulk-scoring", "ingest", "failure-alert")} == {"cpu-scoring"}

    [nightly] = deployments["nightly-retrain"]["schedules"]
    assert nightly["cron"] == "0 2 * * *"
    assert nightly["timezone"] == "{{ prefect.variables.malaria_timezone }}"
    [hourly] = deployments["bulk-scoring"]["schedules"]
    assert hourly["interval"] == 3600
    assert not deployments["ingest"].get("schedules")
    assert not deployments["failure-alert"].get("schedules")
    [morning] = deployments["morning-digest"]["schedules"]
    assert morning["cron"] == "0 7 * * *"
    assert morning["timezone"] == "{{ prefect.variables.malaria_timezone }}"
    assert pools["morning-digest"] == "cpu-scoring"
    [weekly] = deployments["weekly-gc"]["schedules"]
    assert weekly["cron"] == "0 3 * * 0" and pools["weekly-gc"] == "cpu-scoring"
    assert weekly["timezone"] == "{{ prefect.variables.malaria_timezone }}"
    for name in ("nightly-retrain", "bulk-scoring", "ingest"):
        assert "malaria-pipeline" in deployments[name]["tags"]

    for name, deployment in deployments.items():
        path, function = deployment["entrypoint"].split(":")
        assert (ROOT / path).is_file(), f"{name}: {path} is missing"
        assert function in flow_functions(ROOT / path), f"{name}: no @flow {function} in {path}"


def defaults_of(path: Path, function: str) -> dict[str, str]:
    """Parameters of ``function`` whose default is a constant of malaria.core.defaults, with
    that default's source text (read with ast: importing a flow would import TensorFlow)."""
    tree = ast.parse(path.read_text())
    imported = {alias.asname or alias.name for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module == "malaria.core.defaults"
                for alias in node.names}
    modules = {alias.asname or alias.name for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.module == "malaria.core"
               for alias in node.names if alias.name == "defaults"}
    [definition] = [node for node in tree.body
                    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    and node.name == function]
    arguments = definition.args
    positional = arguments.posonlyargs + arguments.args
    pairs = [*zip(positional[len(positional) - len(arguments.defaults):], arguments.defaults,
                  strict=True),
             *((a, d) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
               if d is not None)]
    found = {}
    for argument, default in pairs:
        from_defaults = (isinstance(default, ast.Name) and default.id in imported) or (
            isinstance(default, ast.Attribute) and isinstance(default.value, ast.Name)
            and default.value.id in modules)
        if from_defaults:
            found[argument.arg] = ast.unparse(default)
    return found


def test_deployments_do_not_restate_product_defaults() -> None:
    """A default declared in malaria.core.defaults and repeated in prefect.yaml would drift
    from it the day one of them changes: the deployments let the flows' defaults apply."""
    config = yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())
    checked = 0
    for deployment in config["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        declared = defaults_of(ROOT / path, function)
        checked += len(declared)
        restated = {name: declared[name] for name in deployment.get("parameters") or {}
                    if name in declared}
        assert not restated, (f"{deployment['name']} restates {restated} "
                              "(declared in malaria/core/defaults.py)")
    assert checked, "no flow takes its defaults from malaria.core.defaults"


def test_bulk_scoring_runs_on_events_and_drops_a_run_that_would_queue() -> None:
    """Its triggers are valid Prefect deployment triggers on the events tasks/events.py
    emits, and a second run is cancelled rather than queued (CANCEL_NEW)."""
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    from tasks.events import SCORING_TRIGGERS

    config = yaml.safe_load((DEPLOYMENTS / "prefect.yaml").read_text())
    scoring = {d["name"]: d for d in config["deployments"]}["bulk-scoring"]
    assert scoring["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    triggers = _initialize_deployment_triggers("bulk-scoring", scoring["triggers"])
    assert sorted(e for t in triggers for e in t.expect) == sorted(SCORING_TRIGGERS)
    for trigger in triggers:
        assert trigger.enabled and trigger.parameters is None  # the deployment's own
        assert trigger.posture.value == "Reactive" and trigger.threshold == 1


@pytest.mark.parametrize("name", ["docker-gpu.json", "kubernetes-gpu.json"])
def test_flow_runs_send_the_domain_logs_to_the_ui(name: str) -> None:
    env = load_template(name)["variables"]["properties"]["env"]["default"]
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "malaria"
    assert "PREFECT_LOGGING_EXTRA_LOGGERS=malaria" in (
        DEPLOYMENTS / "Dockerfile.worker").read_text()


def test_notification_automations_are_valid_server_templates() -> None:
    """The webhook payload templates parse as the server parses them, and name no secret."""
    import uuid

    from prefect.server.events.actions import CallWebhook as ServerCallWebhook

    from deployments.local import notification_automations

    automations = notification_automations(uuid.uuid4())
    assert {a.name for a in automations} == {"malaria-notify-failure", "malaria-notify-drift",
                                             "malaria-notify-parasitemia-changed"}
    for automation in automations:
        [action] = automation.actions
        ServerCallWebhook(block_document_id=action.block_document_id, payload=action.payload)
        assert "message" not in action.payload or "event.payload.message" in action.payload
        assert "state.message" not in action.payload and "url }}" not in action.payload
    failure = next(a for a in automations if a.name == "malaria-notify-failure")
    assert failure.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed",
                                      "prefect.flow-run.TimedOut"}
