"""CNN architectures for single-cell malaria screening, chosen by name.

Every model built here takes raw ``uint8`` RGB images of its input size: scaling to [0, 1]
and augmentation are layers inside the model, so a saved ``.keras`` file is the whole
recipe and a caller never has to know how pixels were normalised. Keras augmentation
layers are only active when the model is called with ``training=True`` (inside ``fit``),
so inference is deterministic.

Architectures:

``seed-baseline``, ``seed-augmented``
    The source article's two R Keras models at 130x130x3, layer for layer (75,937 and
    2,601,153 parameters). Kept to measure how far we have come, not to be used.
``cellnet``
    Ours, designed for accuracy per CPU second: conv-BN-ReLU stages, max pooling, global
    average pooling and a single sigmoid unit; 0.42M parameters (a 1.8 MB file); input size
    a parameter (64..128). ``cellnet-stainnorm`` adds a per-image colour standardisation;
    ``cellnet-hed`` adds stain jitter in haematoxylin-eosin-DAB optical density
    (:class:`malaria.model.stain.RandomHEDJitter`) to the RGB colour jitter, and
    ``cellnet-hed-only`` uses it instead of the RGB colour jitter, ``cellnet-hed-strong``
    makes it four times as large (issue 15's experiments). ``cellnet-hed`` is the default.
    See :func:`build_cellnet` for the reasoning.

Only built-in Keras layers are used, so ``keras.models.load_model`` opens a saved model
without importing this module, except in the ``-hed`` architectures: their jitter layer is
registered by :mod:`malaria.model.stain` (imported here), which a loading process must
import first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import keras
from keras import layers

from malaria.model.stain import RandomHEDJitter


@dataclass(frozen=True)
class Architecture:
    name: str
    default_input_size: int
    build: Callable[..., keras.Model]
    description: str
    min_input_size: int = 32
    max_input_size: int = 256


# ------------------------------------------------------------------------- shared pieces


def _inputs(input_size: int) -> keras.KerasTensor:
    # uint8 in, so the saved model takes what a decoder produces, with no float contract
    # (0-1? 0-255? mean-subtracted?) for callers to get wrong.
    return keras.Input(shape=(input_size, input_size, 3), dtype="uint8", name="image")


def _rescale(x: keras.KerasTensor) -> keras.KerasTensor:
    # float32 whatever the global (mixed) policy: colour jitter on bfloat16 pixels would
    # quantise the stain colours, and these layers have no weights to speed up anyway.
    return layers.Rescaling(1.0 / 255.0, dtype="float32", name="rescale")(x)


def microscopy_augmentation(seed: int = 0, *, colour: float = 1.0,
                            hed: float = 0.0) -> list[layers.Layer]:
    """Augmentation for single-cell crops on a black background (values in [0, 1]).

    - A cell has no up, down, left or right: flips plus a full-circle rotation cover the
      90-degree rotations *and* the small ones with one resampling; the corners that turn
      into view are filled with black, which is exactly the background of the crops.
    - Small zoom and translation: the segmentation step does not centre or scale cells
      exactly.
    - Brightness, contrast, hue and saturation jitter: cells of one slide share a stain and
      the optics, so the main way a model fails on a new slide is a new stain colour. The
      jitter is kept mild, because the purple of the parasite's chromatin against the pink
      cell body is the signal itself. ``colour`` scales the jitter (0: none).
    - ``hed`` (0: none): per-image jitter of the stain densities (scale 1 +- hed, shift
      +- hed), first, on the crop as decoded: its black padding is still exactly black
      there, and the layer leaves padding alone.
    """
    f32 = "float32"
    augment: list[layers.Layer] = []
    if hed:
        augment.append(RandomHEDJitter(float(hed), float(hed), seed=seed + 8, dtype=f32,
                                       name="aug_hed"))
    augment += [
        layers.RandomFlip("horizontal_and_vertical", seed=seed, dtype=f32, name="aug_flip"),
        layers.RandomRotation(0.5, fill_mode="constant", fill_value=0.0, seed=seed + 1,
                              dtype=f32, name="aug_rotate"),
        layers.RandomZoom((-0.1, 0.1), fill_mode="constant", fill_value=0.0, seed=seed + 2,
                          dtype=f32, name="aug_zoom"),
        layers.RandomTranslation(0.06, 0.06, fill_mode="constant", fill_value=0.0,
                                 seed=seed + 3, dtype=f32, name="aug_translate"),
    ]
    if colour:
        c = float(colour)
        augment += [
            layers.RandomBrightness(0.1 * c, value_range=(0.0, 1.0), seed=seed + 4, dtype=f32,
                                    name="aug_brightness"),
            layers.RandomContrast(0.15 * c, value_range=(0.0, 1.0), seed=seed + 5, dtype=f32,
                                  name="aug_contrast"),
            layers.RandomSaturation((0.5 - 0.15 * c, 0.5 + 0.15 * c), value_range=(0.0, 1.0),
                                    seed=seed + 6, dtype=f32, name="aug_saturation"),
            layers.RandomHue(0.04 * c, value_range=(0.0, 1.0), seed=seed + 7, dtype=f32,
                             name="aug_hue"),
        ]
    return augment


def _article_augmentation(seed: int) -> list[layers.Layer]:
    """The article's ``image_data_generator``: rotation 40 degrees, shifts and zoom 0.2,
    horizontal flips (its shear has no Keras layer; it is left out)."""
    f32 = "float32"
    return [
        layers.RandomRotation(40 / 360, fill_mode="nearest", seed=seed, dtype=f32,
                              name="aug_rotate"),
        layers.RandomTranslation(0.2, 0.2, fill_mode="nearest", seed=seed + 1, dtype=f32,
                                 name="aug_translate"),
        layers.RandomZoom(0.2, fill_mode="nearest", seed=seed + 2, dtype=f32, name="aug_zoom"),
        layers.RandomFlip("horizontal", seed=seed + 3, dtype=f32, name="aug_flip"),
    ]


def _apply(x: keras.KerasTensor, stack: list[layers.Layer]) -> keras.KerasTensor:
    for layer in stack:
        x = layer(x)
    return x


def _sigmoid_head(x: keras.KerasTensor, *, dropout_after_sigmoid: bool,
                  seed: int) -> keras.KerasTensor:
    # float32 output under mixed precision: a bfloat16 probability has 8 bits of mantissa,
    # too coarse for thresholds and AUC near 1.
    x = layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    if dropout_after_sigmoid:
        x = layers.Dropout(0.5, seed=seed, dtype="float32", name="dropout_after_sigmoid")(x)
    return x


# --------------------------------------------------------------------------- seed models

_DROPOUT_AFTER_SIGMOID_DOC = """
    ``dropout_after_sigmoid=True`` reproduces the article's ``layer_dropout(0.5)`` placed after
    the final sigmoid. It is off by default because it hurts: during training that layer
    zeroes a random half of the predicted probabilities and doubles the other half. The loss
    then sees "probabilities" of 0 (whatever the cell) and up to 2 (clipped to 1 - epsilon by
    the cross-entropy), so half the gradient signal is noise and the rest pushes the real
    output towards half of what it should be; at inference the layer does nothing, so the
    model's outputs are miscalibrated and its ranking is learned from corrupted targets.
