"""The accuracy benchmark's pack (decoded cells for machines without the data folder) and its
time-to-target tracking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.accuracy import TARGETS, TimeToTarget, folder_loader, read_pack, write_pack
from malaria.dataset.records import records_from_folder, split_by_slide
from malaria.model.trainer import TrainConfig, train
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
