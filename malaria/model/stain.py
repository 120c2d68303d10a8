"""Stain augmentation in a stain space: random jitter of each image's haematoxylin, eosin
and DAB concentrations (colour deconvolution, Ruifrok & Johnston 2001), as a Keras layer.

Why a stain space rather than RGB brightness/hue jitter: a new slide differs from the
training slides mainly by how much of each dye it took up and by the lamp. Both act on the
optical density (OD = -log transmitted light) of each dye, so scaling and shifting the
per-dye densities draws colours a real slide could have, while RGB hue rotation also draws
ones no stain produces. Giemsa is not H&E, but its two dyes (methylene blue/azure and eosin)
project onto the H and E axes well enough for a perturbation of a few percent.

The crops are cells on **black** padding. In optical density black is "infinitely
dense", so any scaling of it would tint the padding; pixels at or below
:data:`BACKGROUND_LEVEL` in every channel are passed through unchanged.

Backend-agnostic (``keras.ops`` / ``keras.random``), so it trains under TensorFlow and JAX.
It is a custom layer: a saved model that contains it loads where this module has been
imported (``malaria.model.architectures`` imports it), under ``safe_mode=True`` too.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB; columns: the OD each
# contributes to R, G, B).
RGB_FROM_HED = np.array([[0.650, 0.704, 0.286],
                         [0.072, 0.990, 0.105],
                         [0.268, 0.570, 0.776]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
# A pixel whose brightest channel is at most this is padding, not cell (the crops' black
# background is exactly 0; resampling leaves a 1-pixel rim of a few grey levels; the
# darkest cell pixels in the NIH crops are above 10 in their brightest channel).
BACKGROUND_LEVEL = 10.0 / 255.0
# Added before the log so that 0 has a finite density; subtracted after the exp, so that
# a jitter of zero gives back the input exactly.
OD_EPSILON = 1.0 / 255.0


@keras.saving.register_keras_serializable(package="malaria")
class RandomHEDJitter(keras.layers.Layer):
    """Per image, per stain: concentration ``c -> c * a + b``, ``a ~ U(1 - scale, 1 + scale)``
    and ``b ~ U(-shift, shift)`` (in optical density units), on [0, 1] RGB float images.

    Identity when not training. Padding (every channel <= ``background``) is left as it
    was, so black stays black. ``scale`` 0.05 and ``shift`` 0.05 are the "HED-light"
    magnitudes of Tellez et al. (2019), realistic for slides of one lab.
    """

    def __init__(self, scale: float = 0.05, shift: float = 0.05, *,
                 background: float = BACKGROUND_LEVEL, seed: int | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")  # float32 under mixed precision (see _rescale)
        super().__init__(**kwargs)
        if scale < 0 or shift < 0:
            raise ValueError("scale and shift must be >= 0")
        self.scale = float(scale)
        self.shift = float(shift)
        self.background = float(background)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = False

    def _jitter(self, images: Any) -> Any:
        x = ops.cast(images, "float32")
        batch = ops.shape(x)[0]
        low = ops.convert_to_tensor(HED_FROM_RGB, dtype="float32")
        back = ops.convert_to_tensor(RGB_FROM_HED, dtype="float32")
        od = -ops.log(x + OD_EPSILON)
        stains = ops.einsum("bhwc,cs->bhws", od, low)
        factor = keras.random.uniform((batch, 1, 1, 3), 1.0 - self.scale, 1.0 + self.scale,
                                      seed=self.seed_generator)
        offset = keras.random.uniform((batch, 1, 1, 3), -self.shift, self.shift,
                                      seed=self.seed_generator)
        od = ops.einsum("bhws,sc->bhwc", stains * factor + offset, back)
        jittered = ops.clip(ops.exp(-od) - OD_EPSILON, 0.0, 1.0)
        cell = ops.max(x, axis=-1, keepdims=True) > self.background
        return ops.where(cell, jittered, x)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if not training or (self.scale == 0 and self.shift == 0):
            return inputs
        return self._jitter(inputs)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(scale=self.scale, shift=self.shift, background=self.background,
                      seed=self.seed)
        return config
