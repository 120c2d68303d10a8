"""The one way a serving model reaches memory: where a registered model is downloaded to,
and how a model file is loaded (scoring, the gate's re-scoring of the champion, and
``malaria predict`` / ``malaria evaluate`` all come through here)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

from malaria.core.settings import cache_dir
from malaria.io.localpath import UnsafePath, confined
from malaria.registry.provenance import sha256_file
from malaria.registry.registry import ModelRegistry, RegistryError


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
    model = registry.get(version).get("model")
    model = model if isinstance(model, dict) else {}
    folder = model_download_folder(registry, version, root)
    folder.mkdir(parents=True, exist_ok=True)
    # The record is bucket data: its file name must not lead out of the cache folder.
    try:
        cached = confined(folder, str(model.get("file")), what="model file name")
    except UnsafePath as error:
        raise RegistryError(f"model file name of {version}: {error}") from error
    if cached.is_file() and sha256_file(cached) == model.get("sha256"):
        return cached
    return registry.download_model(version, folder)


def load_model_file(path: str | Path) -> Any:
    """A Keras model for inference (no optimizer, no compile).

    Only a ``.keras`` archive (what the product saves) is loaded, with ``safe_mode=True``
    whatever the process's global setting: no Lambda layers or other arbitrary code. Legacy
    HDF5 files and SavedModel or checkpoint folders take other loaders, which have had
    safe_mode bypasses, so they are refused.
    """
    import keras
    from keras.src.saving.serialization_lib import SafeModeScope

    import malaria.model.stain  # noqa: F401  (registers the HED jitter layer for loading)

    path = Path(path)
    if path.suffix != ".keras" or not path.is_file() or not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a .keras model archive: only those are loaded")
    # keras.config.enable_unsafe_deserialization() anywhere in the process would override
    # safe_mode=True (Keras 3.15 prefers the ambient setting); the scope pins it for this
    # load. SafeModeScope has no public name, but is what load_model itself uses.
    with SafeModeScope(True):
        return keras.models.load_model(path, compile=False, safe_mode=True)
