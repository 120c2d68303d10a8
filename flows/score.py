"""Score flow: every due slide under scans/ is scored by the serving model into
predictions/<slide>.csv, with a per-slide summary in predictions/summary.csv.

The one scoring orchestrator: the ``bulk-scoring`` deployment, ``malaria score`` (folders or
URLs, a model file) and ``benchmarks.scoring`` all run this flow. Which slides are due, how a
killed run resumes, and why a lease in the bucket keeps two runs off the same slide: see
malaria.scoring. The task runner is a parameter: threads in this process by default, or Dask
(a running cluster's address, or a local cluster of n worker processes) through prefect-dask.
The flow enters the chosen runner itself and submits the shard tasks to it (no subflow:
a subflow run's start and end cost about a second of API calls per run), so the runner is
chosen per run, from a deployment's parameters too.

Scheduling: the flow claims the due slides' leases and waits for the settle (one second by
default, once per run) before the first shard, so nothing is fetched or scored for a slide
another run holds. Then each leased slide is planned afresh and its shards are submitted at
once, so shards run while later slides are still being planned. Each slide's CSV is written
in the flow's own thread (a plain step, not a task run) as soon as its last shard is in,
unless the slide's lease was lost meanwhile.
"""

from __future__ import annotations

import time
from typing import Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from malaria.core.defaults import (
    SCORE_BATCH_SIZE,
    SCORE_CONCURRENCY,
    SCORE_FLOW_TIMEOUT_S,
    SCORE_LEASE_SETTLE_S,
    SCORE_LEASE_TTL_S,
    SCORE_PARALLEL_SHARDS,
    SCORE_PARASITEMIA_SHIFT_PP,
    SCORE_SHARD_SIZE,
)
from malaria.core.settings import data_url as resolve_data_url
from malaria.scoring.leases import SlideLeases
from malaria.scoring.model import ModelRef
from malaria.scoring.paths import ScoringPaths
from malaria.scoring.report import ScoreReport, SlideTally
from malaria.scoring.shards import Shard, ShardResult
from tasks.notify import use_credentials_block
from tasks.scoring import (
    announce_parasitemia_change,
    finalize_slide_step,
    find_due,
    name_this_run,
    plan_step,
    publish_scoring_report,
    resolve_scoring_model,
    score_shard_task,
)

Runner = Literal["threads", "dask"]  # a Literal: the UI offers the choices
RUNNERS: tuple[Runner, ...] = ("threads", "dask")
SLIDES_PER_GROUP = 64


def score_run_name() -> str:
    """The name a run starts with: the slides asked for, else when it was due. Once the due
    slides are known the run is renamed ``score-<n>-slides`` (see score_flow)."""
    slides = flow_run.get_parameters().get("slides")
    if slides:
        return f"score-{len(slides)}-requested-slides"
    return f"score-{flow_run.get_scheduled_start_time():%Y%m%dT%H%M%SZ}"


def build_task_runner(runner: Runner = "threads", *, dask_address: str | None = None,
                      dask_workers: int = 2,
                      parallel_shards: int = SCORE_PARALLEL_SHARDS) -> TaskRunner[Any]:
    """``threads``: shards in this process, ``parallel_shards`` at a time (one by default:
    a shard's pipeline overlaps its own fetching and inference; more pay on more cores). ``dask``: a running cluster at
    ``dask_address``, or a local cluster of ``dask_workers`` processes with one thread each
    (each process loads the model once and runs one shard at a time)."""
    if runner == "threads":
        return ThreadPoolTaskRunner(max_workers=max(1, parallel_shards))
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={
            "n_workers": dask_workers, "threads_per_worker": 1, "processes": True,
            "dashboard_address": None, "host": "127.0.0.1"})
    raise ValueError(f"unknown task runner {runner!r}; one of {RUNNERS}")


