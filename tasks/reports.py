"""Prefect tasks that leave pictures and summaries for the people watching the UI."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from malaria.core import defaults
from malaria.io.store import open_store
from malaria.reports.gifs import class_gifs


@task(name="publish-cell-gifs", retries=1, cache_policy=NO_CACHE,
      timeout_seconds=defaults.REPORT_TIMEOUT_S)
def publish_cell_gifs(data_url: str, run_id: str, per_class: int = 100) -> dict[str, str]:
    store = open_store(data_url)
    keys = class_gifs(store, per_class=per_class, run_id=run_id)
    get_run_logger().info("cell GIFs: %s", ", ".join(store.uri(k) for k in keys.values()))
    return {name: store.uri(key) for name, key in keys.items()}


@task(name="publish-nightly-report", cache_policy=NO_CACHE, timeout_seconds=defaults.REPORT_TIMEOUT_S)
def publish_nightly_report(ingest: dict[str, Any], training: dict[str, Any] | None,
                           gifs: dict[str, str]) -> None:
    lines = ["# Nightly retraining", "",
             "## Ingest", "",
             f"- listed {ingest['listed']}: accepted {ingest.get('accepted', 0)}, duplicates "
             f"{ingest.get('duplicate', 0)}, quarantined {ingest.get('quarantined', 0)}, "
             f"already ingested {ingest.get('already_ingested', 0)}",
             f"- quarantine reasons: {ingest['reasons'] or 'none'}",
             f"- manifest: `{ingest['manifest']}`", ""]
    if training is None:
        lines += ["## Training", "", "Skipped: no labelled cells in dataset/ yet.", ""]
    elif training.get("skipped"):
        lines += ["## Training", "", f"Skipped: {training['reason']}. The champion "
                  f"`{training.get('champion') or '?'}` serves on; nothing was registered and "
                  "no slide became due.", ""]
    else:
        m = training["metrics"]
        verdict = "promoted to champion" if training["promoted"] else "not promoted"
        lines += ["## Training", "",
                  f"- model `{training['version']}`: **{verdict}**",
                  f"- gate: {training['reason']}",
                  f"- held-out test slides: accuracy {m['accuracy']:.4f}, AUC "
                  f"{m['roc_auc']:.4f}, sensitivity {m['sensitivity']:.4f}, specificity "
                  f"{m['specificity']:.4f} (threshold {training['threshold']:.3f})",
                  "- full report: the `training-report` artifact", ""]
    lines += ["## Cells", ""]
    lines += [f"- first cells of {name}: `{uri}`" for name, uri in gifs.items()]
    create_markdown_artifact(key="nightly-report", markdown="\n".join(lines),
                             description="Nightly ingest, training and gate summary")
