"""The one download location and loader for serving models."""

from __future__ import annotations

from pathlib import Path

import pytest

from malaria.io.store import LocalStore
from malaria.model.serving import model_download_folder, registered_model_file
from malaria.registry.registry import ModelRegistry


def _registry_with_model(tmp_path: Path, content: bytes) -> tuple[ModelRegistry, str]:
    registry = ModelRegistry(LocalStore(tmp_path / "bucket"))
    model = tmp_path / "model.keras"
    model.write_bytes(content)
    registry.register("v1", model, {"threshold": 0.4, "metrics": {}}, {})
    return registry, "v1"


def test_a_registered_model_is_downloaded_once_into_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALARIA_CACHE_DIR", str(tmp_path / "cache"))
    registry, version = _registry_with_model(tmp_path, b"weights v1")
    path = registered_model_file(registry, version)
    assert path.read_bytes() == b"weights v1"
    assert path.parent == model_download_folder(registry, version)
    assert (tmp_path / "cache" / "models") in path.parents
    first = path.stat().st_mtime_ns
    assert registered_model_file(registry, version) == path
    assert path.stat().st_mtime_ns == first  # reused, not fetched again


def test_a_damaged_cached_model_is_fetched_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALARIA_CACHE_DIR", str(tmp_path / "cache"))
    registry, version = _registry_with_model(tmp_path, b"weights v1")
    path = registered_model_file(registry, version)
    path.write_bytes(b"half a file")
    assert registered_model_file(registry, version).read_bytes() == b"weights v1"


def test_two_registries_with_the_same_version_do_not_share_a_folder(tmp_path: Path) -> None:
    a = ModelRegistry(LocalStore(tmp_path / "a"))
    b = ModelRegistry(LocalStore(tmp_path / "b"))
    assert model_download_folder(a, "v1", tmp_path) != model_download_folder(b, "v1", tmp_path)
