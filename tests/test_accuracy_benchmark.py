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
