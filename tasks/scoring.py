"""Prefect tasks around malaria.scoring: retries, logs and artifacts, nothing more."""

from __future__ import annotations

import contextlib
from collections.abc import Collection

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from malaria.core import defaults
from malaria.core.settings import redact
from malaria.evaluation.drift import DriftReport, compare, drift_of_predictions
from malaria.io.store import open_store
from malaria.registry.registry import ModelRegistry
from malaria.scoring.due import FORCED, Cell, DueSlide, find_due_slides, fingerprint
from malaria.scoring.model import ModelRef, resolve_model
from malaria.scoring.output import SlideSummary, finalize_slide, rebuild_summary
from malaria.scoring.paths import ScoringPaths
from malaria.scoring.shards import (
    Shard,
    ShardResult,
    SlidePlan,
    plan_slide,
    score_shard,
    split_shards,
)
from tasks.events import emit_drift_flagged
from tasks.reports import artifact_url, publish_object_links

# At most this many per-slide CSV links are attached to a run: beyond it, summary.csv and
# the score-parasitemia table say the rest in one place.
LINKED_SLIDES = 20


@task(name="resolve-scoring-model", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      timeout_seconds=defaults.SCORE_STEP_TIMEOUT_S)
def resolve_scoring_model(paths: ScoringPaths, model_path: str | None,
                          threshold: float | None, tta: int | None) -> ModelRef:
    ref = resolve_model(paths, model_path, threshold, tta)
    get_run_logger().info("scoring with model %s (%s), threshold %g, %d view(s) per cell",
                          ref.version, ref.source, ref.threshold, ref.tta)
    return ref


@task(name="find-due-slides", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      timeout_seconds=defaults.SCORE_STEP_TIMEOUT_S)
def find_due(paths: ScoringPaths, version: str, slides: Collection[str] | None = None,
             force: bool = False) -> tuple[list[DueSlide], int]:
    due, up_to_date = find_due_slides(paths, version, slides, force)
    logger = get_run_logger()
    logger.info("%d slides due (%d cells), %d up to date", len(due),
                sum(d.cells for d in due), up_to_date)
    for item in due[:50]:
        logger.info("due: slide %s (%d cells): %s", item.slide, item.cells, item.reason)
    return due, up_to_date


