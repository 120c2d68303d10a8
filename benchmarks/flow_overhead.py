"""What the score flow adds to the scorer: the flow against its own shards without Prefect.

    python -m benchmarks.flow_overhead --cells 8000 --json benchmarks/results/flow-overhead.json

One throwaway SeaweedFS and Prefect API; the same n cells (slides of 1,000) in three
buckets. A warm-up flow run, then the score flow twice (each on a fresh bucket), then
``malaria.scoring.infer.score_cells`` over the same shards two at a time with no flow, lease
or bookkeeping. Reports cells/s, wall seconds and CPU seconds of this process, of ``weed``
and of the other child processes (the Prefect API server).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import emit, prefect_api


def _children_cpu(exclude: int) -> float:
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        if child.pid != exclude:
            times = child.cpu_times()
            total += times.user + times.system
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from benchmarks.s3_clients import process_cpu_seconds
    from benchmarks.scoring import _upload, build_bench_model, generate
    from malaria.core import layout
    from malaria.io.store import S3Store, reset_clients
    from malaria.model.precision import reported_cpu_flags
    from malaria_dev.stack import StackConfig, load_stack_env, stack_down, stack_up

    state = Path(tempfile.mkdtemp(prefix="malaria-bench-overhead-"))
    cfg = StackConfig.with_free_ports(state / "stack")
    stack_up(cfg, services=("s3",))
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(name, None)
    load_stack_env(cfg)
    reset_clients()
    weed = int(json.loads((cfg.state_dir / "run" / "seaweedfs.pid").read_text())["pid"])
    rows: dict[str, Any] = {}
    try:
        model_path = state / "model.keras"
        _, precision = build_bench_model(model_path)
        cells = generate(args.cells, 1000)
        buckets = ("overhead-warm", "overhead-one", "overhead-two", "overhead-direct")
        for bucket in buckets:
            _upload(S3Store(bucket), [(f"{layout.SCANS}{k}", d) for k, d in cells], 16)
        from malaria.scoring.model import load_model, resolve_model
        from malaria.scoring.paths import ScoringPaths

        ref = resolve_model(ScoringPaths.bucket(f"s3://{buckets[0]}"), str(model_path))
        model = load_model(ref)

        def measured(label: str, work: Any) -> None:
            weed0, other0 = process_cpu_seconds(weed), _children_cpu(weed)
            cpu0, start = time.process_time(), time.perf_counter()
            work()
            wall = time.perf_counter() - start
            rows[label] = {"cells_per_s": round(args.cells / wall, 1), "wall_s": round(wall, 2),
                           "process_cpu_s": round(time.process_time() - cpu0, 2),
                           "weed_cpu_s": round(process_cpu_seconds(weed) - weed0, 2),
                           "prefect_server_cpu_s": round(_children_cpu(weed) - other0, 2)}
            print(label, rows[label], flush=True)

        with prefect_api():
            from flows.score import score_flow

            score_flow(data_url=f"s3://{buckets[0]}", model_path=str(model_path))
            for label, bucket in (("flow_1", buckets[1]), ("flow_2", buckets[2])):
                measured(label, lambda b=bucket: score_flow(data_url=f"s3://{b}",
                                                            model_path=str(model_path)))

        from malaria.scoring.due import Cell
        from malaria.scoring.infer import score_cells

        store = S3Store(buckets[3])
        infos = list(store.list(layout.SCANS))
        shards = [[Cell(i.key, i.etag, i.size) for i in infos[n:n + 1000]]
                  for n in range(0, len(infos), 1000)]

        def direct() -> None:
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda shard: score_cells(store, shard, model), shards))

        measured("score_cells_without_flow", direct)
    finally:
        stack_down(cfg)
    return {"cells": args.cells, "precision": precision, "cpu_flags": reported_cpu_flags(),
            "runs": rows, "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=8000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    emit(run(args), args.json)


if __name__ == "__main__":
    main()
