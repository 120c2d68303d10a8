"""Per-slide test-time adaptation: score each slide after matching it to the training slides.

Cells of one slide share a stain and the optics, and cross-validation showed the worst
slides' predicted parasitemia moving with the slide's colour. Two ways to take a slide's
own colour out at scoring time, using only that slide's (unlabelled) cells:

``colour``
    Each RGB channel's mean and standard deviation over the slide's foreground pixels (the
    cells, not the black padding) are mapped to those of the training cells
    (:func:`colour_stats` on the training set, kept with the model), a Reinhard-style
    transfer per channel. Padding stays black.
``bn``
    AdaBN (Li et al., 2016): every batch-normalisation layer's moving mean and variance are
    re-estimated on the slide's cells, the model predicts, and the trained statistics are
    put back. The statistics are estimated layer by layer in inference mode (each layer's
    input is computed with the earlier layers already adapted), so augmentation and dropout
    stay off and the estimate does not depend on a batch size. ``prior`` mixes in the trained
    statistics as that many pseudo-cells (Schneider et al., 2020): a small slide, or one
    whose cells are nearly all of one class, then moves the statistics less.
``colour+bn``
    Both, in that order.

The slide's cells are all the model sees of it: no labels are used. Colour statistics are
plain numpy; the batch-normalisation part needs Keras, imported when first used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import keras

SLIDE_ADAPTATIONS = ("none", "colour", "bn", "colour+bn")
# A pixel whose brightest channel is at most this is padding (the same level as
# malaria.model.stain.BACKGROUND_LEVEL, in uint8 units).
BACKGROUND_UINT8 = 10
# Fixed batch shape for the per-slide passes: slides have any number of cells, and a JAX
# model compiles once per batch shape, so each slide is padded up to whole chunks.
CHUNK = 128
_MIN_STD = 1.0  # uint8 units: a flat channel is left flat, not blown up


@dataclass(frozen=True)
class ColourStats:
    """Mean and standard deviation per RGB channel (uint8 units) over foreground pixels."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixels: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "pixels": self.pixels,
                "background_uint8": BACKGROUND_UINT8}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ColourStats:
        mean, std = (tuple(float(v) for v in data[k]) for k in ("mean", "std"))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("colour statistics need three channels")
        return cls(mean, std, int(data.get("pixels", 0)))  # type: ignore[arg-type]


def _as_images(images: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"need uint8 RGB images (N, H, W, 3), got {a.dtype} {a.shape}")
    return a


def foreground(images: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """(N, H, W): True where a pixel is cell rather than black padding."""
    return _as_images(images).max(axis=-1) > BACKGROUND_UINT8


def colour_stats(images: npt.ArrayLike, *, chunk: int = 1024) -> ColourStats:
    """Per-channel foreground mean and standard deviation of ``images`` (uint8 RGB)."""
    a = _as_images(images)
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    for start in range(0, len(a), chunk):  # chunks: a training set is ~10^8 pixels
        pixels = a[start:start + chunk][foreground(a[start:start + chunk])].astype(np.float64)
        total += pixels.sum(axis=0)
        squares += (pixels ** 2).sum(axis=0)
        count += len(pixels)
    if count == 0:
        raise ValueError("no foreground pixels: every pixel is black padding")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    return ColourStats(tuple(mean.tolist()), tuple(std.tolist()), count)  # type: ignore[arg-type]


def standardise_colour(images: npt.ArrayLike, reference: ColourStats) -> npt.NDArray[np.uint8]:
    """``images`` (one slide's cells) with their foreground colour statistics mapped to
    ``reference``'s, per channel; padding pixels unchanged. A slide without foreground is
    returned as it is."""
    a = _as_images(images)
    mask = foreground(a)
    if not mask.any():
        return a.copy()
    own = colour_stats(a)
    gain = np.asarray(reference.std) / np.maximum(np.asarray(own.std), _MIN_STD)
    pixels = a[mask].astype(np.float64)
    moved = (pixels - np.asarray(own.mean)) * gain + np.asarray(reference.mean)
    out = a.copy()
    out[mask] = np.clip(np.rint(moved), 0, 255).astype(np.uint8)
    return out


def standardise_by_slide(images: npt.ArrayLike, slides: Sequence[str],
                         reference: ColourStats) -> npt.NDArray[np.uint8]:
    """:func:`standardise_colour` applied to each slide's cells separately."""
    a = _as_images(images)
    names = np.asarray([str(s) for s in slides])
    if names.size != len(a):
        raise ValueError("one slide name per image is needed")
    out = np.empty_like(a)
    for slide in np.unique(names):
        rows = np.flatnonzero(names == slide)
        out[rows] = standardise_colour(a[rows], reference)
    return out


# -------------------------------------------------------------------------------- AdaBN


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    import keras

    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization)]


def _probes(model: keras.Model) -> list[tuple[keras.layers.BatchNormalization, keras.Model]]:
    """Per BN layer, a model from the input to that layer's input (sharing the weights),
    built once and kept on the model."""
    import keras

    probes = getattr(model, "_malaria_bn_probes", None)
    if probes is None:
        probes = [(bn, keras.Model(model.inputs, bn.input, name=f"probe_{bn.name}"))
                  for bn in batchnorm_layers(model)]
        model._malaria_bn_probes = probes
    return probes


def _padded(images: npt.NDArray[np.uint8], chunk: int) -> npt.NDArray[np.uint8]:
    missing = -len(images) % chunk
    if not missing:
        return images
    return np.concatenate([images, np.zeros((missing, *images.shape[1:]), np.uint8)])