def score_leased_slides(task_runner: TaskRunner[Any], paths: ScoringPaths, ref: ModelRef,
                        slides: list[str], *, shard_size: int, batch_size: int,
                        concurrency: int, total_cells: int, leases: SlideLeases | None = None,
                        progress_id: UUID | None = None,
                        slides_per_group: int = SLIDES_PER_GROUP,
                        parasitemia_shift_pp: float = SCORE_PARASITEMIA_SHIFT_PP,
                        forced: frozenset[str] = frozenset(),
                        ) -> tuple[ScoreReport, list[str]]:
    """Plan each slide afresh (it is leased now) and submit its shards to ``task_runner``
    (entered) at once, so the first shards run while later slides are still being planned;
    write each slide's CSV, in this thread, as soon as its last shard is in. Returns this
    run's report (slides another run finished meanwhile count as up to date) and the shards
    or slides that failed (they stay due; their written parts are kept)."""
    logger = get_run_logger()
    started = time.perf_counter()
    report = ScoreReport(model_version=ref.version)
    tally = SlideTally(report)
    done = 0  # cells of these slides in written parts, earlier runs' parts included
    failed: list[str] = []
    total = max(total_cells, 1)

    def finalize(slide: str) -> None:
        plan = tally.pop(slide)
        try:
            # Read the lease again now, not only what the last heartbeat saw: a run that
            # lost it meanwhile leaves the CSV to the run that holds it.
            if leases is not None and (slide in leases.lost or not leases.still_held(slide)):
                failed.append(f"finalize {slide}: lease lost")
                logger.warning("slide %s: lease lost before its CSV was written; left to "
                               "the run that holds it", slide)
                return
            summary = finalize_slide_step(paths, ref, plan)
            report.slides.append(summary)
        except Exception as error:  # the slide stays due; its parts are kept
            failed.append(f"finalize {slide}: {error}")
            logger.error("finalizing slide %s failed: %s", slide, error)
            return
        shift = summary.parasitemia_shift
        if shift is not None and abs(shift) > parasitemia_shift_pp:
            try:
                report.changed.append(announce_parasitemia_change(summary, shift))
            except Exception as error:  # the CSV is written; the notice must not fail it
                logger.warning("announcing slide %s's parasitemia change failed: %s",
                               slide, error)
        if leases is not None:
            # Done: let the slide go now (another run may score its next re-scan) rather
            # than in one serial batch after the last shard.
            try:
                leases.release(slide)
            except Exception as error:  # it expires, or the run's exit releases it
                logger.warning("releasing the lease on slide %s failed: %s", slide, error)

    # Slides go in groups, so the plans (a few hundred bytes per cell) held here stay
    # bounded however many cells are due.
    for first in range(0, len(slides), slides_per_group):
        shard_of: dict[PrefectFuture[ShardResult], Shard] = {}
        for slide in slides[first:first + slides_per_group]:
            try:
                plan = plan_step(paths, ref.version, slide, shard_size, slide in forced)
            except Exception as error:  # the slide stays due for the next run
                failed.append(f"plan {slide}: {error}")
                logger.error("planning slide %s failed: %s", slide, error)
                continue
            tally.add(plan)
            if plan is None:
                logger.info("slide %s was finished by another run meanwhile", slide)
                continue
            done += sum(len(s.cells) for s in plan.shards if s.index in plan.done)
            if tally.complete(slide):
                finalize(slide)  # every part was written by an earlier, killed run
                continue
            # Shards go unquoted: prefect's quote() does not survive pickling to Dask
            # workers (it comes back wrapping a 1-tuple).
            for shard in plan.pending:
                future = task_runner.submit(score_shard_task, {
                    "paths": paths, "ref": ref, "shard": shard, "label": shard.name,
                    "batch_size": batch_size, "concurrency": concurrency})
                shard_of[future] = shard
        for future in as_completed(list(shard_of)):
            shard = shard_of[future]
            try:
                result: ShardResult = future.result()
            except Exception as error:  # the slide stays due; its other shards are kept
                failed.append(shard.name)
                logger.error("shard %s failed: %s", shard.name, error)
                continue
            done += result.cells
            last = tally.shard_done(result)
            elapsed = time.perf_counter() - started
            logger.info("%d of %d cells done, %.0f cells/s over this run", done, total,
                        report.cells / elapsed if elapsed > 0 else 0.0)
            if progress_id is not None:
                update_progress_artifact(progress_id, min(100.0, 100.0 * done / total))
            if last:
                finalize(shard.slide)
    report.seconds = time.perf_counter() - started
    return report, failed


@flow(name="score", description="Score every due slide under scans/ with the serving model: "
      "predictions/<slide>.csv per slide and predictions/summary.csv, exactly once.",
      flow_run_name=score_run_name, timeout_seconds=SCORE_FLOW_TIMEOUT_S)
