"""Decoding a cell image into the ``uint8`` array a model sees: training, evaluation and
scoring all go through :func:`model_input`, so a model never sees pixels prepared another
way than those it was trained on."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def to_square(image: Image.Image, size: int) -> np.ndarray:
    """Pad to a square with black, centred, then resize to ``size`` x ``size``.

    Why pad rather than stretch or crop: crops are 80-200 px and not square; stretching
    would change the cell's shape (a round cell becomes an ellipse, differently for each
    cell), and a centre crop can cut off a parasite that sits at the membrane, where ring
    forms and gametocytes often are. Black is the crops' own background, so the padding
    looks like more background. Shrinking uses area averaging (PIL's BOX filter), which
    keeps the thin chromatin dots as a darker pixel instead of aliasing them away;
    enlarging uses bicubic interpolation.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")  # (convert copies even when the mode is already RGB)
    width, height = image.size
    side = max(width, height)
    if width != height:
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    if side != size:
        method = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
        image = image.resize((size, size), method)
    return np.asarray(image, dtype=np.uint8)


def model_input(image: Image.Image, size: int) -> np.ndarray:
    """A decoded image as the model sees it (training, evaluation and scoring alike)."""
    if image.mode in ("RGBA", "LA", "PA", "P"):
        # Transparent pixels become black, the background of segmented crops.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return to_square(background, size)
    return to_square(image, size)


def decode_to_array(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return model_input(image, size)
