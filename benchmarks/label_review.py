"""Cells whose label every given model confidently contradicts, for a person to look at.

    python -m benchmarks.label_review --data ../shared/data/nih-cells-128 \\
        --model s0=A.keras --model s1=B.keras --part test --top 20 \\
        --csv .malaria/label-review.csv --montage .malaria/label-review.png
    # after looking: a CSV of key,verdict (mislabelled / ambiguous / correct)
    python -m benchmarks.label_review ... --judged benchmarks/results/label-review-test.csv \\
        --json benchmarks/results/label-review-test.json

Scores one split of the accuracy benchmark's slides (the same seeded split) with every model
(8-view TTA, each at its own input size), ranks the cells by the *highest* probability any
model gives their label (a cell is listed only when all models disagree with it), and
writes the first ``--top`` with each model's probability. ``--montage`` draws them for a
human look; it shows real cells, so write it outside the repository (never commit it).

``--judged`` reads a reviewer's verdicts and reports each model's AUC on all cells and
without those judged mislabelled. That is a measure of how far label noise caps the AUC,
not a benchmark result: nothing here chooses a model or a setting.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from benchmarks import emit
from benchmarks.accuracy import benchmark_split, folder_loader
from malaria.dataset.records import records_from_folder
from malaria.evaluation.metrics import roc_auc

VERDICTS = ("mislabelled", "ambiguous", "correct")


def score_models(models: dict[str, Path], data: Path, cache: Path, part: str
                 ) -> tuple[list[Any], np.ndarray, dict[str, np.ndarray]]:
    """(records of the split, labels, P(parasitized) per model name)."""
    from malaria.model.architectures import input_size_of
    from malaria.model.predict import predict_probabilities
    from malaria.model.serving import load_model_file

    records = records_from_folder(data)
    chosen = benchmark_split(records).of(records, part)
    load = folder_loader(data, cache)
    probabilities: dict[str, np.ndarray] = {}
    labels = np.array([r.label for r in chosen], dtype=np.float32)
    for name, path in models.items():
        model = load_model_file(path)
        size = input_size_of(model)
        probabilities[name] = predict_probabilities(model, load(chosen, size).images, tta=8)
    return chosen, labels, probabilities


def contradicted(labels: np.ndarray, probabilities: dict[str, np.ndarray], top: int,
                 below: float = 1.0) -> list[int]:
    """Indices of the ``top`` cells whose label the most generous model finds least likely,
    only those where it gives the label less than ``below``."""
    stacked = np.stack(list(probabilities.values()))
    of_label = np.where(labels == 1, stacked, 1 - stacked).max(axis=0)
    order = np.argsort(of_label, kind="stable")[:top]
    return [int(i) for i in order if of_label[i] < below]


def read_verdicts(path: Path) -> dict[str, str]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    verdicts = {}
    for row in rows:
        verdict = (row.get("verdict") or "").strip()
        if verdict and verdict not in VERDICTS:
            raise SystemExit(f"{path}: unknown verdict {verdict!r} for {row.get('key')}")
        if verdict:
            verdicts[row["key"]] = verdict
    return verdicts


def draw_montage(rows: list[dict[str, Any]], data: Path, out: Path,
                 tile: int = 160) -> None:
    from PIL import Image, ImageDraw

    columns = 5
    lines = (len(rows) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, lines * (tile + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, row in enumerate(rows):
        x, y = (n % columns) * tile, (n // columns) * (tile + 16)
        with Image.open(data / row["key"]) as image:
            sheet.paste(image.convert("RGB").resize((tile, tile)), (x, y + 16))
        label = "P" if row["label"] else "U"
        draw.text((x + 2, y + 2), f"{n} {label} slide {row['slide']} p={row['mean_p']:.2f}",
                  fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cells-128"))
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="a saved .keras model (repeat for several)")
    parser.add_argument("--part", choices=("train", "val", "test"), default="test")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--below", type=float, default=1.0,
                        help="list only cells whose label every model gives less than this")
    parser.add_argument("--csv", type=Path, help="write the listed cells here")
    parser.add_argument("--montage", type=Path, help="draw them here (outside the repository)")
    parser.add_argument("--judged", type=Path, help="a CSV of key,verdict from a reviewer")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cache", type=Path, default=Path(".malaria/cache/images"))
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"no data folder at {args.data}")
    models = {}
    for item in args.model:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"--model wants NAME=PATH, got {item!r}")
        models[name] = Path(path)

    records, labels, probabilities = score_models(models, args.data, args.cache, args.part)
    rows = []
    for i in contradicted(labels, probabilities, args.top, args.below):
        per_model = {name: round(float(p[i]), 4) for name, p in probabilities.items()}
        rows.append({"key": records[i].key, "slide": records[i].slide,
                     "label": int(labels[i]), **{f"p_{k}": v for k, v in per_model.items()},
                     "mean_p": round(float(np.mean(list(per_model.values()))), 4)})
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as handle:
            columns = ["key", "slide", "label", *(f"p_{k}" for k in probabilities), "mean_p"]
            writer = csv.DictWriter(handle, fieldnames=[*columns, "verdict"])
            writer.writeheader()
            writer.writerows(rows)
    if args.montage:
        draw_montage(rows, args.data, args.montage)

    result: dict[str, Any] = {
        "part": args.part, "cells": len(records),
        "auc": {name: round(roc_auc(labels, p), 5) for name, p in probabilities.items()},
        "listed": rows,
    }
    if args.judged:
        verdicts = read_verdicts(args.judged)
        unknown = sorted(set(verdicts) - {r.key for r in records})
        if unknown:
            raise SystemExit(f"{args.judged}: {len(unknown)} keys are not in the {args.part} "
                             f"split, e.g. {unknown[0]}")
        keep = np.array([verdicts.get(r.key) != "mislabelled" for r in records])
        result["verdicts"] = {v: sum(1 for x in verdicts.values() if x == v) for v in VERDICTS}
        result["auc_without_mislabelled"] = {
            name: round(roc_auc(labels[keep], p[keep]), 5) for name, p in probabilities.items()}
        # Each class's share: the two kinds of error are judged on different evidence (an
        # inclusion that is there, or one that is not).
        for label, name in ((1, "parasitized"), (0, "uninfected")):
            keep_one = keep | (labels != label)
            result[f"auc_without_mislabelled_{name}_only"] = {
                model: round(roc_auc(labels[keep_one], p[keep_one]), 5)
                for model, p in probabilities.items()}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