def score_flow(data_url: str | None = None, model_path: str | None = None,
               threshold: float | None = None, tta: int | None = None,
               runner: Runner = "threads",
               dask_address: str | None = None, dask_workers: int = 2,
               shard_size: int = SCORE_SHARD_SIZE, batch_size: int = SCORE_BATCH_SIZE,
               concurrency: int = SCORE_CONCURRENCY,
               parallel_shards: int = SCORE_PARALLEL_SHARDS,
               lease_ttl_s: float = SCORE_LEASE_TTL_S,
               lease_settle_s: float = SCORE_LEASE_SETTLE_S,
               scans_url: str | None = None, out_url: str | None = None,
               registry_url: str | None = None,
               parasitemia_shift_pp: float = SCORE_PARASITEMIA_SHIFT_PP,
               slides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Scores the bucket layout of ``data_url`` (scans/ -> predictions/), or, with
    ``scans_url`` and ``out_url`` (URLs or folders), ``<slide>/<file>`` under one into
    ``<slide>.csv`` under the other. The model: ``model_path`` (a .keras file), or the
    champion of ``registry_url`` (default: the data URL). ``slides``: only these slides are
    considered; ``force``: they are re-scored even when up to date (the CSV they replace is
    kept in the history when another scoring made it; see malaria.scoring.output)."""
    use_credentials_block()  # a named AwsCredentials block, else the environment
    data_url = resolve_data_url(data_url)
    paths = ScoringPaths.for_run(data_url, scans_url, out_url, registry_url)
    logger = get_run_logger()
    task_runner = build_task_runner(runner, dask_address=dask_address,
                                    dask_workers=dask_workers, parallel_shards=parallel_shards)
    logger.info("score run: %s -> %s, task runner %s", paths.scans_url, paths.out_url, runner)

    ref = resolve_scoring_model(paths, model_path, threshold, tta)
    due, up_to_date = find_due(paths, ref.version, slides, force)
    name_this_run(f"score-{len(due)}-slides")
    report = ScoreReport(model_version=ref.version)
    failed: list[str] = []
    busy: list[str] = []
    started = time.perf_counter()
    if due:
        progress_id = create_progress_artifact(
            0.0, key="score-progress", description=f"Cells of due slides scored by {ref.version}")
        # The leases live in this process for the whole run (a heartbeat renews them).
        with SlideLeases(paths, ttl=lease_ttl_s, settle=lease_settle_s) as leases:
            granted = leases.acquire(d.slide for d in due)
            held = set(granted)
            busy = [d.slide for d in due if d.slide not in held]
            if busy:
                logger.info("%d due slides are being scored by another run: %s", len(busy),
                            ", ".join(busy[:20]))
            if granted:
                with task_runner:
                    report, failed = score_leased_slides(
                        task_runner, paths, ref, granted, shard_size=shard_size,
                        batch_size=batch_size, concurrency=concurrency,
                        total_cells=sum(d.cells for d in due if d.slide in held),
                        leases=leases, progress_id=progress_id,
                        parasitemia_shift_pp=parasitemia_shift_pp,
                        forced=frozenset(slides or ()) if force else frozenset())
        update_progress_artifact(progress_id, 100.0)
    seconds = time.perf_counter() - started
    # The report counts the slides that another run finished after the listing.
    report.up_to_date += up_to_date
    report.slides_due, report.slides_busy = [d.slide for d in due], busy
    report.seconds = seconds
    report.summary_written = publish_scoring_report(paths, ref, report.slides, report.line(),
                                                    report.changed)
    if failed:
        raise RuntimeError(f"{len(failed)} shards or slides failed (they stay due for the "
                           f"next run): {failed[:10]}")
    return {"model_version": ref.version, "slides_scored": [s.slide for s in report.slides],
            "slides_due": report.slides_due, "slides_busy": busy,
            "up_to_date": report.up_to_date, "cells": report.cells,
            "cells_per_s": round(report.cells_per_s, 1), "shards_scored": report.shards_scored,
            "shards_resumed": report.shards_resumed, "seconds": round(seconds, 2),
            "summary_written": report.summary_written, "line": report.line(),
            "summary": [s.to_dict() for s in report.slides],
            "parasitemia_changed": report.changed}
