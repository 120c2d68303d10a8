"""Batch norm folded into the convolution before it (malaria.model.fold): the same
predictions as the model, the model's current weights, and layers that cannot fold left
as they are."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from malaria.model.architectures import build_model
from malaria.model.fold import FoldedModel
from malaria.model.predict import predict_probabilities


def _with_trained_statistics(model: keras.Model, seed: int = 1) -> keras.Model:
    """Batch-norm statistics and affine terms away from their initial 0/1 values, as after
    training (a fold that ignored one of them would show)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, n))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            layer.beta.assign(rng.normal(0, 0.3, n))
    return model


def _images(n: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_every_conv_batch_norm_pair_of_cellnet_folds_to_the_same_predictions() -> None:
    model = _with_trained_statistics(build_model("cellnet-tiny", 32))
    norms = [layer for layer in model.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    folded = FoldedModel(model)
    folded.refresh()
    assert folded.folded_layers == len(norms) > 0
    images = _images(64, 32)
    expected = np.asarray(model(images, training=False)).ravel()
    np.testing.assert_allclose(np.asarray(folded(images)).ravel(), expected, atol=1e-5)
    np.testing.assert_allclose(predict_probabilities(model, images), expected, atol=1e-5)


def test_predictions_follow_the_models_weights_after_the_first_call() -> None:
    """The traced predict function is kept on the model: weights changed later (training
    on, re-estimated statistics) must reach the folded copy."""
    model = _with_trained_statistics(build_model("cellnet-tiny", 32))
    images = _images(32, 32)
    before = predict_probabilities(model, images)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(layer.moving_mean.value + 0.5)
    expected = np.asarray(model(images, training=False)).ravel()
    assert np.abs(expected - before).max() > 1e-3  # the change shows in the output
    np.testing.assert_allclose(predict_probabilities(model, images), expected, atol=1e-5)


def _unfoldable_model() -> keras.Model:
    """A conv whose output a residual also reads, and a conv with its own activation:
    neither batch norm after them is a per-channel map of one linear conv's output."""
    inputs = keras.Input((16, 16, 3))
    shared = keras.layers.Conv2D(3, 3, padding="same", name="shared")(inputs)
    normed = keras.layers.BatchNormalization(name="after_shared")(shared)
    x = keras.layers.Add()([normed, shared])
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="relu_conv")(x)
    x = keras.layers.BatchNormalization(name="after_relu")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", name="plain")(x)
    x = keras.layers.BatchNormalization(name="foldable")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    return keras.Model(inputs, outputs)


def test_batch_norms_that_cannot_fold_are_kept() -> None:
    model = _with_trained_statistics(_unfoldable_model())
    folded = FoldedModel(model)
    folded.refresh()
    assert [pair.norm.name for pair in folded.pairs] == ["foldable"]
    assert isinstance(folded.model.get_layer("after_shared"), keras.layers.BatchNormalization)
    assert isinstance(folded.model.get_layer("after_relu"), keras.layers.BatchNormalization)
    images = np.random.default_rng(2).normal(size=(8, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(folded(images)),
                               np.asarray(model(images, training=False)), atol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_bfloat16"])
def test_a_bf16_model_folds_within_bf16_rounding(policy: str) -> None:
    from malaria.model.precision import dtype_policy

    with dtype_policy(policy):
        model = _with_trained_statistics(build_model("cellnet-tiny", 32))
    images = _images(64, 32)
    expected = np.asarray(model(images, training=False), np.float64).ravel()
    got = predict_probabilities(model, images).astype(np.float64)
    assert np.abs(got - expected).max() < 0.02


def test_the_fold_benchmark_reports_agreement_for_model_files(tmp_path: Path) -> None:
    from benchmarks.fold_inference import agreement
    from malaria.model.checkpoints import save_for_serving

    model = _with_trained_statistics(build_model("cellnet-tiny", 32))
    save_for_serving(model, tmp_path / "model.keras")
    np.savez(tmp_path / "cells-32.npz", images=_images(40, 32))
    np.savez(tmp_path / "cells-48.npz", images=_images(4, 48))
    [row] = agreement(str(tmp_path / "*.keras"), tmp_path / "cells-32.npz")
    assert row["cells"] == 40 and row["calls_changed"] == 0 and row["max_change"] < 1e-5
    assert row["policy"] == "float32"
    assert agreement(str(tmp_path / "*.keras"), tmp_path / "cells-48.npz") == []  # other size


def test_a_model_without_batch_norm_predicts_as_built() -> None:
    model = build_model("seed-baseline", 64, augment=False)
    assert FoldedModel(model).folded_layers == 0
    images = _images(8, 64)
    np.testing.assert_allclose(predict_probabilities(model, images),
                               np.asarray(model(images, training=False)).ravel(), atol=1e-6)
