"""Nightly retraining: ingest -> train -> evaluate -> gate -> report, as one parent flow whose
steps show as subflows in the UI. A promoted model serves the next scoring run."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.runtime import deployment, flow_run

from flows.ingest import ingest_flow
from flows.train import train_flow
from malaria.core import defaults, layout
from malaria.core.settings import data_url as resolve_data_url
from malaria.ingest.manifest import new_run_id
from malaria.io.store import get_json, open_store
from tasks.notify import use_credentials_block
from tasks.reports import publish_cell_gifs, publish_nightly_report

INGEST_DEPLOYMENT = "ingest/ingest"


def ingest_elsewhere(deployment: str, data_url: str) -> dict[str, Any]:
    """Run the ingest deployment (a child of this run in the UI), wait, and read its counts
    from the bucket: a deployment run's return value does not travel between workers."""
    run_id = new_run_id()
    child = run_deployment(deployment, parameters={"data_url": data_url, "run_id": run_id},
                           timeout=defaults.INGEST_RUN_TIMEOUT_S)
    state = child.state
    if state is None or not state.is_completed():
        raise RuntimeError(f"ingest run {child.name} ended {state.name if state else 'unknown'}"
                           f": {state.message if state else ''}")
    return dict(get_json(open_store(data_url), layout.manifest_summary_key(run_id)))


def nightly_run_name() -> str:
    """``nightly-2026-11-29``: the night it was scheduled for (or started, when run by hand)."""
    start = flow_run.get_scheduled_start_time()
    return f"nightly-{start:%Y-%m-%d}" if start else "nightly"


@flow(name="nightly", description="Ingest new labelled cells, retrain, evaluate by slide, "
      "promote only a model at least as good as the champion, and report.",
      timeout_seconds=defaults.NIGHTLY_FLOW_TIMEOUT_S, flow_run_name=nightly_run_name)
def nightly_flow(data_url: str | None = None, arch: str = defaults.DEFAULT_ARCH,
                 input_size: int | None = None, epochs: int = defaults.TRAIN_EPOCHS,
                 max_minutes: float | None = defaults.NIGHTLY_TRAIN_MINUTES,
                 seed: int = defaults.TRAIN_SEED, tta: bool | int = defaults.TEST_TIME_AUGMENTATION,
                 batch_size: int = defaults.TRAIN_BATCH_SIZE, gif_cells: int = 100,
                 min_auc: float = defaults.GATE_MIN_AUC,
                 min_accuracy: float = defaults.GATE_MIN_ACCURACY,
                 require_approval: bool = False,
                 ingest_deployment: str | None = INGEST_DEPLOYMENT) -> dict[str, Any]:
    """``require_approval``: the train subflow pauses for a person before it promotes (see
    flows.train); resume that subflow run, not this one. ``ingest_deployment``: when this
    run is itself a deployment's, ingest runs as that deployment (on the CPU pool, not in
    this GPU job) and this run waits for it; otherwise (by hand, tests, or None) in
    process, as a subflow."""
    use_credentials_block()  # a named AwsCredentials block, else the environment
    data_url = resolve_data_url(data_url)
    if ingest_deployment and deployment.get_id():
        ingested = ingest_elsewhere(ingest_deployment, data_url)
    else:
        ingested = ingest_flow(data_url=data_url)
    has_data = next(iter(open_store(data_url).list(layout.DATASET)), None) is not None
    trained = None
    if has_data:
        trained = train_flow(data_url=data_url, arch=arch, input_size=input_size, epochs=epochs,
                             max_minutes=max_minutes, seed=seed, tta=tta,
                             batch_size=batch_size, min_auc=min_auc,
                             min_accuracy=min_accuracy, require_approval=require_approval)
    else:
        get_run_logger().warning("dataset/ is empty: nothing to train on tonight")
    gifs = publish_cell_gifs(data_url, f"nightly-{flow_run.get_id() or 'local'}", gif_cells)
    publish_nightly_report(ingested, trained, gifs)
    return {"ingest": ingested, "training": trained, "gifs": gifs}