def batchnorm_statistics(model: keras.Model) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every BN layer's (moving mean, moving variance), in layer order."""
    import keras

    return [(keras.ops.convert_to_numpy(bn.moving_mean).copy(),
             keras.ops.convert_to_numpy(bn.moving_variance).copy())
            for bn in batchnorm_layers(model)]


def set_batchnorm_statistics(model: keras.Model,
                             statistics: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    layers = batchnorm_layers(model)
    if len(layers) != len(statistics):
        raise ValueError(f"{len(statistics)} statistics for {len(layers)} BN layers")
    for bn, (mean, var) in zip(layers, statistics, strict=True):
        bn.moving_mean.assign(np.asarray(mean, dtype=bn.moving_mean.dtype))
        bn.moving_variance.assign(np.asarray(var, dtype=bn.moving_variance.dtype))


def adapt_batchnorm(model: keras.Model, images: npt.ArrayLike, *, prior: float = 0.0,
                    chunk: int = CHUNK) -> None:
    """Set every BN layer's moving statistics to those of its input over ``images`` (one
    slide's uint8 cells), mixed with the current ones as ``prior`` pseudo-cells; layer by
    layer, so each layer sees its input as the adapted model computes it."""
    import keras

    a = _as_images(images)
    if not len(a):
        raise ValueError("no cells to adapt to")
    probes = _probes(model)
    if not probes:
        raise ValueError(f"{model.name} has no BatchNormalization layers to adapt")
    padded = _padded(a, chunk)
    weight = len(a) / (len(a) + max(float(prior), 0.0))
    for bn, probe in probes:
        total: np.ndarray | None = None
        squares: np.ndarray | None = None
        count = 0
        for start in range(0, len(padded), chunk):
            valid = min(chunk, len(a) - start)
            out = np.asarray(probe.predict_on_batch(padded[start:start + chunk]))[:valid]
            # Features along the BN axis, everything else (cells, rows, columns) reduced.
            features = np.moveaxis(out.astype(np.float64), bn.axis, -1)
            features = features.reshape(-1, features.shape[-1])
            s, q = features.sum(axis=0), (features ** 2).sum(axis=0)
            total, squares = (s, q) if total is None else (total + s, squares + q)
            count += len(features)
        mean = total / count
        var = np.maximum(squares / count - mean ** 2, 0.0)
        old_mean = keras.ops.convert_to_numpy(bn.moving_mean).astype(np.float64)
        old_var = keras.ops.convert_to_numpy(bn.moving_variance).astype(np.float64)
        bn.moving_mean.assign((weight * mean + (1 - weight) * old_mean)
                              .astype(bn.moving_mean.dtype))
        bn.moving_variance.assign((weight * var + (1 - weight) * old_var)
                                  .astype(bn.moving_variance.dtype))


@contextmanager
def adapted_batchnorm(model: keras.Model, images: npt.ArrayLike, *, prior: float = 0.0,
                      chunk: int = CHUNK) -> Iterator[keras.Model]:
    """``model`` with its BN statistics adapted to ``images`` inside the block; the trained
    statistics are restored on leaving it, whatever happens."""
    saved = batchnorm_statistics(model)
    try:
        adapt_batchnorm(model, images, prior=prior, chunk=chunk)
        yield model
    finally:
        set_batchnorm_statistics(model, saved)


# ---------------------------------------------------------------------------- scoring


def predict_by_slide(model: keras.Model, images: npt.ArrayLike, slides: Sequence[str], *,
                     adapt: str = "none", reference: ColourStats | None = None,
                     tta: bool | int = False, prior: float = 0.0,
                     chunk: int = CHUNK) -> npt.NDArray[np.float32]:
    """P(parasitized) per image, each slide scored after ``adapt`` (one of
    :data:`SLIDE_ADAPTATIONS`) to its own cells; ``reference`` (the training cells'
    :func:`colour_stats`) is needed for the colour adaptations, ``prior`` is AdaBN's
    pseudo-cell count. ``adapt="none"`` is exactly
    :func:`malaria.model.predict.predict_probabilities`."""
    from malaria.model.predict import predict_probabilities

    if adapt not in SLIDE_ADAPTATIONS:
        raise ValueError(f"adapt must be one of {SLIDE_ADAPTATIONS}, got {adapt!r}")
    a = _as_images(images)
    names = np.asarray([str(s) for s in slides])
    if names.size != len(a):
        raise ValueError("one slide name per image is needed")
    if adapt in ("colour", "colour+bn"):
        if reference is None:
            raise ValueError(f"adapt={adapt!r} needs the training cells' colour statistics")
        a = standardise_by_slide(a, names, reference)
    if adapt in ("none", "colour"):
        return predict_probabilities(model, a, tta=tta)
    if not batchnorm_layers(model):
        raise ValueError(f"adapt={adapt!r}: {model.name} has no BatchNormalization layers")
    out = np.empty(len(a), dtype=np.float32)
    for slide in np.unique(names):
        rows = np.flatnonzero(names == slide)
        cells = a[rows]
        with adapted_batchnorm(model, cells, prior=prior, chunk=chunk):
            # Padded to whole chunks, so every call has the same batch shape.
            probs = predict_probabilities(model, _padded(cells, chunk), batch_size=chunk,
                                          tta=tta)
        out[rows] = probs[:len(rows)]
    return out
