"""The product's precision probe, timed by hand: interleaved training steps of one
architecture in float32 and in mixed_bfloat16 on this CPU, through
:func:`malaria.model.precision.probe_step` (the steps ``resolve_precision`` times where the
CPU has native bfloat16). On a CPU without it the product trains in float32 without
probing; this shows what that choice avoids.

    python -m benchmarks.precision_probe --json benchmarks/results/precision-probe-avx512.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="default: the product's architecture")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each precision")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from malaria.model.config import TrainConfig
    from malaria.model.precision import probe_step, reported_cpu_flags

    config = TrainConfig() if args.arch is None else TrainConfig(arch=args.arch)
    float32, bfloat16 = probe_step(config, "float32"), probe_step(config, "mixed_bfloat16")
    float32_s: list[float] = []
    bfloat16_s: list[float] = []
    for _ in range(args.steps):  # interleaved: load on a shared machine hits both alike
        float32_s.append(float32())
        bfloat16_s.append(bfloat16())
    report: dict[str, Any] = {
        "arch": config.arch, "batch_size": config.batch_size,
        "input_size": config.resolved_input_size(), "cpu_flags": reported_cpu_flags(),
        "float32_s": float32_s, "mixed_bfloat16_s": bfloat16_s,
        "float32_images_per_s_best": config.batch_size / min(float32_s),
        "mixed_bfloat16_images_per_s_best": config.batch_size / min(bfloat16_s),
        "bf16_slowdown_best": min(bfloat16_s) / min(float32_s)}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
