"""Prefect tasks around malaria.model.candidate: logging, checkpoints to the bucket,
artifacts. The training itself and its summary come from the library, as for `malaria train`.

The lineage (every cell a model saw, :mod:`malaria.registry.lineage`) is taken when the data
is loaded, not re-listed at registration: cells ingested while the model trained must not
appear in its lineage. The flow-run id is read here, the one place that knows Prefect."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from malaria.core import defaults, layout
from malaria.dataset.cache import ImageCache
from malaria.dataset.records import records_from_store, store_reader
from malaria.evaluation.threshold import rule_origin
from malaria.io.store import open_store
from malaria.model import candidate, promotion
from malaria.model.candidate import (
    CandidateEvaluation,
    PreparedData,
    evaluate_candidate,
    metrics_document,
    metrics_table,
    prepare_data,
    review_table,
)
from malaria.model.checkpoints import (
    checkpoint_prefix,
    download_checkpoint,
    save_for_serving,
    upload_checkpoint,
)
from malaria.model.config import RetrainConfig
from malaria.model.promotion import MODEL_FILE, gate
from malaria.registry.gate import GateDecision, awaiting_approval
from malaria.registry.lineage import (
    LineageError,
    LineageRow,
    lineage_rows,
    prepare_lineage_data,
    resolve,
)
from malaria.registry.provenance import new_version
from malaria.registry.registry import ModelRegistry
from tasks.events import emit_model_promoted
from tasks.reports import embedded_image


@dataclass
class TrainingData(PreparedData):
    """The prepared data with its lineage: PreparedData keeps only the test records, and the
    registered version must list every cell. ``retrained_from`` names the version whose
    lineage it was loaded from, if any."""

    lineage: list[LineageRow] = field(default_factory=list)
    retrained_from: str | None = None


def _retry_unless_lineage_error(_task: Any, _run: Any, state: Any) -> bool:
    # A changed or missing object of a lineage stays so: retrying only delays the report.
    return not isinstance(getattr(state, "data", None), LineageError)


@task(name="load-training-data", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_lineage_error,
      timeout_seconds=defaults.TRAIN_LOAD_TIMEOUT_S)
def load_training_data(data_url: str, config: RetrainConfig, cache_dir: str,
                       lineage_version: str | None = None) -> TrainingData:
    """Every cell under dataset/, split by slide; or, with ``lineage_version``, exactly the
    cells that version saw, on its split (a changed or missing object fails the run: a
    retry cannot bring it back)."""
    logger = get_run_logger()
    store = open_store(data_url)
    cache = ImageCache(Path(cache_dir))
    if lineage_version is None:
        records = records_from_store(store)
        data = prepare_data(records, store_reader(store), cache, config.resolved_input_size(),
                            seed=config.seed, val_fraction=config.val_fraction,
                            test_fraction=config.test_fraction)
        rows = lineage_rows(records, data.split)
    else:
        rows = ModelRegistry(store).get_lineage(lineage_version)
        records, split = resolve(store, lineage_version, rows)
        data = prepare_lineage_data(records, split, store_reader(store), cache,
                                    config.resolved_input_size())
        logger.info("re-training on the %d cells of model %s, on its split", len(rows),
                    lineage_version)
    logger.info("%s; decoded %d new, reused %d cached", data.describe(),
                cache.stats.decoded, cache.stats.reused)
    return TrainingData(**{f.name: getattr(data, f.name) for f in fields(data)},
                        lineage=rows, retrained_from=lineage_version)


# A retry resumes from the checkpoint mirrored in the bucket: it loses at most one epoch.
@task(name="train-candidate", retries=1, retry_delay_seconds=30, cache_policy=NO_CACHE,
      timeout_seconds=defaults.TRAIN_FIT_TIMEOUT_S)
def train_candidate(data_url: str, config: RetrainConfig, data: PreparedData) -> dict[str, Any]:
    """Train with a checkpoint every epoch mirrored to the bucket; a re-run of the same data
    and settings resumes from the last checkpoint there."""
    logger = get_run_logger()
    store = open_store(data_url)
    identity = data.manifest_sha256
    if isinstance(data, TrainingData) and data.retrained_from is not None:
        # Same data and settings as the original run, hence its checkpoint prefix: a
        # re-training would "resume" from its last epoch and train nothing.
        identity = f"{identity}:retrain-of:{data.retrained_from}"
    prefix = checkpoint_prefix(config, identity)
    folder = Path(tempfile.mkdtemp(prefix="malaria-ckpt-"))
    restored = download_checkpoint(store, prefix, folder)
    if restored:
        logger.info("resuming from %d checkpoint files under %s", restored, prefix)

    progress = create_progress_artifact(0.0, key="training-progress",
                                        description=f"Epochs of {config.arch} (of at most "
                                        f"{config.epochs}; early stopping may end sooner)")

    def on_epoch(epoch: int, metrics: dict[str, Any]) -> None:
        upload_checkpoint(store, folder, prefix)
        update_progress_artifact(progress, min(100.0, 100.0 * epoch / max(1, config.epochs)))
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and k != "epoch")
        logger.info("epoch %d: %s", epoch, shown)

    result = candidate.train_candidate(config, data.train, data.val, checkpoint_dir=folder,
                                       on_epoch=on_epoch)
    update_progress_artifact(progress, 100.0)
    summary = result.summary()
    logger.info("trained %d epochs (best %d, stopped by %s) in %.0f s at %.0f img/s, %s",
                summary["epochs_run"], summary["best_epoch"], summary["stopped"],
                summary["seconds"], summary["images_per_s"], summary["precision_policy"])
    return {"model": result.model, "history": result.history, "checkpoint_prefix": prefix,
            "summary": summary}


@task(name="evaluate-candidate", cache_policy=NO_CACHE,
      timeout_seconds=defaults.TRAIN_EVALUATE_TIMEOUT_S)
def evaluate_on_test_slides(trained: dict[str, Any], data: PreparedData,
                            config: RetrainConfig) -> CandidateEvaluation:
    evaluation = evaluate_candidate(trained["model"], data, trained["history"],
                                    threshold_rule=config.threshold_rule, tta=config.tta)
    t = evaluation.test
    get_run_logger().info(
        "test slides: accuracy %.4f, AUC %.4f, sensitivity %.4f, specificity %.4f "
        "(threshold %.3f, %s)", t.accuracy, t.roc_auc, t.sensitivity,
        t.specificity, evaluation.threshold, rule_origin(config.threshold_rule))
    return evaluation


@task(name="register-candidate", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      timeout_seconds=defaults.TRAIN_REGISTER_TIMEOUT_S)
def register_candidate(data_url: str, trained: dict[str, Any], data: PreparedData,
                       evaluation: CandidateEvaluation, config: RetrainConfig) -> str:
    registry = ModelRegistry(open_store(data_url))
    metrics = metrics_document(config, data, evaluation, trained["summary"])
    lineage = data.lineage if isinstance(data, TrainingData) else None
    if isinstance(data, TrainingData) and data.retrained_from is not None:
        metrics["retrained_from"] = data.retrained_from
    # A retry after metrics.json was written, or a re-run after a crash before the gate,
    # finishes the version already registered instead of registering the model twice.
    existing = registry.registered_as(metrics)
    if existing is not None:
        get_run_logger().info("model already registered as version %s (same data and "
                              "settings, not yet gated)", existing)
        return existing
    version = new_version()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / MODEL_FILE
        save_for_serving(trained["model"], path)
        registry.register(version, path, metrics, evaluation.plots, lineage=lineage,
                          flow_run_id=_flow_run_id())
    get_run_logger().info("registered model version %s", version)
    return version


@task(name="promotion-gate", retries=1, cache_policy=NO_CACHE,
      timeout_seconds=defaults.TRAIN_GATE_TIMEOUT_S)
def gate_candidate(data_url: str, version: str, evaluation: CandidateEvaluation,
                   data: PreparedData, config: RetrainConfig, cache_dir: str) -> GateDecision:
    store = open_store(data_url)
    decision = gate(ModelRegistry(store), version, evaluation.test, data.test_records,
                    store_reader(store), ImageCache(Path(cache_dir)), config,
                    candidate_probabilities=evaluation.test_probabilities)
    get_run_logger().info("gate: %s", decision.reason)
    if decision.promote:  # starts bulk-scoring through the deployment's trigger
        emit_model_promoted(version, decision.reason, data_url=data_url,
                            previous=(decision.champion or {}).get("version"))
    return decision


@task(name="promotion-decision", retries=1, cache_policy=NO_CACHE,
      timeout_seconds=defaults.TRAIN_GATE_TIMEOUT_S)
def decide_candidate(data_url: str, version: str, evaluation: CandidateEvaluation,
                     data: PreparedData, config: RetrainConfig, cache_dir: str) -> GateDecision:
    """The gate's decision without promoting; a decision to promote is recorded as awaiting
    approval (a run that dies waiting leaves that trace), any other as final."""
    store = open_store(data_url)
    registry = ModelRegistry(store)
    decision = promotion.decide(registry, version, evaluation.test, data.test_records,
                                store_reader(store), ImageCache(Path(cache_dir)), config,
                                candidate_probabilities=evaluation.test_probabilities)
    registry.record_decision(version, awaiting_approval(decision) if decision.promote
                             else decision)
    get_run_logger().info("gate: %s", decision.reason)
    return decision


@task(name="promotion-settle", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      timeout_seconds=defaults.TRAIN_REGISTER_TIMEOUT_S)
def settle_candidate(data_url: str, version: str, decision: GateDecision) -> GateDecision:
    """Record the answered decision and promote if it says so."""
    settled = promotion.settle(ModelRegistry(open_store(data_url)), version, decision)
    get_run_logger().info("gate after approval: %s", settled.reason)
    if settled.promote:
        emit_model_promoted(version, settled.reason, data_url=data_url,
                            previous=(settled.champion or {}).get("version"), source="approval")
    return settled


@task(name="check-repeat", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      timeout_seconds=defaults.TRAIN_REGISTER_TIMEOUT_S)
def check_repeat(data_url: str, config: RetrainConfig, data: PreparedData) -> str | None:
    """Why tonight's training would repeat the champion's (same dataset manifest, same
    settings), or None; when it would, say so in the training report and in the log."""
    registry = ModelRegistry(open_store(data_url))
    version = registry.champion_version()
    record = registry.get(version) if version else None
    reason = candidate.repeats_champion(record, version, data.manifest_sha256, config)
    if reason is not None:
        get_run_logger().info("%s; nothing registered, no slide made due", reason)
        create_markdown_artifact(
            key="training-report",
            markdown=(f"# Training skipped\n\n{reason}.\n\nThe champion `{version}` serves "
                      "on: no version was registered and no slide became due. New labelled "
                      "cells, corrections or other settings make the next run train.\n"),
            description="Training report")
    return reason


@task(name="publish-training-report", cache_policy=NO_CACHE,
      timeout_seconds=defaults.REPORT_TIMEOUT_S)
def publish_training_report(data_url: str, version: str, evaluation: CandidateEvaluation,
                            decision: GateDecision, data: PreparedData) -> None:
    store = open_store(data_url)
    # The plots inside the report (the UI shows them), each with its address in the bucket.
    plots = "\n\n".join(
        f"### {name}\n\n{embedded_image(name, data, 'image/png') or ''}\n\n"
        f"`{store.uri(layout.model_file_key(version, name + '.png'))}`"
        for name, data in evaluation.plots.items())
    verdict = "PROMOTED" if decision.promote else "not promoted"
    create_markdown_artifact(
        key="training-report",
        description=f"Model {version}: test-slide metrics and gate decision",
        markdown=(
            f"# Model {version}\n\n{data.describe()}\n\n"
            f"Decision threshold {evaluation.threshold:.3f}, chosen on the validation slides.\n\n"
            f"## Held-out test slides\n\n{metrics_table(evaluation.test)}\n\n"
            f"## Gate: {verdict}\n\n{decision.reason}\n\n## Plots\n\n{plots}\n\n"
            "## Cells to review\n\nThe test cells this model contradicts most confidently "
            "(`label_review` in metrics.json). Check their labels before reading its "
            "errors as the model's: on the real data most such cells looked mislabelled.\n\n"
            f"{review_table(evaluation.label_review)}\n"),
    )
    create_table_artifact(
        key="per-slide-accuracy",
        description=f"Model {version}: accuracy per held-out test slide",
        table=[{"slide": s.slide, "cells": s.cells, "accuracy": round(s.accuracy, 4),
                "parasitized_true": round(s.parasitized_true, 4),
                "parasitized_predicted": round(s.parasitized_pred, 4)}
               for s in evaluation.test.per_slide],
    )


def _flow_run_id() -> str | None:
    """The id of the flow run this task belongs to; None outside one (a direct call)."""
    run_id = flow_run.get_id()
    return str(run_id) if run_id else None
