"""Cross-validation's pure parts: slide folds, the validation slides inside a fold, the
per-slide parasitemia error and the slide-level bootstrap."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from malaria.dataset.records import CellRecord
from malaria.dataset.split import fold_split, slide_folds
from malaria.evaluation.metrics import evaluate, evaluate_pooled, parasitemia_errors, roc_auc
from malaria.evaluation.slides import slide_bootstrap, weighted_roc_auc


def make_records(per_slide: dict[str, tuple[int, int]]) -> list[CellRecord]:
    """(parasitized, uninfected) cell counts per slide -> records."""
    records = []
    for slide, (pos, neg) in per_slide.items():
        for i in range(pos + neg):
            label = int(i < pos)
            key = f"{'Parasitized' if label else 'Uninfected'}/C{slide}_cell_{i}.png"
            records.append(CellRecord(key=key, label=label, slide=slide, content_id=key))
    return records


# 23 slides mostly parasitized, 12 of healthy patients (uninfected only), like the NIH set.
SLIDES = {**{str(i): (30 + i, 10) for i in range(1, 24)},
          **{str(i): (0, 25 + i) for i in range(24, 36)}}


def majority(slide: str) -> int:
    pos, neg = SLIDES[slide]
    return int(pos >= neg)


def test_every_slide_is_in_exactly_one_fold() -> None:
    folds = slide_folds(make_records(SLIDES), 5, seed=1)
    assert set(folds) == set(SLIDES)
    assert set(folds.values()) == set(range(5))
    tested = [s for fold in range(5) for s, f in folds.items() if f == fold]
    assert sorted(tested) == sorted(SLIDES)  # each once


def test_folds_are_balanced_by_majority_class() -> None:
    folds = slide_folds(make_records(SLIDES), 5, seed=1)
    sizes = Counter(folds.values())
    assert max(sizes.values()) - min(sizes.values()) <= 1
    for group in (0, 1):
        per_fold = Counter(f for s, f in folds.items() if majority(s) == group)
        counts = [per_fold.get(fold, 0) for fold in range(5)]
        assert max(counts) - min(counts) <= 1, (group, counts)


def test_folds_depend_on_the_seed_only() -> None:
    records = make_records(SLIDES)
    assert slide_folds(records, 5, seed=7) == slide_folds(list(reversed(records)), 5, seed=7)
    assert slide_folds(records, 5, seed=7) != slide_folds(records, 5, seed=8)


def test_fold_count_must_fit_the_slides() -> None:
    records = make_records({"1": (3, 1), "2": (0, 4), "3": (2, 2)})
    for k in (1, 4):
        with pytest.raises(ValueError, match="number of slides"):
            slide_folds(records, k)
    assert len(set(slide_folds(records, 3).values())) == 3


def test_validation_slides_come_from_the_folds_training_slides() -> None:
    records = make_records(SLIDES)
    folds = slide_folds(records, 5, seed=1)
    for fold in range(5):
        split = fold_split(records, folds, fold, seed=fold)
        assert set(split.test) == {s for s, f in folds.items() if f == fold}
        assert not set(split.val) & set(split.test) and not set(split.train) & set(split.test)
        assert not set(split.val) & set(split.train)
        assert set(split.train) | set(split.val) | set(split.test) == set(SLIDES)
        # The product split's share: 15% of all slides, here 3/16 of the training pool.
        pool = len(SLIDES) - len(split.test)
        assert len(split.val) == pytest.approx(pool * 0.15 / 0.8, abs=1.01)
        assert {majority(s) for s in split.val} == {0, 1}  # stratified
        assert fold_split(records, folds, fold, seed=fold) == split
    with pytest.raises(ValueError, match="fold 5"):
        fold_split(records, folds, 5)


def test_parasitemia_error_on_a_hand_made_example() -> None:
    # Slide A: 4 cells, 2 labelled parasitized, 3 called -> 75% vs 50% = 25 points.
    # Slide B: 5 cells, 1 labelled, 1 called (a different cell) -> 0 points, though 2 wrong.
    # Slide C: 2 uninfected cells, both called uninfected -> 0 points.
    y = [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    prob = [0.9, 0.8, 0.7, 0.1, 0.2, 0.6, 0.1, 0.1, 0.1, 0.3, 0.2]
    slides = ["A"] * 4 + ["B"] * 5 + ["C"] * 2

    report = evaluate(y, prob, 0.5, slides=slides)

    assert parasitemia_errors(report.per_slide) == pytest.approx([25.0, 0.0, 0.0])
    assert report.parasitemia_error_mean == pytest.approx(25 / 3)
    assert report.parasitemia_error_max == pytest.approx(25.0)
    data = report.to_dict()
    assert data["parasitemia_error_mean"] == pytest.approx(25 / 3)
    assert data["parasitemia_error_max"] == pytest.approx(25.0)


def test_pooled_cells_are_judged_at_their_own_folds_threshold() -> None:
    y = [1, 0, 1, 0]
    prob = [0.6, 0.4, 0.3, 0.2]
    # Fold 1 chose 0.5, fold 2 chose 0.25: cell 3 (p 0.3) is then called parasitized.
    report = evaluate_pooled(y, prob, [0.5, 0.5, 0.25, 0.25], slides=["a", "a", "b", "b"])
    assert report.accuracy == 1.0
    assert report.roc_auc == pytest.approx(roc_auc(y, prob))
    assert report.to_dict()["threshold"] is None
    with pytest.raises(ValueError, match="thresholds"):
        evaluate_pooled(y, prob, [0.5])


def scored_cells(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    slides, labels, probs = [], [], []
    for s in range(20):
        n = int(rng.integers(20, 60))
        share = 0.0 if s % 3 == 0 else rng.uniform(0.3, 0.9)
        y = (rng.random(n) < share).astype(np.int8)
        # Slide-specific shift, so slides differ the way stains do.
        p = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.2, n) + rng.normal(0, 0.08), 0, 1)
        slides += [f"s{s}"] * n
        labels.append(y)
        probs.append(p)
    y_all, p_all = np.concatenate(labels), np.concatenate(probs)
    return y_all, p_all, (p_all >= 0.5).astype(np.int8), slides


def test_bootstrap_interval_holds_the_estimate_and_repeats() -> None:
    y, p, calls, slides = scored_cells()

    result = slide_bootstrap(y, p, calls, slides, resamples=500, seed=3)

    assert result["slides"] == 20 and result["resamples"] == 500
    assert result["accuracy"]["estimate"] == pytest.approx(float(np.mean(calls == y)))
    assert result["auc"]["estimate"] == pytest.approx(roc_auc(y, p))
    report = evaluate(y, p, 0.5, slides=slides)
    assert result["parasitemia_error_mean"]["estimate"] == pytest.approx(
        report.parasitemia_error_mean)
    for name in ("accuracy", "auc", "parasitemia_error_mean"):
        interval = result[name]
        assert interval["low"] <= interval["estimate"] <= interval["high"], name
        assert interval["low"] < interval["high"], name
    assert slide_bootstrap(y, p, calls, slides, resamples=500, seed=3) == result
    assert slide_bootstrap(y, p, calls, slides, resamples=500, seed=4) != result


def test_bootstrap_resamples_whole_slides() -> None:
    # Two slides whose cells are all right and one whose cells are all wrong: every
    # resample's accuracy is a mix of whole slides, never of single cells.
    y = [1] * 10 + [0] * 10 + [1] * 10
    calls = [1] * 10 + [0] * 10 + [0] * 10
    p = [0.9] * 10 + [0.1] * 10 + [0.2] * 10
    slides = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    result = slide_bootstrap(y, p, calls, slides, resamples=300, seed=0)
    assert result["accuracy"]["low"] == 0.0 and result["accuracy"]["high"] == 1.0
    assert result["auc"]["undefined_resamples"] > 0  # a resample of one class has no AUC


def test_weighted_auc_equals_the_auc_of_repeated_cells() -> None:
    y, p, _, _ = scored_cells(1)
    p = np.round(p, 1)  # ties, which count one half
    weights = np.random.default_rng(2).integers(0, 4, y.size)
    repeated = np.repeat(np.arange(y.size), weights)
    assert weighted_roc_auc(y, p, weights) == pytest.approx(roc_auc(y[repeated], p[repeated]))


def test_parasitemia_floor_counts_cells_by_slide_and_class() -> None:
    from benchmarks.parasitemia_floor import SlideCounts

    counts = SlideCounts.from_cells([1, 1, 0, 0, 0, 1], ["b", "b", "b", "a", "a", "c"])
    assert counts.slides == ("a", "b", "c")
    assert counts.negatives.tolist() == [2, 1, 0]
    assert counts.positives.tolist() == [0, 2, 1]
    assert counts.cells.tolist() == [2, 3, 1]


def test_parasitemia_floor_simulation_follows_the_rates_and_the_slide_size() -> None:
    from benchmarks.parasitemia_floor import SlideCounts, simulated_errors, summarise

    # A healthy patient's slide: every false positive is the whole error.
    healthy = SlideCounts(("h",), np.array([100]), np.array([0]))
    errors = simulated_errors(healthy, 0.9, 0.9, draws=4000, seed=1)
    assert errors.shape == (4000, 1)
    assert errors.mean() == pytest.approx(10.0, abs=0.3)
    assert simulated_errors(healthy, 0.5, 1.0, draws=10).max() == 0.0  # no negatives missed

    # The same error rate costs a small slide more in its worst case than a large one.
    small = SlideCounts(tuple(map(str, range(20))), np.full(20, 60), np.zeros(20, np.int64))
    large = SlideCounts(tuple(map(str, range(20))), np.full(20, 600), np.zeros(20, np.int64))
    on_small = summarise(simulated_errors(small, 0.97, 0.97, draws=2000))
    on_large = summarise(simulated_errors(large, 0.97, 0.97, draws=2000))
    assert on_small["mean_pp"] == pytest.approx(on_large["mean_pp"], abs=0.2)  # ~3 points
    assert on_small["max_pp"] > on_large["max_pp"] + 2.0
    scaled = small.scaled_to(600)
    assert scaled.negatives.tolist() == large.negatives.tolist()
    assert scaled.positives.tolist() == large.positives.tolist()
    mixed = SlideCounts(("m",), np.array([3]), np.array([1])).scaled_to(100)
    assert (mixed.negatives[0], mixed.positives[0]) == (75, 25)
    perfect = summarise(simulated_errors(small, 1.0, 1.0, draws=50))
    assert perfect["mean_pp"] == 0.0 and perfect["p_both_within_target"] == 1.0


def test_parasitemia_floor_reads_a_cv_state(tmp_path: Path) -> None:
    from benchmarks.parasitemia_floor import measured

    for fold in range(2):
        labels = np.repeat([1.0, 0.0], 50)
        probabilities = np.where(labels == 1, 0.9, 0.1)
        probabilities[0] = 0.2  # one missed parasitized cell in each fold
        # The validation slides miss parasitized cells at the same rate, so the adjusted
        # count corrects the test slides' shortfall exactly.
        np.savez(tmp_path / f"fold{fold}-demo.npz", labels=labels,
                 probabilities=probabilities, threshold=np.float64(0.5),
                 slides=np.array([f"s{fold}"] * 100),
                 val_labels=labels, val_probabilities=probabilities)
    found, _ = measured(tmp_path, "demo")
    assert found["folds"] == 2 and found["slides"] == 2
    assert found["sensitivity"] == pytest.approx(0.98)
    assert found["specificity"] == 1.0
    assert found["mean_pp"] == pytest.approx(1.0) and found["max_pp"] == pytest.approx(1.0)
    assert found["adjusted_count"] == {"mean_pp": 0.0, "max_pp": 0.0}
    with pytest.raises(SystemExit, match="no fold state"):
        measured(tmp_path, "missing")


def test_cv_compare_pairs_result_files_as_the_fold_models_would(tmp_path: Path) -> None:
    """Two CV result JSONs, paired slide by slide, give the same accuracy and parasitemia
    differences as pairing the cells that wrote them."""
    import json

    from benchmarks.accuracy import (
        Scored,
        cv_summary,
        metrics_row,
        paired_difference,
        pooled_report,
    )
    from benchmarks.cv_compare import main, paired, read_run

    rng = np.random.default_rng(3)
    slides = np.repeat([f"s{i}" for i in range(12)], 20)
    labels = (rng.random(slides.size) < np.repeat(rng.random(12), 20)).astype(np.float32)

    def scored(noise: float) -> list[Scored]:
        probs = np.clip(0.2 + 0.6 * labels + rng.normal(0, noise, labels.size), 0, 1)
        return [Scored(labels, probs.astype(np.float32), slides, 0.5)]

    def result_file(name: str, cells: list[Scored]) -> Path:
        row = {**metrics_row(pooled_report(cells)), "threshold": 0.5, "train_seconds": 1.0,
               "precision_policy": "float32", "input_size": 80, "params": 1,
               "model_bytes": 1, "epochs": 3}
        summary = cv_summary([row], cells, {s: 0 for s in slides}, resamples=50)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({name: summary, "meta": {}}, default=float))
        return path

    base, other = scored(0.35), scored(0.2)
    base_file, other_file = result_file("base", base), result_file("other", other)
    from_cells = paired_difference(base, other, resamples=300)
    from_files = paired(read_run(str(base_file)), read_run(f"{other_file}:other"),
                        resamples=300)
    for key in ("accuracy", "parasitemia_error_mean"):
        assert from_files[key] == pytest.approx(from_cells[key])
    assert from_files["accuracy"]["estimate"] > 0  # less noise, fewer mistakes
    assert "auc" not in from_files  # needs each cell's score

    assert main([str(base_file), str(other_file), "--json", str(tmp_path / "out.json")]) == 0
    written = json.loads((tmp_path / "out.json").read_text())
    assert set(written["versus_first"]) == {"other:other"}

    moved = json.loads(other_file.read_text())
    moved["other"]["parasitemia"]["per_slide"][0]["slide"] = "elsewhere"
    other_file.write_text(json.dumps(moved))
    with pytest.raises(ValueError, match="same slides"):
        paired(read_run(str(base_file)), read_run(str(other_file)))
    with pytest.raises(ValueError, match="no variant"):
        read_run(f"{base_file}:missing")
