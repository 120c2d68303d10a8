"""The accuracy benchmark: it trains through the product's function with the product's
defaults, scores with malaria.evaluation, its pack (decoded cells for machines without the
data folder) and its time-to-target tracking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.accuracy import TARGETS, TimeToTarget, folder_loader, read_pack, write_pack
from malaria.dataset.records import records_from_folder
from malaria.dataset.split import split_by_slide
from malaria.model.config import RetrainConfig, TrainConfig
from malaria.model.trainer import train
from malaria_dev.synthetic import write_labelled_tree

SIZE = 32


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "cells"
    write_labelled_tree(root, 160, slides=8, seed=5)
    return root


def test_a_pack_gives_the_same_records_split_and_pixels(cells: Path, tmp_path: Path) -> None:
    records = records_from_folder(cells)
    load = folder_loader(cells, tmp_path / "cache")
    write_pack(tmp_path / "cells.npz", records, load, SIZE)

    packed, load_packed = read_pack(tmp_path / "cells.npz")

    assert packed == records
    split = split_by_slide(records, seed=3, val_fraction=0.25, test_fraction=0.25)
    assert split_by_slide(packed, seed=3, val_fraction=0.25, test_fraction=0.25) == split
    for part in ("train", "val", "test"):
        subset = split.of(records, part)
        expected, got = load(subset, SIZE), load_packed(split.of(packed, part), SIZE)
        np.testing.assert_array_equal(got.images, expected.images)
        np.testing.assert_array_equal(got.labels, expected.labels)
        np.testing.assert_array_equal(got.slides, expected.slides)
    with pytest.raises(SystemExit, match="32 px"):
        load_packed(records[:2], 48)


def test_time_to_target_scores_test_after_every_epoch(cells: Path, tmp_path: Path) -> None:
    records = records_from_folder(cells)
    load = folder_loader(cells, tmp_path / "cache")
    split = split_by_slide(records, seed=3, val_fraction=0.25, test_fraction=0.25)
    train_set, val, test = (load(split.of(records, p), SIZE) for p in ("train", "val", "test"))
    tracker = TimeToTarget(val, test, tta=2)
    config = TrainConfig(arch="cellnet-tiny", input_size=SIZE, epochs=2, batch_size=16,
                         mixed_precision="float32", augment=False, patience=None)

    train(config, train_set, val, checkpoint_dir=tmp_path / "ckpt", resume=False,
          callbacks=[tracker])

    report = tracker.report()
    rows = report["per_epoch"]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert 0 < rows[0]["train_seconds"] < rows[1]["train_seconds"]
    for row in rows:
        assert set(TARGETS) <= set(row)
        assert row["met"] == all(row[k] >= v for k, v in TARGETS.items())
    assert report["reached"] == next((r for r in rows if r["met"]), None)
    assert report["evaluation_seconds_left_out"] >= 0


def test_a_fraction_of_the_slides_keeps_whole_slides_and_the_same_ones(cells: Path) -> None:
    from benchmarks.accuracy import _some_slides

    records = records_from_folder(cells)
    slides = {r.slide for r in records}

    some = _some_slides(records, 0.5, seed=1)

    kept = {r.slide for r in some}
    assert len(kept) == round(len(slides) / 2)
    assert some == [r for r in records if r.slide in kept]  # every cell of a kept slide
    assert _some_slides(records, 0.5, seed=1) == some


def test_fitting_on_the_validation_slides_needs_a_carried_threshold(cells: Path) -> None:
    from benchmarks.accuracy import main

    with pytest.raises(SystemExit) as refused:
        main(["--data", str(cells), "--fit-on", "train+val"])
    assert refused.value.code == 2
    with pytest.raises(SystemExit) as refused:
        main(["--data", str(cells), "--fit-on", "train+val", "--threshold-from", "x.json",
              "--eval", "val"])
    assert refused.value.code == 2


def test_listed_cells_are_left_out_of_training_only(cells: Path, tmp_path: Path) -> None:
    from benchmarks.accuracy import _without

    records = records_from_folder(cells)
    listing = tmp_path / "flagged.csv"
    listing.write_text("key,mean_p\n" + "".join(f"{r.key},0.01\n" for r in records[:3])
                       + "Parasitized/not_a_cell_here.png,0.02\n")

    kept = _without(records, listing)

    assert kept == records[3:]


class Recorded(RuntimeError):
    """Raised by the stand-in trainer once it has seen what it was asked to train."""


def test_the_benchmark_and_malaria_train_train_the_same_way(
        cells: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both end in malaria.model.candidate's trainer call, with equal TrainConfigs: the
    product's defaults, the same budget and seed, the same (auto) precision choice."""
    import malaria.model.candidate as candidate
    from benchmarks.accuracy import main as benchmark
    from malaria_cli.main import main as cli

    seen: list[TrainConfig] = []

    def stand_in(config: TrainConfig, *args: object, **kwargs: object) -> None:
        seen.append(config)
        raise Recorded("recorded")

    monkeypatch.setattr(candidate, "train", stand_in)
    monkeypatch.setenv("MALARIA_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(Recorded):
        benchmark(["--data", str(cells), "--archs", "cellnet-tiny", "--size", "32",
                   "--minutes", "1", "--cache", str(tmp_path / "cache"),
                   "--workdir", str(tmp_path / "work")])
    assert cli(["train", "--data", str(cells), "--out", str(tmp_path / "m.keras"),
                "--arch", "cellnet-tiny", "--input-size", "32", "--minutes", "1"]) == 1

    from_benchmark, from_cli = seen
    assert from_benchmark == from_cli
    assert from_cli.mixed_precision == "auto" and from_cli.max_minutes == 1.0
    product = RetrainConfig().train_config()
    for name in ("epochs", "patience", "batch_size", "learning_rate", "schedule",
                 "warmup_epochs", "min_lr_fraction", "label_smoothing", "weight_decay"):
        assert getattr(from_cli, name) == getattr(product, name), name


def test_overrides_reach_the_run_or_the_trainer() -> None:
    import argparse

    from benchmarks.accuracy import retrain_config

    args = argparse.Namespace(minutes=2.0, seed=3, size=None,
                              override='{"epochs": 1000, "patience": null}')
    config = retrain_config("cellnet", args)
    assert (config.epochs, config.max_minutes, config.seed) == (1000, 2.0, 3)
    assert config.train_config().patience is None
    article = retrain_config("seed-augmented", argparse.Namespace(
        minutes=1.0, seed=0, size=64, override=None))
    assert (article.batch_size, article.input_size) == (32, 64)
    assert article.train_config().warmup_epochs == 0.5


def test_scores_come_from_malaria_evaluation() -> None:
    from benchmarks.accuracy import metrics_row
    from malaria.evaluation.metrics import evaluate, expected_calibration_error, roc_auc

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200).astype(np.float32)
    probs = np.clip(labels * 0.6 + rng.random(200) * 0.4, 0, 1)
    slides = [str(i % 5) for i in range(200)]

    row = metrics_row(evaluate(labels, probs, 0.5, slides=slides))

    assert row["auc"] == pytest.approx(roc_auc(labels, probs))
    assert row["ece"] == pytest.approx(expected_calibration_error(labels, probs))
    assert row["cells"] == 200 and row["slides"] == 5
    assert set(row) >= {"accuracy", "sensitivity", "specificity", "precision", "f1", "mcc",
                        "confusion", "per_slide_accuracy_min", "per_slide_accuracy_median"}


