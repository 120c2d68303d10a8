"""The model commands on local files, no bucket: ``malaria train`` (a class-folder tree in,
a model file and its card out), ``malaria evaluate`` and ``malaria predict``.

The card is a JSON beside the model file (``model.keras.json``): threshold, architecture,
input size, test metrics and the training summary, the same document the train flow
registers as ``metrics.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from malaria.core.defaults import DEFAULT_THRESHOLD
from malaria.core.images import validate_image
from malaria.core.labels import predicted_class
from malaria.core.views import views_of
from malaria.dataset.cache import ImageCache
from malaria.dataset.decode import decode_to_array
from malaria.dataset.pipeline import load_arrays
from malaria.dataset.records import folder_reader, records_from_folder
from malaria.evaluation.metrics import EvaluationReport, evaluate
from malaria.io.atomic import write_atomic
from malaria.model.architectures import input_size_of
from malaria.model.candidate import (
    PreparedData,
    evaluate_candidate,
    metrics_document,
    prepare_data,
    train_candidate,
)
from malaria.model.checkpoints import checkpoint_id, save_for_serving
from malaria.model.config import RetrainConfig
from malaria.model.predict import predict_probabilities
from malaria.model.serving import load_model_file


def model_card_path(model_path: Path) -> Path:
    """The JSON beside a model file: threshold, architecture, input size, metrics."""
    return model_path.with_name(model_path.name + ".json")


def train_local(data_dir: Path, out: Path, config: RetrainConfig, *, cache_dir: Path,
                on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
                ) -> dict[str, Any]:
    """``malaria train``: a folder with class subfolders in, a model file and its card out.
    Trains through :func:`~malaria.model.candidate.train_candidate`, as the train flow does."""
    records = records_from_folder(data_dir)
    data = prepare_data(records, folder_reader(data_dir), ImageCache(cache_dir),
                        config.resolved_input_size(), seed=config.seed,
                        val_fraction=config.val_fraction, test_fraction=config.test_fraction)
    return train_and_save(data, out, config, on_epoch=on_epoch)


def train_and_save(data: PreparedData, out: Path, config: RetrainConfig, *,
                   on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
                   card_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train on prepared data (checkpoints beside ``out``, so a killed run resumes),
    evaluate, and write the model, its card (plus ``card_extra``) and its plots."""
    checkpoints = out.with_name(f".{out.name}.checkpoints") / checkpoint_id(
        config, data.manifest_sha256)
    result = train_candidate(config, data.train, data.val, checkpoint_dir=checkpoints,
                             on_epoch=on_epoch)
    evaluation = evaluate_candidate(result.model, data, result.history,
                                    threshold_rule=config.threshold_rule, tta=config.tta)
    model_bytes = save_for_serving(result.model, out)
    card = metrics_document(config, data, evaluation, result.summary())
    card["model_bytes"] = model_bytes
    card.update(card_extra or {})
    write_atomic(model_card_path(out), json.dumps(card, indent=2, default=str))
    for name, png in evaluation.plots.items():
        write_atomic(out.with_name(f"{out.stem}.{name}.png"), png)
    return card


def load_model_card(model_path: Path) -> dict[str, Any]:
    path = model_card_path(model_path)
    return json.loads(path.read_text()) if path.exists() else {}


def load_with_card(model_path: Path) -> tuple[Any, int, float, int]:
    """(model, input size, threshold, views per cell): the operating point the model was
    evaluated at, from its card (the threshold was chosen on probabilities averaged over
    that many views, as the scorer uses them); 0.5 and one view without a card."""
    model = load_model_file(model_path)
    size = input_size_of(model)
    card = load_model_card(model_path)
    return (model, size, float(card.get("threshold", DEFAULT_THRESHOLD)),
            views_of(card.get("tta")))


def evaluate_local(model_path: Path, data_dir: Path, *, cache_dir: Path,
                   tta: bool | int | None = None) -> EvaluationReport:
    """``malaria evaluate``: every cell of a class-folder tree, slide from the file name,
    at the model's operating point (its card's threshold and views; ``tta`` overrides the
    views)."""
    model, size, threshold, views = load_with_card(model_path)
    records = records_from_folder(data_dir)
    if not records:
        raise ValueError(f"no labelled images under {data_dir} (expected class subfolders)")
    arrays = load_arrays(records, ImageCache(cache_dir), size, folder_reader(data_dir))
    prob = predict_probabilities(model, arrays.images, tta=views if tta is None else tta)
    return evaluate(arrays.labels, prob, threshold, slides=list(arrays.slides))


@dataclass(frozen=True)
class Prediction:
    path: str
    probability: float | None
    label: str
    error: str = ""


def predict_files(model_path: Path, paths: Sequence[Path]) -> list[Prediction]:
    """``malaria predict``: one line per image, like the source article's last step; an
    unreadable file gets an error instead of a probability."""
    model, size, threshold, views = load_with_card(model_path)
    results: list[Prediction | None] = []
    arrays: list[np.ndarray] = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            results.append(Prediction(str(path), None, "", f"unreadable: {error.strerror}"))
            continue
        checked = validate_image(data)
        if not checked.accepted:
            results.append(Prediction(str(path), None, "", f"{checked.reason}: {checked.detail}"))
            continue
        arrays.append(decode_to_array(data, size))
        results.append(None)
    probs = iter(predict_probabilities(model, np.stack(arrays), tta=views) if arrays else [])
    out: list[Prediction] = []
    for path, result in zip(paths, results, strict=True):
        if result is None:
            p = float(next(probs))
            result = Prediction(str(path), p, predicted_class(p, threshold))
        out.append(result)
    return out
