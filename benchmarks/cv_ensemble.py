"""What averaging independently trained models buys, on models a cross-validation already
trained (no training).

``benchmarks.accuracy --cv K`` keeps each fold's model in its work folder
(``<workdir>/cvK-fold<k>/recipe<r>-member0/<arch>-<size>-<pid>/model.keras``). Name each
kept recipe with ``--member NAME=GLOB`` (``{fold}`` stands for 0..K-1) and each ensemble
with ``--ensemble NAME+NAME``. In every fold each member scores its validation and test
cells at the product's views (``--views``, default the product's setting); an ensemble
averages its members' probabilities and chooses its threshold on its own averaged
validation scores (the product's rule), as a member does alone. The folds' test cells are
pooled, and every member and ensemble is compared with the first member: accuracy, AUC,
sensitivity, specificity, per-slide parasitemia error, and the paired slide-bootstrap
difference. An ensemble costs its members' training and scoring together.

    python -m benchmarks.cv_ensemble --pack cells-80.npz --cv 5 \\
        --member cellnet='work/cv5-fold{fold}/recipe0-member0/cellnet-80-*/model.keras' \\
        --member hed='work/cv5-fold{fold}/recipe1-member0/cellnet-hed-80-*/model.keras' \\
        --ensemble cellnet+hed

Models of another input size take a pack of that size: ``--pack`` may be given once per size.

``--rules youden,parasitemia,0.5`` scores every model and ensemble under each threshold rule
(rows ``NAME @RULE``; the first rule's first model is the paired baseline): a rule of
:func:`malaria.evaluation.threshold.choose_threshold`, ``parasitemia`` (the threshold
whose calls give the smallest mean per-slide parasitemia error on the validation slides:
the lab's number, fitted directly) or a fixed number (no fitting).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FoldScores:
    """One model's (or ensemble's) probabilities on one fold's validation and test cells."""

    val: np.ndarray
    test: np.ndarray


def parse_members(entries: list[str]) -> dict[str, str]:
    members: dict[str, str] = {}
    for entry in entries:
        name, sep, pattern = entry.partition("=")
        if not sep or not name or not pattern:
            raise ValueError(f"--member takes NAME=GLOB, got {entry!r}")
        if "+" in name or name in members:
            raise ValueError(f"member names are unique and hold no '+': {name!r}")
        members[name] = pattern
    return members


def parse_ensembles(entries: list[str], members: dict[str, str]) -> dict[str, list[str]]:
    ensembles: dict[str, list[str]] = {}
    for entry in entries:
        names = entry.split("+")
        unknown = [n for n in names if n not in members]
        if len(names) < 2 or unknown or len(set(names)) != len(names):
            raise ValueError(f"--ensemble takes two or more distinct --member names joined "
                             f"by '+': {entry!r}")
        ensembles[entry] = names
    return ensembles


def average(scores: list[FoldScores]) -> FoldScores:
    """An ensemble's scores: its members' probabilities, averaged."""
    return FoldScores(np.mean([s.val for s in scores], axis=0),
                      np.mean([s.test for s in scores], axis=0))


def parasitemia_threshold(labels: np.ndarray, probabilities: np.ndarray,
                           slides: np.ndarray) -> float:
    """The threshold (midpoints between adjacent distinct scores, as the product's rules
    use) whose calls give the smallest mean |called - labelled| share of parasitized cells
    over the slides; ties go to the candidate nearest 0.5."""
    from malaria.evaluation.threshold import threshold_candidates

    candidates = threshold_candidates(np.unique(probabilities))
    error = np.zeros(candidates.size)
    slide_names = np.unique(slides)
    for slide in slide_names:
        mine = slides == slide
        scores = np.sort(probabilities[mine])
        called = (scores.size - np.searchsorted(scores, candidates, side="left")) / scores.size
        error += np.abs(called - labels[mine].mean())
    best = error <= error.min() + 1e-12
    chosen = candidates[best]
    return float(chosen[np.argmin(np.abs(chosen - 0.5))])


def parse_rules(text: str) -> list[str]:
    from malaria.evaluation.threshold import THRESHOLD_RULES

    rules = [r.strip() for r in text.split(",") if r.strip()]
    for rule in rules:
        if rule in (*THRESHOLD_RULES, "parasitemia"):
            continue
        try:
            if not 0.0 < float(rule) < 1.0:
                raise ValueError
        except ValueError:
            raise ValueError(f"--rules: {rule!r} is neither a rule ({', '.join(THRESHOLD_RULES)}"
                             f", parasitemia) nor a threshold in (0, 1)") from None
    if not rules or len(set(rules)) != len(rules):
        raise ValueError("--rules takes distinct rules, separated by commas")
    return rules


def threshold_by(rule: str, labels: np.ndarray, probabilities: np.ndarray,
                 slides: np.ndarray) -> float:
    from malaria.evaluation.threshold import THRESHOLD_RULES, choose_threshold

    if rule == "parasitemia":
        return parasitemia_threshold(labels, probabilities, slides)
    if rule in THRESHOLD_RULES:
        return choose_threshold(labels, probabilities, rule=rule)  # type: ignore[arg-type]
    return float(rule)


