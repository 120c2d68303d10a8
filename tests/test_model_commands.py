"""`malaria train`, `evaluate`, `predict` and `models` on generated images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from malaria_cli.main import main
from malaria_dev.synthetic import bad_inputs, write_labelled_tree


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cmd")
    data = root / "cells"
    write_labelled_tree(data, 240, slides=6, seed=13)
    model = root / "model.keras"
    assert main(["train", "--data", str(data), "--out", str(model), "--arch", "cellnet-tiny",
                 "--input-size", "32", "--epochs", "3", "--batch-size", "32", "--no-tta"]) == 0
    return data, model


def test_train_writes_model_card_and_plots(trained: tuple[Path, Path]) -> None:
    _, model = trained
    card = json.loads(model.with_name("model.keras.json").read_text())
    assert card["architecture"] == "cellnet-tiny" and card["input_size"] == 32
    assert 0 < card["threshold"] < 1
    assert not set(card["slides"]["test"]) & set(card["slides"]["train"])
    assert model.with_name("model.roc.png").read_bytes().startswith(b"\x89PNG")
    # The same training summary the train flow registers, precision and CPU flags included.
    training = card["training"]
    assert training["epochs_run"] == 3 and training["precision_policy"] in (
        "float32", "mixed_bfloat16")
    assert set(training["cpu_flags"]) >= {"avx2", "avx512f", "avx512_bf16", "amx_tile"}
    # The cells to review are the test cells it got wrong, most confident first.
    review = card["label_review"]
    assert len(review) <= 16
    assert {c["slide"] for c in review} <= set(card["slides"]["test"])
    threshold = card["threshold"]
    for cell in review:
        wrong_side = (cell["probability"] < threshold if cell["label"] == "Parasitized"
                      else cell["probability"] >= threshold)
        assert wrong_side, cell
    margins = [abs(c["probability"] - threshold) for c in review]
    assert margins == sorted(margins, reverse=True)


def test_evaluate_prints_and_writes_metrics(trained: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data, model = trained
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 240
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "mcc", "ece"):
        assert 0 <= metrics[key] <= 1
    assert "| accuracy |" in capsys.readouterr().out


def test_predict_one_line_per_image(trained: tuple[Path, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    data, model = trained
    images = sorted(data.glob("*/*.png"))[:3]
    bad = tmp_path / "bad.png"
    bad.write_bytes(next(b for b in bad_inputs() if b.expected_reason == "not_an_image").data)
    assert main(["predict", *map(str, images), str(bad), "--model", str(model)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    for line, image in zip(lines[:3], images, strict=True):
        path, probability, label = line.split("\t")
        assert path == str(image) and 0 <= float(probability) <= 1
        assert label in ("Parasitized", "Uninfected")
    assert lines[3].split("\t")[1] == "error" and "not_an_image" in lines[3]


def test_models_commands_on_a_local_bucket(trained: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from malaria.io.store import LocalStore
    from malaria.registry.registry import ModelRegistry

    _, model = trained
    bucket = LocalStore(tmp_path / "bucket")
    registry = ModelRegistry(bucket)
    card = json.loads(model.with_name("model.keras.json").read_text())
    for version in ("20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"):
        registry.register(version, model, card, {})
    url = ["--data-url", bucket.url]
    assert main(["models", "promote", "20260101T000000Z-aaaaaa", *url]) == 0
    assert main(["models", "promote", "20260102T000000Z-bbbbbb", *url]) == 0
    assert main(["models", "list", *url]) == 0
    listing = capsys.readouterr().out
    assert "* 20260102T000000Z-bbbbbb" in listing
    assert main(["models", "rollback", *url]) == 0
    assert registry.champion_version() == "20260101T000000Z-aaaaaa"
    assert main(["models", "promote", "nope", *url]) == 1


def test_cells_to_review_are_the_confident_mistakes_by_key() -> None:
    import numpy as np

    from malaria.dataset.records import CellRecord
    from malaria.model.candidate import cells_to_review, review_table

    records = [CellRecord(key=f"dataset/x/{i}.png", label=0, slide=str(i % 2), content_id=str(i))
               for i in range(5)]
    labels = np.array([1, 1, 0, 0, 1], dtype=np.float32)
    probabilities = np.array([0.02, 0.9, 0.97, 0.3, 0.45])

    review = cells_to_review(records, labels, probabilities, threshold=0.5)

    # Wrong: cell 0 (parasitized at 0.02), 2 (uninfected at 0.97), 4 (parasitized at 0.45).
    assert [c["key"] for c in review] == ["dataset/x/0.png", "dataset/x/2.png",
                                          "dataset/x/4.png"]
    assert review[1] == {"key": "dataset/x/2.png", "slide": "0", "label": "Uninfected",
                         "probability": 0.97}
    assert cells_to_review(records, labels, probabilities, 0.5, limit=1) == review[:1]
    table = review_table(review)
    assert table.count("\n") == 4 and "`dataset/x/0.png` | 0 | Parasitized | 0.020" in table
    assert "No misclassified" in review_table([])


def test_evaluate_and_predict_use_the_views_the_threshold_was_chosen_with(
        trained: tuple[Path, Path], tmp_path: Path) -> None:
    """A card that records 8-view TTA: `evaluate` and `predict` average the same 8 views as
    the scorer (the card's threshold was chosen on those), unless told otherwise."""
    import shutil

    import numpy as np

    from malaria.dataset.decode import decode_to_array
    from malaria.dataset.records import records_from_folder
    from malaria.model.local import evaluate_local, predict_files
    from malaria.model.predict import predict_probabilities
    from malaria.model.serving import load_model_file

    data, model = trained
    copy = tmp_path / "tta.keras"
    shutil.copy(model, copy)
    card = json.loads(model.with_name("model.keras.json").read_text())
    (tmp_path / "tta.keras.json").write_text(json.dumps({**card, "tta": True}))
    net = load_model_file(copy)
    files = sorted(data.rglob("*.png"))[:12]
    images = np.stack([decode_to_array(f.read_bytes(), 32) for f in files])
    eight, one = (predict_probabilities(net, images, tta=t) for t in (True, False))
    assert not np.allclose(eight, one)

    predicted = [p.probability for p in predict_files(copy, files)]
    np.testing.assert_allclose(predicted, eight, atol=2e-6)

    cache = tmp_path / "cache"
    records = records_from_folder(data)
    by_card = evaluate_local(copy, data, cache_dir=cache)
    one_view = evaluate_local(copy, data, cache_dir=cache, tta=False)
    assert by_card.n == one_view.n == len(records)
    assert by_card.roc_auc != one_view.roc_auc
    assert evaluate_local(copy, data, cache_dir=cache, tta=True).roc_auc == by_card.roc_auc


def test_views_of_a_recorded_tta_setting() -> None:
    from malaria.core.views import views_of

    assert [views_of(v) for v in (True, False, None, 1, 2, 8, 20, 0)] == [8, 1, 1, 1, 2, 8, 8, 1]
    with pytest.raises(TypeError):
        views_of([8])
