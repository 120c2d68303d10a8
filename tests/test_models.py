"""Architectures: the seed models' parameter counts, our default's budget, uint8 in, saving."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from malaria.model.architectures import (
    ARCHITECTURES,
    build_model,
    classifier_params,
    default_input_size,
    input_size_of,
)


def test_seed_baseline_matches_the_article() -> None:
    model = build_model("seed-baseline")
    assert input_size_of(model) == 130
    assert classifier_params(model) == 75_937


@pytest.mark.parametrize("dropout_after_sigmoid", [False, True])
def test_seed_augmented_matches_the_article(dropout_after_sigmoid: bool) -> None:
    model = build_model("seed-augmented", dropout_after_sigmoid=dropout_after_sigmoid)
    assert classifier_params(model) == 2_601_153
    names = [layer.name for layer in model.layers]
    assert ("dropout_after_sigmoid" in names) is dropout_after_sigmoid
    # The article's layer order: dropout before the 512-unit dense layer.
    assert names.index("dropout") < names.index("dense")


def test_dropout_after_sigmoid_corrupts_training_outputs_only() -> None:
    model = build_model("seed-baseline", dropout_after_sigmoid=True, seed=3)
    x = np.random.default_rng(0).integers(0, 256, (64, 130, 130, 3), dtype=np.uint8)
    clean = np.asarray(model(x, training=False)).ravel()
    noisy = np.asarray(model(x, training=True)).ravel()
    assert np.all((clean > 0) & (clean < 1))
    # At training time half the outputs are zeroed and the rest doubled.
    assert np.mean(noisy == 0) > 0.2
    assert np.allclose(noisy[noisy > 0], 2 * clean[noisy > 0], rtol=1e-4)


def test_default_model_is_small() -> None:
    model = build_model("cellnet")
    assert classifier_params(model) < 500_000
    assert 64 <= default_input_size("cellnet") <= 128


def test_input_size_is_a_parameter() -> None:
    for size in (64, 96, 128):
        model = build_model("cellnet", size, augment=False)
        assert input_size_of(model) == size
    with pytest.raises(ValueError, match="input sizes"):
        build_model("cellnet", 8)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet-9000")
    assert set(ARCHITECTURES) >= {"cellnet", "seed-augmented", "seed-baseline"}


def test_augmentation_is_inactive_at_inference() -> None:
    model = build_model("cellnet-tiny", 48, seed=1)
    x = np.random.default_rng(1).integers(0, 256, (8, 48, 48, 3), dtype=np.uint8)
    first = np.asarray(model(x, training=False))
    second = np.asarray(model(x, training=False))
    np.testing.assert_array_equal(first, second)
    assert any(layer.name.startswith("aug_") for layer in model.layers)


def test_saved_model_round_trips_and_takes_uint8(tmp_path: Path) -> None:
    model = build_model("cellnet-tiny", 40)
    assert model.inputs[0].dtype == "uint8"
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # built-in layers only: no custom objects
    x = np.random.default_rng(2).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-5)
    assert input_size_of(loaded) == 40
    assert path.stat().st_size < 5 * 2**20


def test_stain_norm_ignores_a_gain_per_channel() -> None:
    model = build_model("cellnet-stainnorm", 48)
    rng = np.random.default_rng(3)
    x = rng.integers(0, 160, (4, 48, 48, 3)).astype(np.float32)
    x[:, :8] = 0  # black background, as in the crops
    tinted = np.clip(x * np.array([1.3, 0.8, 1.1]), 0, 255).astype(np.uint8)
    norm = model.get_layer("stain_norm")  # sits after rescaling to [0, 1]
    np.testing.assert_allclose(np.asarray(norm(tinted / 255.0)), np.asarray(norm(x / 255.0)),
                               atol=0.05)
