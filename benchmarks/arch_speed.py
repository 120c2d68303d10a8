"""Training and scoring speed of architectures on this machine, alternating in one process
(absolute figures move by 50% between sessions here; the ratios within one run are the
figure).

Each repetition trains every architecture through the product's trainer
(:func:`malaria.model.trainer.train`, the precision the product picks) for ``--epochs`` on
the same ``--train`` cells of a pack, then scores ``--score`` cells at one view through the
product's predict path.

    python -m benchmarks.arch_speed --pack cells-80.npz --archs cellnet,cellnet-hed --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, required=True)
    parser.add_argument("--archs", default="cellnet,cellnet-hed")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=3000, help="training cells")
    parser.add_argument("--val", type=int, default=500, help="validation cells")
    parser.add_argument("--score", type=int, default=6000, help="cells scored")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from benchmarks.accuracy import read_pack
    from malaria.dataset.pipeline import ArraySet
    from malaria.model.config import TrainConfig
    from malaria.model.precision import reported_cpu_flags
    from malaria.model.predict import predict_views
    from malaria.model.trainer import train

    records, load = read_pack(args.pack)
    size = int(np.load(args.pack, mmap_mode="r")["images"].shape[1])
    cells = load(records, size)
    order = np.random.default_rng(0).permutation(len(records))
    need = args.train + args.val + args.score
    if need > len(order):
        parser.error(f"the pack holds {len(order)} cells, {need} needed")

    def part(start: int, stop: int) -> ArraySet:
        rows = order[start:stop]
        return ArraySet(cells.images[rows], cells.labels[rows], cells.slides[rows])

    train_set, val_set = part(0, args.train), part(args.train, args.train + args.val)
    scored = cells.images[order[args.train + args.val:need]]
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.reps):
        for arch in args.archs.split(","):
            config = TrainConfig(arch=arch, input_size=size, epochs=args.epochs, patience=None)
            with tempfile.TemporaryDirectory() as folder:
                result = train(config, train_set, val_set, checkpoint_dir=Path(folder),
                               resume=False)
            started = time.perf_counter()
            predict_views(result.model, scored, views=1)
            seconds = time.perf_counter() - started
            summary = result.summary()
            runs.setdefault(arch, []).append({
                "train_images_per_s": summary["images_per_s"],
                "precision_policy": summary["precision_policy"],
                "score_cells_per_s": round(len(scored) / seconds, 1)})
            print(f"rep {rep + 1}: {arch} {runs[arch][-1]}", flush=True)
    report: dict[str, Any] = {"runs": runs, "cpu_flags": reported_cpu_flags(),
                              "cpus": os.cpu_count(), "epochs": args.epochs,
                              "train_cells": args.train, "scored_cells": args.score}
    for arch, rows in runs.items():
        report.setdefault("mean", {})[arch] = {
            key: round(float(np.mean([r[key] for r in rows])), 1)
            for key in ("train_images_per_s", "score_cells_per_s")}
    print(json.dumps(report["mean"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