def one_model_file(pattern: str, fold: int) -> str | None:
    found = sorted(glob.glob(pattern.format(fold=fold)))
    if len(found) > 1:
        raise SystemExit(f"fold {fold}: more than one model for {pattern!r}: {found}")
    return found[0] if found else None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, action="append", required=True,
                        help="the cells as a pack; once per input size the models take")
    parser.add_argument("--cv", type=int, default=5)
    parser.add_argument("--member", action="append", required=True, metavar="NAME=GLOB",
                        help="each fold's model file of one kept recipe, {fold} for 0..K-1")
    parser.add_argument("--ensemble", action="append", default=[], metavar="A+B[+C]")
    parser.add_argument("--views", type=int,
                        help="test-time views per cell (default: the product's setting)")
    parser.add_argument("--rules", help="threshold rules, comma-separated (default: the "
                        "product's); see above")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from malaria.core import defaults

    try:
        members = parse_members(args.member)
        ensembles = parse_ensembles(args.ensemble, members)
        rules = parse_rules(args.rules or defaults.THRESHOLD_RULE)
    except ValueError as error:
        parser.error(str(error))

    from benchmarks.accuracy import (
        CV_RESAMPLES,
        CV_SEED,
        Scored,
        cv_splits,
        paired_difference,
        pooled_cells,
        pooled_report,
        read_pack,
        signed_ci,
        spread,
        with_interval,
    )
    from malaria.core.views import views_of
    from malaria.evaluation.slides import slide_bootstrap
    from malaria.model.predict import predict_views
    from malaria.model.serving import load_model_file

    views = args.views or views_of(defaults.TEST_TIME_AUGMENTATION)
    packs = {}
    for path in args.pack:
        records, load = read_pack(path)
        packs[int(np.load(path, mmap_mode="r")["images"].shape[1])] = (records, load)
    records = next(iter(packs.values()))[0]
    _, splits = cv_splits(records, args.cv)
    models = [*members, *ensembles]
    names = [f"{m} @{r}" if len(rules) > 1 else m for r in rules for m in models]
    scored: dict[str, list[Scored]] = {name: [] for name in names}
    files: dict[str, list[str]] = {name: [] for name in members}
    folds_used = []
    for fold, split in enumerate(splits):
        found = {name: one_model_file(pattern, fold) for name, pattern in members.items()}
        missing = [name for name, file in found.items() if file is None]
        if missing:  # a CV still running: the folds every member has so far
            print(f"fold {fold + 1}/{len(splits)}: no model yet for {missing}, left out",
                  flush=True)
            continue
        folds_used.append(fold)
        scores: dict[str, FoldScores] = {}
        labels: dict[str, Any] = {}
        for name, file in found.items():
            assert file is not None
            files[name].append(file)
            model = load_model_file(Path(file))
            size = int(model.inputs[0].shape[1])
            if size not in packs:
                raise SystemExit(f"{file} takes {size} px cells: give a --pack of that size")
            _, load = packs[size]
            val, test = load(split.of(records, "val"), size), load(split.of(records, "test"),
                                                                   size)
            labels = {"val": val.labels, "test": test.labels, "slides": test.slides,
                      "val_slides": val.slides}
            scores[name] = FoldScores(predict_views(model, val.images, views=views).mean(0),
                                      predict_views(model, test.images, views=views).mean(0))
        for name, parts in ensembles.items():
            scores[name] = average([scores[part] for part in parts])
        for rule in rules:
            for model_name in models:
                name = f"{model_name} @{rule}" if len(rules) > 1 else model_name
                got = scores[model_name]
                threshold = threshold_by(rule, labels["val"], got.val, labels["val_slides"])
                scored[name].append(Scored(labels["test"], got.test.astype(np.float32),
                                           labels["slides"], threshold, labels["val"],
                                           got.val.astype(np.float32)))
        print(f"fold {fold + 1}/{len(splits)} scored", flush=True)
    if not folds_used:
        raise SystemExit("no fold has a model for every member")

    first = names[0]
    results: dict[str, Any] = {"views": views, "rules": rules, "folds": folds_used,
                               "models": files, "ensembles": ensembles, "results": {}}
    print(f"\n{len(folds_used)} of {len(splits)} folds, {views} view(s) per cell; intervals: "
          f"95%, {CV_RESAMPLES} resamples of the slides; d: paired, against {first}\n")
    print("| model | accuracy [CI] | d acc [CI] | AUC [CI] | d AUC [CI] | sensitivity | "
          "specificity | parasitemia err mean [CI] / max, pp | d parasitemia [CI] | "
          "per-fold acc mean ± sd (min-max) |")
    print("|" + "---|" * 10)
    for name in names:
        cells = scored[name]
        report = pooled_report(cells)
        row = report.to_dict()
        labels, probs, slides, calls = pooled_cells(cells)
        interval = slide_bootstrap(labels, probs, calls, list(slides), resamples=CV_RESAMPLES,
                                   seed=CV_SEED)
        per_fold = spread([pooled_report([fold]).accuracy for fold in cells])
        entry: dict[str, Any] = {"metrics": {k: row[k] for k in (
            "accuracy", "roc_auc", "sensitivity", "specificity", "parasitemia_error_mean",
            "parasitemia_error_max")}, "bootstrap": interval, "per_fold_accuracy": per_fold,
            "thresholds": [s.threshold for s in cells]}
        deltas = ["-", "-", "-"]
        if name != first:
            diff = paired_difference(scored[first], cells)
            entry["versus_first"] = {"variant": first, **diff}
            deltas = [signed_ci(diff[key], digits) for key, digits in (
                ("accuracy", 4), ("auc", 4), ("parasitemia_error_mean", 2))]
        results["results"][name] = entry
        print(f"| {name} | {with_interval(report.accuracy, interval['accuracy'], 4)} | {deltas[0]} | "
              f"{with_interval(report.roc_auc, interval['auc'], 4)} | {deltas[1]} | "
              f"{report.sensitivity:.4f} | {report.specificity:.4f} | "
              f"{with_interval(report.parasitemia_error_mean, interval['parasitemia_error_mean'], 2)} / "
              f"{report.parasitemia_error_max:.1f} | {deltas[2]} | "
              f"{per_fold['mean']:.4f} ± {per_fold['sd']:.4f} ({per_fold['min']:.4f}-"
              f"{per_fold['max']:.4f}) |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
