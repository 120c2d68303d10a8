"""The one way a serving model reaches memory: where a registered model is downloaded to,
and how a model file is loaded (scoring, the gate's re-scoring of the champion, and
``malaria predict`` / ``malaria evaluate`` all come through here)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from malaria.core.settings import cache_dir
from malaria.registry.provenance import sha256_file
from malaria.registry.registry import ModelRegistry


def model_download_folder(registry: ModelRegistry, version: str,
                          root: str | Path | None = None) -> Path:
    """``<cache>/models/<registry>/<version>/``: one folder per registry (two buckets may
    both hold a "v1") and version, under the project's cache folder."""
    where = hashlib.sha256(registry.store.url.encode()).hexdigest()[:12]
    return Path(cache_dir(str(root) if root else None)) / "models" / where / version


def registered_model_file(registry: ModelRegistry, version: str,
                          root: str | Path | None = None) -> Path:
    """The model file of ``version``, downloaded once: a file already in the cache is used
    when its SHA-256 matches the registry's record, else fetched again (checked, then renamed
    into place, so concurrent workers on one host never load a partial file)."""
    model = registry.get(version)["model"]
    folder = model_download_folder(registry, version, root)
    folder.mkdir(parents=True, exist_ok=True)
    cached = folder / Path(str(model["file"])).name
    if cached.is_file() and sha256_file(cached) == model["sha256"]:
        return cached
    return registry.download_model(version, folder)


def load_model_file(path: str | Path) -> Any:
    """A Keras model for inference (no optimizer, no compile)."""
    import keras

    return keras.models.load_model(Path(path), compile=False)