def test_a_pack_holds_what_folds_are_built_from(cells: Path, tmp_path: Path) -> None:
    """Slide and label per cell: the folds (and each fold's validation slides) from a pack
    are the folds from the folder."""
    from benchmarks.accuracy import cv_splits

    records = records_from_folder(cells)
    write_pack(tmp_path / "cells.npz", records, folder_loader(cells, tmp_path / "cache"), SIZE)
    packed, _ = read_pack(tmp_path / "cells.npz")

    assert [(r.slide, r.label) for r in packed] == [(r.slide, r.label) for r in records]
    assert cv_splits(packed, 4) == cv_splits(records, 4)


def test_cv_summary_pools_folds_at_their_own_thresholds() -> None:
    from benchmarks.accuracy import Scored, cv_summary

    def fold(slides: list[str], probs: list[float], labels: list[int],
             threshold: float) -> Scored:
        return Scored(np.array(labels, dtype=np.float32), np.array(probs),
                      np.array(slides), threshold)

    # Fold 0 (threshold 0.5): slide a all right; slide b one cell of 4 over-called.
    # Fold 1 (threshold 0.3): slide c all right at 0.3 (it would be wrong at 0.5).
    scored = [fold(["a"] * 2 + ["b"] * 4, [0.9, 0.8, 0.6, 0.1, 0.2, 0.1], [1, 1, 0, 0, 0, 0],
                   0.5),
              fold(["c"] * 3, [0.35, 0.1, 0.4], [1, 0, 1], 0.3)]
    rows = [{"accuracy": a, "auc": 1.0, "sensitivity": 1.0, "specificity": s,
             "parasitemia_error_mean": e, "parasitemia_error_max": 2 * e,
             "per_slide_accuracy_min": a, "threshold": t, "train_seconds": sec,
             "precision_policy": "float32", "input_size": 32, "params": 10, "model_bytes": 99}
            for a, s, e, t, sec in ((5 / 6, 0.75, 12.5, 0.5, 10.0), (1.0, 1.0, 0.0, 0.3, 14.0))]

    summary = cv_summary(rows, scored, {"a": 0, "b": 0, "c": 1}, resamples=200)

    assert summary["accuracy"] == pytest.approx(8 / 9)
    assert summary["sensitivity"] == 1.0 and summary["specificity"] == pytest.approx(4 / 5)
    assert summary["cells"] == 9 and summary["slides"] == 3 and summary["cv_folds"] == 2
    per_slide = {row["slide"]: row for row in summary["parasitemia"]["per_slide"]}
    assert per_slide["b"]["error_pp"] == pytest.approx(25.0) and per_slide["b"]["fold"] == 0
    assert per_slide["c"]["predicted_pct"] == pytest.approx(200 / 3)
    assert summary["parasitemia"]["max"] == pytest.approx(25.0)
    assert summary["parasitemia"]["mean"] == pytest.approx(25 / 3)
    assert summary["spread"]["accuracy"]["min"] == pytest.approx(5 / 6)
    assert summary["spread"]["accuracy"]["sd"] == pytest.approx(np.std([5 / 6, 1], ddof=1))
    assert summary["train_seconds"] == {"per_fold": [10.0, 14.0], "total": 24.0, "mean": 12.0}
    boot = summary["bootstrap"]
    assert boot["accuracy"]["estimate"] == pytest.approx(8 / 9)
    assert boot["accuracy"]["low"] <= 8 / 9 <= boot["accuracy"]["high"]


