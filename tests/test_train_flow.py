"""The train flow end to end on a real SeaweedFS under the Prefect test harness: a tiny
model, two epochs, synthetic cells already sorted into dataset/."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from malaria.core import layout
from malaria.io.store import S3Store
from malaria.registry.registry import ModelRegistry
from malaria_dev.synthetic import generate_cells

pytestmark = pytest.mark.integration


def fill_dataset(store: S3Store, n: int, seed: int) -> None:
    cells = list(generate_cells(n, slides=8, seed=seed))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda c: store.put_bytes(
            layout.dataset_key(c.class_name, str(c.slide_id), c.file_name), c.data), cells))


def test_train_flow_registers_evaluates_and_gates(seaweed_bucket: S3Store, prefect_harness: None,
                                                  tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.train import train_flow

    store = seaweed_bucket
    fill_dataset(store, 320, seed=4)
    options = {"data_url": store.url, "arch": "cellnet-tiny", "input_size": 32, "epochs": 3,
               "batch_size": 32, "tta": False, "cache_dir": str(tmp_path / "cache"),
               "min_auc": 0.5, "min_accuracy": 0.5}
    first = train_flow(**options)
    registry = ModelRegistry(store)
    assert first["promoted"] and registry.champion_version() == first["version"]
    record = registry.get(first["version"])
    assert record["input_size"] == 32 and record["architecture"] == "cellnet-tiny"
    slides = record["slides"]
    assert not (set(slides["train"]) & set(slides["test"]))
    assert not (set(slides["val"]) & set(slides["test"]))
    for name in ("model.keras", "metrics.json", "roc.png", "confusion_matrix.png",
                 "learning_curves.png", "worst_misclassified.png"):
        assert store.exists(layout.model_prefix(first["version"]) + name), name
    metrics = record["metrics"]
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "precision", "f1", "mcc",
                "ece", "confusion"):
        assert key in metrics
    assert list(store.list(layout.CHECKPOINTS)), "checkpoints are mirrored to the bucket"
    # The training summary is the library's (TrainResult.summary), as in `malaria train`'s card.
    training = record["training"]
    assert training["precision_policy"] in ("float32", "mixed_bfloat16")
    assert {"epochs_run", "best_epoch", "stopped", "images_per_s", "cpu_flags"} <= set(training)
    assert isinstance(record["label_review"], list)
    assert all(set(c) == {"key", "slide", "label", "probability"} for c in record["label_review"])

    # The same data and settings again: nothing new to learn, so no training, no version,
    # no promotion (which would make every slide due again), and the report says why.
    before = {i.key: i.etag for i in store.list(layout.MODELS)}
    second = train_flow(**options)
    assert second["skipped"] and not second["promoted"] and second["version"] is None
    assert "equal those the champion" in second["reason"]
    assert {i.key: i.etag for i in store.list(layout.MODELS)} == before

    # Other settings (another seed) train again, and the gate compares the candidate with
    # the champion re-scored on the same slides.
    third = train_flow(**{**options, "seed": 7})
    assert not third.get("skipped") and third["version"] != first["version"]
    decision = json.loads(store.get_bytes(layout.model_prefix(third["version"]) + "gate.json"))
    assert decision["champion"] is not None
    assert decision["champion"]["version"] == first["version"]

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["training-report", "per-slide-accuracy"])))}
    assert keys == {"training-report", "per-slide-accuracy"}
