"""The label review: which cells every model contradicts, and the AUC without those a
reviewer judged mislabelled."""

from __future__ import annotations

import csv
import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.label_review import contradicted, main
from malaria.model.architectures import build_model
from malaria.model.checkpoints import save_for_serving
from malaria_dev.synthetic import write_labelled_tree


def test_a_cell_is_listed_by_the_most_generous_model() -> None:
    labels = np.array([1, 1, 0, 0], dtype=np.float32)
    probabilities = {
        # cell 0: one model agrees with its label (0.9), so it is not the first listed;
        # cell 2 (labelled 0): both models say parasitized.
        "a": np.array([0.1, 0.2, 0.95, 0.1]),
        "b": np.array([0.9, 0.3, 0.80, 0.2]),
    }

    assert contradicted(labels, probabilities, top=3) == [2, 1, 0]
    # Only cells whose label every model gives less than 0.5: cell 0 has one that agrees.
    assert contradicted(labels, probabilities, top=4, below=0.5) == [2, 1]


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("review")
    cells = root / "cells"
    write_labelled_tree(cells, 120, slides=8, seed=7)
    model = root / "tiny.keras"
    save_for_serving(build_model("cellnet-tiny", 32), model)
    return root, cells, model


def test_it_lists_the_cells_and_reports_auc_without_the_judged_ones(
        reviewed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, cells, model = reviewed
    listed, montage, out = tmp_path / "listed.csv", tmp_path / "m.png", tmp_path / "r.json"
    args = ["--data", str(cells), "--model", f"tiny={model}", "--model", f"again={model}",
            "--top", "6", "--cache", str(root / "cache")]

    assert main([*args, "--csv", str(listed), "--montage", str(montage)]) == 0

    rows = list(csv.DictReader(listed.open()))
    assert len(rows) == 6
    assert {"key", "slide", "label", "p_tiny", "p_again", "mean_p", "verdict"} <= set(rows[0])
    of_label = [float(r["p_tiny"]) if r["label"] == "1" else 1 - float(r["p_tiny"])
                for r in rows]
    # The most contradicted first; the CSV rounds to 4 decimals, so near-ties may swap.
    assert all(later >= earlier - 1e-4 for earlier, later in pairwise(of_label))
    with Image.open(montage) as image:
        assert image.size == (5 * 160, 2 * 176)

    judged = tmp_path / "judged.csv"
    with judged.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["key", "verdict"])
        writer.writeheader()
        writer.writerows([{"key": rows[0]["key"], "verdict": "mislabelled"},
                          {"key": rows[1]["key"], "verdict": "ambiguous"},
                          {"key": rows[2]["key"], "verdict": ""}])

    assert main([*args, "--judged", str(judged), "--json", str(out)]) == 0

    result = json.loads(out.read_text())
    assert result["part"] == "test" and result["cells"] > 6
    assert result["verdicts"] == {"mislabelled": 1, "ambiguous": 1, "correct": 0}
    # Taking out the cell the model contradicts most can only raise its AUC.
    assert result["auc_without_mislabelled"]["tiny"] >= result["auc"]["tiny"]
    assert result["auc"]["tiny"] == result["auc"]["again"]
    assert 0.0 <= result["auc"]["tiny"] <= 1.0
    assert set(result["auc_without_mislabelled_parasitized_only"]) == {"tiny", "again"}


def test_a_verdict_it_does_not_know_or_a_foreign_key_is_refused(
        reviewed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, cells, model = reviewed
    args = ["--data", str(cells), "--model", f"tiny={model}", "--cache", str(root / "cache")]
    bad = tmp_path / "bad.csv"
    bad.write_text("key,verdict\nsome/cell.png,wrong\n")
    with pytest.raises(SystemExit, match="unknown verdict"):
        main([*args, "--judged", str(bad)])
    bad.write_text("key,verdict\nParasitized/not_in_the_split.png,mislabelled\n")
    with pytest.raises(SystemExit, match="not in the test split"):
        main([*args, "--judged", str(bad)])

