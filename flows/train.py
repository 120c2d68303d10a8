"""Train flow: load data -> train -> evaluate by slide -> register -> promotion gate.

When the dataset manifest and the settings equal those the champion was trained on, the
flow stops after loading the data and says so: a repeat would only churn the registry and
make every slide due again.

With ``require_approval`` the gate decides first and, when it would promote, the run pauses
with the comparison for a person: it promotes only if they approve, and ``gate.json`` says
who answered and what."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote
from pydantic import Field

from malaria.core import defaults
from malaria.core.settings import cache_dir as resolve_cache_dir
from malaria.core.settings import data_url as resolve_data_url
from malaria.io.store import open_store
from malaria.model.config import RetrainConfig
from malaria.registry.gate import GateDecision, comparison_markdown, with_approval
from malaria.registry.registry import ModelRegistry
from tasks.notify import use_credentials_block
from tasks.training import (
    check_repeat,
    decide_candidate,
    evaluate_on_test_slides,
    gate_candidate,
    load_training_data,
    publish_training_report,
    register_candidate,
    settle_candidate,
    train_candidate,
)


class PromotionApproval(RunInput):
    """The form a paused train run shows: promote the candidate or not, and who says so."""

    approve: bool = Field(default=False, description="Promote this candidate to serve.")
    approver: str = Field(default="", description="Your name, kept in the decision record.")
    note: str = Field(default="", description="Why (kept in the decision record).")


def ask_approval(data_url: str, version: str, decision: GateDecision,
                 timeout_s: int) -> GateDecision:
    """Pause this run until a person answers in the UI (or ``resume_flow_run`` with input);
    the gate's decision as they answered it. No answer in time: recorded as expired, and
    the run fails, as a pause that times out does."""
    run = str(flow_run.get_id() or "local")
    request = PromotionApproval.with_initial_data(
        description=(f"# Promote model `{version}`?\n\nThe gate would promote it. Approve to "
                     f"make it serve; reject to keep the champion.\n\n"
                     f"{comparison_markdown(decision)}"),
        approve=False)
    try:
        answer = pause_flow_run(wait_for_input=request, timeout=timeout_s,
                                poll_interval=defaults.APPROVAL_POLL_S)
    except FlowPauseTimeout:
        settle_candidate(data_url, version, with_approval(
            decision, approved=False, by=f"nobody (no answer within {timeout_s} s)",
            status="expired", flow_run=run))
        raise
    return with_approval(decision, approved=answer.approve,
                         by=answer.approver.strip() or "a reviewer who gave no name",
                         note=answer.note.strip(), flow_run=run,
                         via="Prefect flow run input")


@flow(name="train", description="Train the CNN on dataset/, evaluate it on held-out slides, "
      "register it and promote it only if it is at least as good as the champion.",
      timeout_seconds=defaults.TRAIN_FLOW_TIMEOUT_S, flow_run_name="train-{arch}-seed{seed}")
def train_flow(data_url: str | None = None, arch: str = defaults.DEFAULT_ARCH,
               input_size: int | None = None, epochs: int = defaults.TRAIN_EPOCHS,
               max_minutes: float | None = defaults.TRAIN_MAX_MINUTES,
               seed: int = defaults.TRAIN_SEED, batch_size: int = defaults.TRAIN_BATCH_SIZE,
               tta: bool | int = defaults.TEST_TIME_AUGMENTATION, cache_dir: str | None = None,
               min_auc: float = defaults.GATE_MIN_AUC,
               min_accuracy: float = defaults.GATE_MIN_ACCURACY,
               tolerance: float = defaults.GATE_TOLERANCE,
               require_approval: bool = False,
               approval_timeout_s: int = defaults.APPROVAL_TIMEOUT_S,
               lineage_version: str | None = None,
               ) -> dict[str, Any]:
    """``lineage_version``: train again on exactly the cells (and split) that registered
    version saw, as its ``lineage.csv`` lists them; every object must still match its ETag."""
    use_credentials_block()  # a named AwsCredentials block, else the environment
    data_url = resolve_data_url(data_url)
    cache = resolve_cache_dir(cache_dir)
    config = RetrainConfig(arch=arch, input_size=input_size, epochs=epochs,
                           max_minutes=max_minutes, seed=seed, batch_size=batch_size, tta=tta,
                           min_auc=min_auc, min_accuracy=min_accuracy, tolerance=tolerance)
    data = load_training_data(data_url, config, cache, lineage_version)
    # A re-training from a lineage is asked for on purpose: never skipped as a repeat.
    repeat = None if lineage_version else check_repeat(data_url, config, quote(data))
    if repeat is not None:  # nothing new: no training, no new version, no slide due
        return {"version": None, "promoted": False, "skipped": True, "reason": repeat,
                "champion": ModelRegistry(open_store(data_url)).champion_version()}
    trained = train_candidate(data_url, config, quote(data))
    evaluation = evaluate_on_test_slides(quote(trained), quote(data), config)
    version = register_candidate(data_url, quote(trained), quote(data), quote(evaluation), config)
    if require_approval:
        decision = decide_candidate(data_url, version, quote(evaluation), quote(data), config,
                                    cache)
        if decision.promote:
            decision = settle_candidate(
                data_url, version, ask_approval(data_url, version, decision,
                                                approval_timeout_s))
    else:
        decision = gate_candidate(data_url, version, quote(evaluation), quote(data), config,
                                  cache)
    publish_training_report(data_url, version, quote(evaluation), decision, quote(data))
    return {"version": version, "promoted": decision.promote, "reason": decision.reason,
            "approval": decision.approval, "threshold": evaluation.threshold,
            "metrics": evaluation.test.to_dict()}
