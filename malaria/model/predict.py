"""P(parasitized) per image from a trained model, fast for small batches, with optional
test-time augmentation over the symmetries of the square."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from malaria.core.views import MAX_VIEWS, views_of
from malaria.model.precision import backend

_DIHEDRAL: tuple[Callable[[np.ndarray], np.ndarray], ...] = (
    lambda x: x,
    lambda x: x[:, :, ::-1],
    lambda x: x[:, ::-1, :],
    lambda x: np.rot90(x, 1, axes=(1, 2)),
    lambda x: np.rot90(x, 2, axes=(1, 2)),
    lambda x: np.rot90(x, 3, axes=(1, 2)),
    lambda x: np.swapaxes(x, 1, 2),
    lambda x: np.rot90(x, 1, axes=(1, 2))[:, :, ::-1],
)


def _predict_function(model: keras.Model) -> Callable[[np.ndarray], Any]:
    """A ``tf.function`` around the model with its batch norms folded into the convolutions
    (malaria.model.fold: half the inference time of ``cellnet`` on a CPU), traced once for
    any batch size and kept on the model: ``model.predict`` builds a tf.data pipeline and
    callbacks per call, which dominates for the small batches of scoring. Each call first
    takes the model's current weights into the folded copy. Other backends:
    ``predict_on_batch`` (compiled once per batch shape), unfolded."""
    if backend() != "tensorflow":
        return model.predict_on_batch
    import tensorflow as tf

    from malaria.model.fold import FoldedModel

    fn = getattr(model, "_malaria_predict_fn", None)
    if fn is None:
        size = int(model.inputs[0].shape[1])
        spec = tf.TensorSpec([None, size, size, 3], tf.uint8)
        folded = FoldedModel(model)

        def call(images: tf.Tensor) -> tf.Tensor:
            folded.refresh()
            return folded(images)

        # autograph=False: the model call has no Python control flow to convert.
        traced = tf.function(call, input_signature=[spec], autograph=False)
        fn = model._malaria_predict_fn = lambda batch: traced(tf.constant(batch))
    return fn


def predict_views(model: keras.Model, images_uint8: np.ndarray, batch_size: int = 256,
                  *, views: int = MAX_VIEWS) -> np.ndarray:
    """P(parasitized) per view and image, shape (views, N), float64: the first ``views``
    symmetries of the square (identity, flips, rotations by 90 degrees, transposes), each
    on its own."""
    images_uint8 = np.asarray(images_uint8, dtype=np.uint8)
    if images_uint8.ndim == 3:
        images_uint8 = images_uint8[None]
    fn = _predict_function(model)
    out = np.empty((views, len(images_uint8)), dtype=np.float64)
    for start in range(0, len(images_uint8), batch_size):
        batch = images_uint8[start:start + batch_size]
        for row, view in enumerate(_DIHEDRAL[:views]):
            probs = fn(np.ascontiguousarray(view(batch)))
            out[row, start:start + batch_size] = np.asarray(probs, np.float64).reshape(-1)
    return out


def predict_probabilities(model: keras.Model, images_uint8: np.ndarray, batch_size: int = 256,
                          *, tta: bool | int = False) -> np.ndarray:
    """P(parasitized) per image, shape (N,), float32.

    ``tta``: test-time augmentation, averaging the probabilities over the symmetries of the
    square (``True`` = all 8: identity, flips, rotations by 90 degrees, transposes; an int
    takes the first n of them). A cell has no orientation, so each view is as valid as the
    original, and averaging removes some of the model's orientation noise.
    """
    views = views_of(tta)
    per_view = predict_views(model, images_uint8, batch_size, views=views)
    return (per_view.sum(axis=0) / views).astype(np.float32)
