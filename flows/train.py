"""Train flow: load data -> train -> evaluate by slide -> register -> promotion gate.

When the dataset manifest and the settings equal those the champion was trained on, the
flow stops after loading the data and says so: a repeat would only churn the registry and
make every slide due again."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.utilities.annotations import quote

from malaria.core import defaults
from malaria.core.settings import cache_dir as resolve_cache_dir
from malaria.core.settings import data_url as resolve_data_url
from malaria.io.store import open_store
from malaria.model.config import RetrainConfig
from malaria.registry.registry import ModelRegistry
from tasks.training import (
    check_repeat,
    evaluate_on_test_slides,
    gate_candidate,
    load_training_data,
    publish_training_report,
    register_candidate,
    train_candidate,
)


@flow(name="train", description="Train the CNN on dataset/, evaluate it on held-out slides, "
      "register it and promote it only if it is at least as good as the champion.",
      timeout_seconds=defaults.TRAIN_FLOW_TIMEOUT_S)
def train_flow(data_url: str | None = None, arch: str = defaults.DEFAULT_ARCH,
               input_size: int | None = None, epochs: int = defaults.TRAIN_EPOCHS,
               max_minutes: float | None = defaults.TRAIN_MAX_MINUTES,
               seed: int = defaults.TRAIN_SEED, batch_size: int = defaults.TRAIN_BATCH_SIZE,
               tta: bool = defaults.TEST_TIME_AUGMENTATION, cache_dir: str | None = None,
               min_auc: float = defaults.GATE_MIN_AUC,
               min_accuracy: float = defaults.GATE_MIN_ACCURACY,
               tolerance: float = defaults.GATE_TOLERANCE,
               ) -> dict[str, Any]:
    data_url = resolve_data_url(data_url)
    cache = resolve_cache_dir(cache_dir)
    config = RetrainConfig(arch=arch, input_size=input_size, epochs=epochs,
                           max_minutes=max_minutes, seed=seed, batch_size=batch_size, tta=tta,
                           min_auc=min_auc, min_accuracy=min_accuracy, tolerance=tolerance)
    data = load_training_data(data_url, config, cache)
    repeat = check_repeat(data_url, config, quote(data))
    if repeat is not None:  # nothing new: no training, no new version, no slide due
        return {"version": None, "promoted": False, "skipped": True, "reason": repeat,
                "champion": ModelRegistry(open_store(data_url)).champion_version()}
    trained = train_candidate(data_url, config, quote(data))
    evaluation = evaluate_on_test_slides(quote(trained), quote(data), config)
    version = register_candidate(data_url, quote(trained), quote(data), quote(evaluation), config)
    decision = gate_candidate(data_url, version, quote(evaluation), quote(data), config, cache)
    publish_training_report(data_url, version, quote(evaluation), decision, quote(data))
    return {"version": version, "promoted": decision.promote, "reason": decision.reason,
            "threshold": evaluation.threshold, "metrics": evaluation.test.to_dict()}
