"""Which model scores (the registry's champion or a model file, at its recorded operating
point), and loading it once per process."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malaria.core.defaults import DEFAULT_THRESHOLD
from malaria.core.views import views_of
from malaria.io.store import open_store
from malaria.model.serving import load_model_file, registered_model_file
from malaria.registry.provenance import sha256_file
from malaria.registry.registry import ModelRegistry
from malaria.scoring.paths import ScoringError, ScoringPaths


@dataclass(frozen=True)
class ModelRef:
    """Which model scores, and where a worker finds it (a small, picklable value)."""

    version: str
    threshold: float
    source: str  # "registry" | "file"
    location: str  # the registry's store URL, or a model file path
    architecture: str = ""
    tta: int = 1  # views averaged per cell (test-time augmentation), 1 = none


def resolve_model(paths: ScoringPaths, model_path: str | Path | None = None,
                  threshold: float | None = None, tta: bool | int | None = None) -> ModelRef:
    """The serving champion of ``paths.registry_url``, or a model file.

    Predictions use the operating point the model was evaluated at: the threshold and the
    test-time augmentation (``tta``: views averaged per cell; 8 costs 8x the inference)
    recorded in its metrics.json, or in the card beside a model file (``<file>.json``,
    written by ``malaria train``); 0.5 and none without a card. ``threshold`` and ``tta``
    override them. A file's version is ``file-<first 12 hex of its SHA-256>``, so scoring
    with another file makes every slide due again, as a new champion does.
    """
    if model_path is not None:
        from malaria.model.local import load_model_card

        path = Path(model_path).resolve()
        if not path.is_file():
            raise ScoringError(f"model file {path} does not exist")
        card = load_model_card(path)
        return ModelRef(
            version=f"file-{sha256_file(path)[:12]}",
            threshold=float(card.get("threshold", DEFAULT_THRESHOLD) if threshold is None
                            else threshold),
            source="file", location=str(path), architecture=str(card.get("architecture", "")),
            tta=views_of(card.get("tta") if tta is None else tta))
    if not paths.registry_url:
        raise ScoringError("no model: give a model file or a registry URL")
    registry = ModelRegistry(open_store(paths.registry_url))
    version = registry.champion_version()
    if version is None:
        raise ScoringError(f"no champion model in {paths.registry_url} "
                           "(train and promote one, or give a model file)")
    record = registry.get(version)
    recorded = float(record.get("threshold", DEFAULT_THRESHOLD))
    return ModelRef(version=version, threshold=recorded if threshold is None else threshold,
                    source="registry", location=paths.registry_url,
                    architecture=str(record.get("architecture", "")),
                    tta=views_of(record.get("tta") if tta is None else tta))


@dataclass
class LoadedModel:
    """A model ready to score: ``predict(uint8 NHWC batch, views) -> P(parasitized)``."""

    version: str
    input_size: int
    backend: str
    predict: Callable[[np.ndarray, int], np.ndarray]


# Keyed by (where, version): two registries may both have a "v1".
_MODEL_CACHE: dict[tuple[str, str], LoadedModel] = {}
_MODEL_LOCK = threading.Lock()
_MODEL_CACHE_SIZE = 2  # the champion, and the one it replaced while a run drains


def _model_file(ref: ModelRef) -> Path:
    if ref.source == "file":
        return Path(ref.location)
    # The one download location (malaria.model.serving): checked by SHA-256, reused.
    return registered_model_file(ModelRegistry(open_store(ref.location)), ref.version)


def load_model(ref: ModelRef) -> LoadedModel:
    """The model of ``ref.version``, loaded once per process (every later shard of the same
    version in this process, thread or Dask task, reuses it)."""
    with _MODEL_LOCK:
        cache_key = (ref.location, ref.version)
        cached = _MODEL_CACHE.get(cache_key)
        if cached is not None:
            return cached
        from malaria.model.architectures import input_size_of
        from malaria.model.predict import predict_probabilities

        model = load_model_file(_model_file(ref))
        size = input_size_of(model)

        def predict(images: np.ndarray, views: int = 1) -> np.ndarray:
            return predict_probabilities(model, images, batch_size=max(1, len(images)),
                                         tta=views)

        loaded = LoadedModel(ref.version, size, "tf.function", predict)
        predict(np.zeros((1, size, size, 3), np.uint8))  # trace now, not in the first batch
        while len(_MODEL_CACHE) >= _MODEL_CACHE_SIZE:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
        _MODEL_CACHE[cache_key] = loaded
        return loaded


def clear_model_cache() -> None:
    with _MODEL_LOCK:
        _MODEL_CACHE.clear()