"""


def build_seed_baseline(input_size: int = 130, *, augment: bool = True,
                        dropout_after_sigmoid: bool = False, seed: int = 0) -> keras.Model:
    """The article's baseline: conv32-pool-conv64-pool-conv64-pool-conv32-pool-flatten-dense1,
    3x3 valid convolutions with ReLU, 2x2 max pooling; 75,937 parameters at 130x130x3.

    The article trained it without augmentation, so ``augment`` is ignored.
    """
    del augment  # the article's baseline had no augmentation
    inputs = _inputs(input_size)
    x = _rescale(inputs)
    for i, filters in enumerate((32, 64, 64, 32)):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = _sigmoid_head(x, dropout_after_sigmoid=dropout_after_sigmoid, seed=seed)
    return keras.Model(inputs, outputs, name="seed_baseline")


def build_seed_augmented(input_size: int = 130, *, augment: bool = True,
                         dropout_after_sigmoid: bool = False, seed: int = 0) -> keras.Model:
    """The article's augmented model: conv32-pool-conv64-pool-conv128-pool-conv128-pool-
    flatten-dropout(0.5)-dense512(relu)-dense1(sigmoid); 2,601,153 parameters at 130x130x3.
    """
    inputs = _inputs(input_size)
    x = _rescale(inputs)
    if augment:
        x = _apply(x, _article_augmentation(seed))
    for i, filters in enumerate((32, 64, 128, 128)):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.5, seed=seed, name="dropout")(x)
    x = layers.Dense(512, activation="relu", name="dense")(x)
    outputs = _sigmoid_head(x, dropout_after_sigmoid=dropout_after_sigmoid, seed=seed)
    return keras.Model(inputs, outputs, name="seed_augmented")


build_seed_baseline.__doc__ = (build_seed_baseline.__doc__ or "") + _DROPOUT_AFTER_SIGMOID_DOC
build_seed_augmented.__doc__ = (build_seed_augmented.__doc__ or "") + _DROPOUT_AFTER_SIGMOID_DOC


# ------------------------------------------------------------------------------- cellnet

CELLNET_WIDTHS: tuple[int, ...] = (32, 48, 96, 128)
CELLNET_DEPTHS: tuple[int, ...] = (1, 2, 2, 2)
HED_JITTER = 0.05  # scale 1 +- 0.05 and shift +- 0.05 per stain density
HED_JITTER_STRONG = 0.2  # Tellez et al.'s "HED-strong" (issue 15's experiment)


def build_cellnet(input_size: int = 80, *, augment: bool = True,
                  dropout_after_sigmoid: bool = False, seed: int = 0,
                  widths: tuple[int, ...] = CELLNET_WIDTHS,
                  depths: tuple[int, ...] = CELLNET_DEPTHS,
                  head_dropout: float = 0.2, stem_stride: int = 2,
                  stain_norm: bool = False, colour: float = 1.0,
                  hed: float = 0.0) -> keras.Model:
    """Our default: four conv-BN-ReLU stages with 2x2 max pooling between them, then global
    average pooling and one sigmoid unit.

    Why this shape, for accuracy per CPU second:
    - The first conv has stride 2 (``stem_stride``). On a CPU the full-resolution stage costs
      less in multiply-adds than in memory traffic: BN, ReLU and pooling each sweep the whole
      full-size activation map. A strided stem trained 4x faster at 64 px (251 -> 1,033 img/s,
      bf16, 2 cores) for the same parameter count, and lets the model read 80 px cells, where
      small chromatin dots are still a few pixels wide, at twice the old 64 px speed.
    - Width grows as resolution falls (conv cost is pixels x in-channels x out-channels).
    - Batch normalisation lets a high learning rate and a short schedule converge, and makes
      the network less sensitive to the stain brightness of a slide.
    - Global average pooling instead of flatten + dense: the parasite can be anywhere in the
      cell, and it removes the 2.4M-weight dense layer that dominates the seed model (and
      lets one architecture take any input size).
    - No bias in convs followed by BN (BN's shift does the job).
    - ``stain_norm``: each image's channels standardised over the image (mean and standard
      deviation per channel, background included). A slide's stain and illumination act
      roughly as a gain per channel; mean and deviation scale with it, so the standardised
      image does not change, while colour *within* the cell (purple chromatin on a pink
      cell) is kept. A built-in ``LayerNormalization`` over the spatial axes, so a saved
      model still loads without this module.
    - ``colour`` scales the RGB colour jitter and ``hed`` sets the stain-density jitter of
      :func:`microscopy_augmentation`.
    """
    if len(widths) != len(depths):
        raise ValueError("widths and depths must have the same length")
    inputs = _inputs(input_size)
    x = _rescale(inputs)
    if augment:
        x = _apply(x, microscopy_augmentation(seed, colour=colour, hed=hed))
    if stain_norm:
        x = layers.LayerNormalization(axis=(1, 2), center=False, scale=False, epsilon=1e-3,
                                      dtype="float32", name="stain_norm")(x)
    for stage, (filters, depth) in enumerate(zip(widths, depths, strict=True)):
        if stage:
            x = layers.MaxPooling2D(2, name=f"pool{stage}")(x)
        for j in range(depth):
            name = f"s{stage + 1}_conv{j + 1}"
            stride = stem_stride if stage == 0 and j == 0 else 1
            x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                              name=name)(x)
            # momentum 0.9 (Keras' default is 0.99): the moving statistics used at inference
            # settle within ~50 steps, which matters for short, time-boxed runs.
            x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
            x = layers.ReLU(name=f"{name}_relu")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if head_dropout:
        x = layers.Dropout(head_dropout, seed=seed, name="head_dropout")(x)
    outputs = _sigmoid_head(x, dropout_after_sigmoid=dropout_after_sigmoid, seed=seed)
    return keras.Model(inputs, outputs, name="cellnet")


# ------------------------------------------------------------------------------ registry

ARCHITECTURES: dict[str, Architecture] = {
    "cellnet": Architecture(
        "cellnet", 80, build_cellnet,
        "ours: 4 conv-BN stages, global average pooling, ~0.42M params", 32, 160,
    ),
    # Tied with cellnet on validation slides at 15 minutes, so the simpler model stays the
    # default (benchmarks/README.md).
    "cellnet-stainnorm": Architecture(
        "cellnet-stainnorm", 80, partial(build_cellnet, stain_norm=True),
        "cellnet with a per-image colour standardisation layer", 32, 160,
    ),
    # Issue 15: stain jitter in optical density, at Tellez et al.'s "HED-light" size.
    "cellnet-hed": Architecture(
        "cellnet-hed", 80, partial(build_cellnet, hed=HED_JITTER),
        "cellnet with stain-density (HED) jitter added to the RGB colour jitter", 32, 160,
    ),
    "cellnet-hed-strong": Architecture(
        "cellnet-hed-strong", 80, partial(build_cellnet, hed=HED_JITTER_STRONG),
        "cellnet-hed with the stain-density jitter four times as large (HED-strong)", 32, 160,
    ),
    "cellnet-hed-only": Architecture(
        "cellnet-hed-only", 80, partial(build_cellnet, hed=HED_JITTER, colour=0.0),
        "cellnet with stain-density (HED) jitter instead of the RGB colour jitter", 32, 160,
    ),
    "cellnet-tiny": Architecture(
        "cellnet-tiny", 48, partial(build_cellnet, widths=(16, 32, 64), depths=(1, 1, 1),
                                      stem_stride=1),
        "a small cellnet (~25k params) for tests, demos and quick checks", 32, 160,
    ),
    "seed-augmented": Architecture(
        "seed-augmented", 130, build_seed_augmented,
        "source article's augmented model (2,601,153 params at 130x130)", 64, 256,
    ),
    "seed-baseline": Architecture(
        "seed-baseline", 130, build_seed_baseline,
        "source article's baseline (75,937 params at 130x130)", 64, 256,
    ),
}


def _architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {name!r}; known: {known}") from None


def default_input_size(name: str) -> int:
    return _architecture(name).default_input_size


def build_model(name: str, input_size: int | None = None, *, augment: bool = True,
                dropout_after_sigmoid: bool = False, seed: int = 0) -> keras.Model:
    """Build architecture ``name`` for square ``input_size`` uint8 RGB input (its default
    when None). ``augment=False`` leaves the augmentation layers out altogether."""
    arch = _architecture(name)
    size = arch.default_input_size if input_size is None else int(input_size)
    if not arch.min_input_size <= size <= arch.max_input_size:
        raise ValueError(f"{name} takes input sizes {arch.min_input_size}.."
                         f"{arch.max_input_size}, got {size}")
    return arch.build(size, augment=augment, dropout_after_sigmoid=dropout_after_sigmoid,
                      seed=seed)


def classifier_params(model: keras.Model) -> int:
    """Trainable plus non-trainable weights (BN statistics included); rescaling and
    augmentation layers have none, so this is the classifier's count."""
    return int(model.count_params())


def input_size_of(model: keras.Model) -> int:
    """The square input side a built or loaded model expects."""
    shape = model.inputs[0].shape
    return int(shape[1])