def test_cv_end_to_end_from_a_pack(cells: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny real run: every slide tested once, in the folds the JSON records."""
    import json

    from benchmarks.accuracy import main

    pack = tmp_path / "cells.npz"
    assert main(["--data", str(cells), "--write-pack", str(pack), "--size", str(SIZE),
                 "--cache", str(tmp_path / "cache")]) == 0
    out = tmp_path / "cv.json"
    assert main(["--pack", str(pack), "--cv", "3", "--archs", "cellnet-tiny", "--size",
                 str(SIZE), "--minutes", "0.3", "--tta", "1", "--override", '{"epochs": 1}',
                 "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0

    report = json.loads(out.read_text())
    folds = report["meta"]["folds"]
    slides = {r.slide for r in records_from_folder(cells)}
    assert set(folds) == slides and set(folds.values()) == {0, 1, 2}
    result = report["cellnet-tiny"]
    assert [f["fold"] for f in result["folds"]] == [0, 1, 2]
    tested = [s for f in result["folds"] for s in f["slides"]["test"]]
    assert sorted(tested) == sorted(slides)  # each slide tested exactly once
    for f in result["folds"]:
        assert set(f["slides"]["test"]) == {s for s, i in folds.items() if i == f["fold"]}
        assert not set(f["slides"]["val"]) & set(f["slides"]["test"])
    assert result["cells"] == 160
    assert {p["slide"] for p in result["parasitemia"]["per_slide"]} == slides
    for key in ("accuracy", "auc", "sensitivity", "specificity"):
        assert set(result["spread"][key]) == {"mean", "sd", "min", "max"}
    assert set(result["bootstrap"]) >= {"accuracy", "auc", "parasitemia_error_mean"}
    assert len(result["train_seconds"]["per_fold"]) == 3
    assert "cpu_flags" in report["meta"]["machine"]
    assert "cellnet-tiny" in report["meta"]["precision_policy"]
    printed = capsys.readouterr().out
    assert all(f"cellnet-tiny fold {i}/3" in printed for i in (1, 2, 3))


def test_cv_refuses_what_does_not_go_with_it(cells: Path) -> None:
    from benchmarks.accuracy import main

    for extra in (["--eval", "val"], ["--fit-on", "train+val", "--threshold-from", "x.json"]):
        with pytest.raises(SystemExit) as refused:
            main(["--data", str(cells), "--cv", "3", *extra])
        assert refused.value.code == 2
    with pytest.raises(SystemExit, match="number of slides"):
        main(["--data", str(cells), "--cv", "9"])


def test_arch_speed_trains_and_scores_each_architecture_alternately(cells: Path,
                                                                     tmp_path: Path) -> None:
    import json

    from benchmarks import arch_speed

    write_pack(tmp_path / "cells.npz", records_from_folder(cells),
               folder_loader(cells, tmp_path / "cache"), SIZE)
    out = tmp_path / "speed.json"
    assert arch_speed.main(["--pack", str(tmp_path / "cells.npz"), "--archs",
                            "cellnet-tiny,cellnet-tiny", "--reps", "1", "--epochs", "1",
                            "--train", "64", "--val", "32", "--score", "32",
                            "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    [runs] = report["runs"].values()  # the same architecture twice: one entry, two runs
    assert len(runs) == 2 and all(r["train_images_per_s"] > 0 and r["score_cells_per_s"] > 0
                                  for r in runs)
    assert set(report["mean"]) == {"cellnet-tiny"} and "avx2" in report["cpu_flags"]
