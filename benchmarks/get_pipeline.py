"""How many GETs a fetch thread should pipeline: end-to-end scoring at several depths.

    python -m benchmarks.get_pipeline --cells 10000 --depths 1,8,64 --rounds 2 \\
        --json benchmarks/results/get-pipeline.json

One throwaway SeaweedFS, n synthetic scan cells, then for each round and depth (alternating,
so that a change in the machine's load hits every depth alike) the project's scoring
(``run_scoring`` in a fresh child process, as ``benchmarks.scoring`` measures it) with
``MALARIA_GET_PIPELINE`` set to the depth. Reports cells/s and the CPU that ``weed`` spent
per cell (from ``/proc``): on a machine where the store shares the cores, the server's CPU
per GET is what pipelining saves. The outputs are deleted between runs, so every run
scores every cell.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import emit
from benchmarks.scoring import _upload, generate, project
from malaria.core import layout


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from malaria.io.store import S3Store, reset_clients
    from malaria.model.architectures import DEFAULT_ARCH, build_model, default_input_size
    from malaria.model.checkpoints import save_for_serving
    from malaria.model.precision import cpu_has_bf16, dtype_policy
    from malaria_dev.stack import StackConfig, load_stack_env, stack_down, stack_up

    depths = [int(d) for d in args.depths.split(",")]
    state = Path(tempfile.mkdtemp(prefix="malaria-bench-pipeline-"))
    cfg = StackConfig.with_free_ports(state / "stack")
    stack_up(cfg, services=("s3",))
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(name, None)
    load_stack_env(cfg)
    reset_clients()
    weed_pid = int(json.loads((cfg.state_dir / "run" / "seaweedfs.pid").read_text())["pid"])
    runs: list[dict[str, Any]] = []
    try:
        with dtype_policy("mixed_bfloat16" if cpu_has_bf16() else "float32"):
            model = build_model(DEFAULT_ARCH, default_input_size(DEFAULT_ARCH))
        model_path = state / "model.keras"
        save_for_serving(model, model_path)
        store = S3Store("bench-pipeline")
        _upload(store, [(f"{layout.SCANS}{k}", d) for k, d in generate(args.cells, 1000)], 16)
        child_args = argparse.Namespace(shard_size=2000, batch_size=256, concurrency=16)
        for round_number in range(args.rounds):
            for depth in depths:
                for info in list(store.list("")):
                    if not info.key.startswith(layout.SCANS):
                        store.delete(info.key)  # earlier outputs: score everything again
                os.environ["MALARIA_GET_PIPELINE"] = str(depth)  # the child reads it
                weed_before = process_cpu_seconds(weed_pid)
                result = project(store.url, model_path, child_args)
                weed_ms = (process_cpu_seconds(weed_pid) - weed_before) * 1000 / args.cells
                assert result["cells"] == args.cells, result
                row = {"round": round_number + 1, "depth": depth,
                       "cells_per_s": round(args.cells / result["seconds"], 1),
                       "weed_cpu_ms_per_cell": round(weed_ms, 3)}
                print(row, flush=True)
                runs.append(row)
    finally:
        os.environ.pop("MALARIA_GET_PIPELINE", None)
        stack_down(cfg)
    return {
        "cells": args.cells, "depths": depths, "rounds": args.rounds, "runs": runs,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load "
                   f"{os.getloadavg()[0]:.1f} at the end",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=10000)
    parser.add_argument("--depths", default="1,8,64",
                        help="comma-separated GETs per round trip to compare")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    emit(run(args), args.json)


if __name__ == "__main__":
    sys.exit(main())