def name_this_run(name: str) -> None:
    """Rename the current flow run once what it does is known (the run name is resolved
    before the flow body runs); outside a run, or if the API says no, nothing happens."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_name(run_id, name)
    except Exception as error:  # a name is a courtesy; the scoring goes on
        get_run_logger().debug("could not rename the run to %s: %s", name, error)


def plan_step(paths: ScoringPaths, version: str, slide: str, shard_size: int,
              forced: bool) -> SlidePlan | None:
    """The slide's plan (a plain step in the flow's thread, like finalizing). A forced slide
    that is up to date is planned whole with the reason ``FORCED``; its parts from a killed
    forced run are resumed (same cells, same model: the same rows)."""
    plan = plan_slide(paths, version, slide, shard_size)
    if plan is not None or not forced:
        return plan
    cells = sorted((Cell(i.key, i.etag, i.size)
                    for i in paths.scans_store().list(paths.slide_prefix(slide))),
                   key=lambda c: c.key)
    if not cells:
        return None
    fp = fingerprint(cells)
    shards = split_shards(slide, cells, shard_size, fp)
    parts = {info.key for info in paths.out_store().list(paths.parts_prefix(slide))}
    done = frozenset(s.index for s in shards if paths.part_key(s, version) in parts)
    return SlidePlan(slide, fp, len(cells), FORCED, shards, done)


# A shard is idempotent (its part is one whole object under a key fixed by its cells and
# the model), so a retry after a network error or a lost worker is safe.
@task(name="score-shard", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE,
      task_run_name="score-shard-{label}", timeout_seconds=defaults.SCORE_SHARD_TIMEOUT_S)
def score_shard_task(paths: ScoringPaths, ref: ModelRef, shard: Shard, label: str,
                     batch_size: int, concurrency: int) -> ShardResult:
    result = score_shard(paths, ref, shard, batch_size=batch_size, concurrency=concurrency)
    logger = get_run_logger()
    if result.resumed:
        logger.info("shard %s: part already written by an earlier run, %d cells", label,
                    result.cells)
    else:
        logger.info("shard %s: %d cells in %.1f s (%.0f cells/s), %d unreadable", label,
                    result.cells, result.seconds, result.cells_per_s, result.unreadable)
    return result


def announce_parasitemia_change(summary: SlideSummary, shift: float) -> dict[str, object]:
    """A re-scored slide whose parasitemia moved: a warning in the run's log and a Prefect
    event (``malaria.slide.parasitemia-changed``, for automations and the lab's notices);
    returns the row the run's report lists."""
    previous = summary.previous or {}
    row: dict[str, object] = {
        "slide": summary.slide, "parasitemia_pct": summary.parasitemia_pct,
        "previous_parasitemia_pct": previous.get("parasitemia_pct"), "shift_pp": shift,
        "model_version": summary.model_version,
        "previous_model_version": previous.get("model_version"),
        "previous_csv": previous.get("history_key")}
    get_run_logger().warning(
        "slide %s: parasitemia %s%% -> %s%% (%+.2f points) after re-scoring with %s; the "
        "earlier CSV is kept at %s", summary.slide, previous.get("parasitemia_pct"),
        summary.parasitemia_pct, shift, summary.model_version, previous.get("history_key"))
    emit_event(event="malaria.slide.parasitemia-changed",
               resource={"prefect.resource.id": f"malaria.slide.{summary.slide}",
                         "prefect.resource.name": f"slide {summary.slide}"},
               payload=row)
    return row


def finalize_slide_step(paths: ScoringPaths, ref: ModelRef, plan: SlidePlan) -> SlideSummary:
    """Concatenate a slide's parts into its CSV. A plain call in the flow's own thread, not
    a task: it runs as soon as the slide's last shard is in, and a task run's API calls
    would cost more than the step; an error leaves the slide due with its parts kept."""
    summary = finalize_slide(paths, ref, plan)
    get_run_logger().info(
        "slide %s: %d cells scored, %d unreadable, parasitemia %s%% -> %s", summary.slide,
        summary.cells_scored, summary.unreadable, summary.parasitemia_pct,
        paths.out_store().uri(paths.prediction_key(summary.slide)))
    return summary


@task(name="drift-against-validation", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE,
      timeout_seconds=defaults.SCORE_STEP_TIMEOUT_S)
def drift_against_validation(paths: ScoringPaths, ref: ModelRef,
                             summaries: list[SlideSummary]) -> DriftReport:
    """Tonight's scores (the slides of this run) against the champion's validation slides."""
    reference = None
    if ref.source == "registry":
        with contextlib.suppress(Exception):  # an older record without it: say so, go on
            reference = ModelRegistry(open_store(ref.location)).get(ref.version).get(
                "validation_distribution")
    if all(s.probability_counts for s in summaries):  # binned when the slide was finalized
        counts = [sum(column) for column in zip(*(s.probability_counts for s in summaries),
                                                strict=True)]
        return compare(reference, counts, sum(s.parasitized for s in summaries))
    return drift_of_predictions(paths.out_store(),
                                (paths.prediction_key(s.slide) for s in summaries), reference)


def _changed_markdown(changed: list[dict[str, object]]) -> str:
    if not changed:
        return ""
    lines = ["", "## Parasitemia changed on re-scored slides", "",
             "| slide | before % | now % | points | model before | model now | earlier CSV |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {c['slide']} | {c['previous_parasitemia_pct']} | {c['parasitemia_pct']} | "
              f"{c['shift_pp']:+} | {c['previous_model_version']} | {c['model_version']} | "
              f"`{c['previous_csv']}` |" for c in changed]
    return "\n".join(lines) + "\n"


def publish_scoring_report(paths: ScoringPaths, ref: ModelRef, summaries: list[SlideSummary],
                           line: str, changed: list[dict[str, object]] | None = None) -> bool:
    version = ref.version
    written, _ = rebuild_summary(paths)
    logger = get_run_logger()
    drift = drift_against_validation(paths, ref, summaries) if summaries else None
    if drift is not None:
        (logger.warning if drift.flagged else logger.info)("drift: %s", drift.message)
        if drift.flagged:  # an event, so the server's automation notifies without a worker
            emit_drift_flagged(version, drift.message, cells=drift.cells, psi=drift.psi,
                               positive_rate=drift.positive_rate,
                               reference_positive_rate=drift.reference_positive_rate,
                               data_url=paths.out_url)
    store = paths.out_store()
    if written:
        logger.info("rebuilt %s", store.uri(paths.summary_key))
    if summaries:
        create_table_artifact(
            key="score-parasitemia",
            table=[{"slide": s.slide, "cells_scored": s.cells_scored,
                    "parasitized": s.parasitized, "parasitemia_pct": s.parasitemia_pct,
                    "unreadable": s.unreadable, "mean_probability": s.mean_probability,
                    "model_version": s.model_version} for s in summaries],
            description=f"Per-slide parasitemia of the slides scored in this run ({version})")
    # Links to the CSVs: summary.csv keyed (its versions on the Artifacts page), the CSVs of
    # the first slides of this run attached to the run.
    if written or summaries:
        publish_object_links(store, {"summary": paths.summary_key}, kind="predictions")
    # The first slides' CSVs as links inside the summary: one artifact, not one API call
    # per slide at the end of every run.
    links = "".join(f"- [{s.slide}]({artifact_url(store, paths.prediction_key(s.slide))})\n"
                    for s in summaries[:LINKED_SLIDES])
    more = len(summaries) - LINKED_SLIDES
    if more > 0:
        links += f"- ... and {more} more under the same folder\n"
    create_markdown_artifact(
        key="score-summary",
        markdown=(f"# Scoring with model `{version}`\n\n- {line}\n"
                  f"- per-slide CSVs: `{paths.out_url.rstrip('/')}/{paths.predictions_prefix}`\n"
                  f"- summary: `{store.uri(paths.summary_key)}`"
                  f"{' (rebuilt)' if written else ''}\n"
                  + (f"\n## Drift against the champion's validation slides\n\n"
                     f"{'**' if drift.flagged else ''}{drift.message}"
                     f"{'**' if drift.flagged else ''} ({drift.cells} cells scored in this "
                     "run)\n" if drift else "")
                  + _changed_markdown(changed or [])
                  + (f"\n## Per-slide CSVs of this run\n\n{links}" if links else "")),
        description="Scoring run summary")
    logger.info(redact(line))
    return written
