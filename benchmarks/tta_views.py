"""What test-time views buy, on models a cross-validation already trained (no training).

``benchmarks.accuracy --cv K`` keeps each fold's model in its work folder
(``<workdir>/cvK-fold<k>/recipe<r>-member0/<arch>-<size>-<pid>/model.keras``). This scores
every fold's validation and test cells with the first 1, 2, 4 and 8 symmetries of the square
(the product's order: identity, horizontal flip, vertical flip, rotation by 90 degrees, ...),
chooses each fold's threshold on its own validation slides at that many views (the
product's rule), pools the folds' test cells and reports, per view count: accuracy, AUC,
sensitivity, specificity, per-slide parasitemia error, and the paired slide-bootstrap
difference to 8 views. The scorer's cost grows with the views (one inference per view).

    python -m benchmarks.tta_views --pack cells-80.npz --cv 5 \\
        --models '.malaria/bench-accuracy/cv5-fold{fold}/recipe0-member0/cellnet-80-*/model.keras'
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path
from typing import Any

VIEW_COUNTS = (1, 2, 4, 8)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, required=True)
    parser.add_argument("--cv", type=int, default=5)
    parser.add_argument("--models", required=True,
                        help="glob of each fold's model file, with {fold} for 0..K-1")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from benchmarks.accuracy import (
        Scored,
        cv_splits,
        paired_difference,
        pooled_report,
        read_pack,
        signed_ci,
    )
    from malaria.core import defaults
    from malaria.evaluation.threshold import choose_threshold
    from malaria.model.predict import predict_views
    from malaria.model.serving import load_model_file

    records, load = read_pack(args.pack)
    _, splits = cv_splits(records, args.cv)
    scored: dict[int, list[Scored]] = {n: [] for n in VIEW_COUNTS}
    files = []
    for fold, split in enumerate(splits):
        found = sorted(glob.glob(args.models.format(fold=fold)))
        if not found:  # a CV still running: the folds done so far
            print(f"fold {fold + 1}/{len(splits)}: no model yet, left out", flush=True)
            continue
        if len(found) > 1:
            raise SystemExit(f"fold {fold}: more than one model for {args.models!r}: {found}")
        files.append(found[0])
        model = load_model_file(Path(found[0]))
        size = int(model.inputs[0].shape[1])
        val = load(split.of(records, "val"), size)
        test = load(split.of(records, "test"), size)
        val_views = predict_views(model, val.images)
        test_views = predict_views(model, test.images)
        for n in VIEW_COUNTS:
            val_p, test_p = val_views[:n].mean(axis=0), test_views[:n].mean(axis=0)
            threshold = choose_threshold(val.labels, val_p, rule=defaults.THRESHOLD_RULE)
            scored[n].append(Scored(test.labels, test_p, test.slides, threshold))
        print(f"fold {fold + 1}/{len(splits)} scored ({found[0]})", flush=True)

    if not files:
        raise SystemExit(f"no model matches {args.models!r}")
    results: dict[str, Any] = {"models": files, "views": {}}
    print("| views | accuracy | AUC | sensitivity | specificity | parasitemia err mean / max, pp"
          " | d acc vs 8 [CI] | d AUC vs 8 [CI] | d parasitemia vs 8 [CI] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in VIEW_COUNTS:
        cells = scored[n]
        report = pooled_report(cells)
        diff = paired_difference(scored[8], cells)
        row = report.to_dict()
        results["views"][str(n)] = {"metrics": {k: row[k] for k in (
            "accuracy", "roc_auc", "sensitivity", "specificity", "parasitemia_error_mean",
            "parasitemia_error_max")}, "vs_8_views": diff}

        print(f"| {n} | {report.accuracy:.4f} | {report.roc_auc:.4f} | "
              f"{report.sensitivity:.4f} | {report.specificity:.4f} | "
              f"{report.parasitemia_error_mean:.2f} / {report.parasitemia_error_max:.1f} | "
              f"{signed_ci(diff['accuracy'], 4)} | {signed_ci(diff['auc'], 4)} | "
              f"{signed_ci(diff['parasitemia_error_mean'], 2)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
