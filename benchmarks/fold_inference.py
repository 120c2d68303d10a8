"""Inference with batch norm folded into the convolutions (the product's predict path,
malaria.model.fold) against the model run as built, alternating in one process; and, for
trained models, how far their predictions move.

    python -m benchmarks.fold_inference --reps 4 \
        --models '/tmp/cvout/work/cv5-fold*/recipe1-member0/*/model.keras' --pack cells-80.npz

Speed: the default architecture at its input size, under the precision the product's
training picks on this CPU (untrained weights with batch-norm statistics away from 0/1),
batches of 256 through ``tf.function``: ``folded`` is
:func:`malaria.model.predict.predict_probabilities`, ``as_built`` a ``tf.function`` around
``model(images, training=False)``, which is what the product ran before. Core time is the
process's CPU time per cell (both cores), wall time the cells per second.

Agreement (``--models`` and a pack of their input size): per model file, the largest and
mean change of P(parasitized) over the pack's cells, and the cells whose call at the
model's recorded threshold (0.5 without a card) changes.
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 256


def _as_built(model: Any) -> Any:
    import tensorflow as tf

    size = int(model.inputs[0].shape[1])
    traced = tf.function(lambda images: model(images, training=False),
                         input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
                         autograph=False)
    return lambda batch: np.asarray(traced(tf.constant(batch))).reshape(-1)


def _timed(predict: Any, images: np.ndarray, seconds: float) -> tuple[float, float]:
    """(cells per second, ms of process CPU per cell) over at least ``seconds``."""
    predict(images)  # traced, warm
    cells, cpu, wall = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - wall < seconds:
        predict(images)
        cells += len(images)
    return cells / (time.perf_counter() - wall), (time.process_time() - cpu) / cells * 1e3


def speed(reps: int, seconds: float) -> dict[str, Any]:
    import keras

    from malaria.core.defaults import DEFAULT_ARCH
    from malaria.model.architectures import build_model, default_input_size
    from malaria.model.config import TrainConfig
    from malaria.model.precision import dtype_policy, resolve_precision
    from malaria.model.predict import predict_probabilities

    size = default_input_size(DEFAULT_ARCH)
    policy = resolve_precision(TrainConfig(arch=DEFAULT_ARCH, input_size=size))
    with dtype_policy(policy):
        model = build_model(DEFAULT_ARCH, size)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, n))
    images = rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)
    ways = {"folded": lambda batch: predict_probabilities(model, batch, batch_size=BATCH),
            "as_built": _as_built(model)}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for rep in range(reps):
        for name in (list(ways) if rep % 2 == 0 else list(ways)[::-1]):
            runs[name].append(_timed(ways[name], images, seconds))
    median = {name: (float(np.median([r[0] for r in rows])),
                     float(np.median([r[1] for r in rows]))) for name, rows in runs.items()}
    return {
        "model": f"{DEFAULT_ARCH} at {size}x{size}, {policy}, batch {BATCH}",
        "runs": {name: [[round(a, 1), round(b, 4)] for a, b in rows]
                 for name, rows in runs.items()},
        "cells_per_s": {name: round(m[0], 1) for name, m in median.items()},
        "core_ms_per_cell": {name: round(m[1], 4) for name, m in median.items()},
        "speedup": round(median["folded"][0] / median["as_built"][0], 3),
    }


def agreement(pattern: str, pack: Path) -> list[dict[str, Any]]:
    from malaria.model.local import load_model_card
    from malaria.model.predict import predict_probabilities
    from malaria.model.serving import load_model_file

    data = np.load(pack)
    images = data["images"]
    rows = []
    for path in sorted(glob.glob(pattern)):
        model = load_model_file(path)
        if int(model.inputs[0].shape[1]) != images.shape[1]:
            continue
        threshold = float(load_model_card(Path(path)).get("threshold", 0.5))
        plain = _as_built(model)
        as_built = np.concatenate([plain(images[i:i + BATCH])
                                   for i in range(0, len(images), BATCH)]).astype(np.float64)
        folded = predict_probabilities(model, images).astype(np.float64)
        change = np.abs(folded - as_built)
        rows.append({"model": path, "cells": len(images),
                     "policy": next((layer.dtype_policy.name for layer in model.layers
                                     if "conv" in layer.name), ""),
                     "max_change": float(change.max()), "mean_change": float(change.mean()),
                     "calls_changed": int(((folded >= threshold)
                                           != (as_built >= threshold)).sum())})
    return rows


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0, help="per timed run")
    parser.add_argument("--models", help="glob of trained .keras files (agreement)")
    parser.add_argument("--pack", type=Path, help="a cells pack of the models' input size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from benchmarks import emit
    from benchmarks.accuracy import machine

    result: dict[str, Any] = {"speed": speed(args.reps, args.seconds)}
    if args.models and args.pack:
        result["agreement"] = agreement(args.models, args.pack)
    result["machine"] = machine()
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
