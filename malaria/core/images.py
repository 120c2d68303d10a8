"""Image validation: decode every image fully, bound its size, normalise it to 8-bit RGB.

Policy (each refusal has a reason code used as the quarantine folder):

| input                                   | outcome                                   |
|-----------------------------------------|-------------------------------------------|
| 0 bytes                                 | ``empty_file``                            |
| more than ``max_bytes`` (from listing)  | ``file_too_large`` (never downloaded)     |
| not an image Pillow recognises          | ``not_an_image``                          |
| an image format other than PNG/JPEG/TIFF/BMP/WebP | ``unsupported_format``          |
| side > ``max_side`` or pixels > ``max_pixels`` | ``image_too_large`` (read from the header, refused before decoding: decompression bombs) |
| side < ``min_side``                     | ``image_too_small``                       |
| more than one frame                     | ``multi_frame``                           |
| fails to decode completely              | ``corrupt_image`` (truncated, bad CRC...) |
| grayscale (1, L, LA, I, I;16, F)        | ``grayscale``: the Giemsa stain colour is the diagnostic signal, and a model trained on colour would score a grey cell without meaning |
| any other pixel mode                    | ``unsupported_mode``                      |
| a blank image (every pixel near black)  | ``blank_image``                           |
| 8-bit RGB                               | accepted, original bytes kept             |
| palette (P, PA), RGBA/RGBa/LA-less alpha, CMYK, YCbCr, RGBX, 16 bits per channel RGB | accepted, converted to 8-bit RGB PNG (alpha composited onto black, the background of segmented crops); ``converted_from`` says from what |
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "TIFF", "BMP", "WEBP"})
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
CONVERTIBLE_MODES = frozenset({"P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "TIFF": "tif", "BMP": "bmp", "WEBP": "webp"}
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "TIFF": "image/tiff",
                 "BMP": "image/bmp", "WEBP": "image/webp"}

# Never decode what a truncated file lacks; a partial cell is not a cell.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageLimits:
    min_side: int = 16
    max_side: int = 4096
    max_pixels: int = 16_000_000
    max_bytes: int = 50 * 1024 * 1024


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class ValidatedImage:
    """Outcome of validation: ``reason`` is None when the image is accepted."""

    reason: str | None
    detail: str = ""
    format: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    converted_from: str | None = None
    # Re-encoded 8-bit RGB PNG when the input had to be converted; None keeps the original.
    converted_png: bytes | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None


def _reject(reason: str, detail: str, **fields: object) -> ValidatedImage:
    return ValidatedImage(reason=reason, detail=detail, **fields)  # type: ignore[arg-type]


def _sixteen_bit(image: Image.Image) -> bool:
    """True when the file stores 16 bits per channel that Pillow reduces to 8 on load."""
    for tile in getattr(image, "tile", None) or []:
        args = tile.args if hasattr(tile, "args") else tile[3]
        raw_mode = args if isinstance(args, str) else (args[0] if args else "")
        if isinstance(raw_mode, str) and ";16" in raw_mode:
            return True
    return False


def check_size(size: int, limits: ImageLimits = DEFAULT_LIMITS) -> ValidatedImage | None:
    """The checks that need only the object's size (done before downloading it)."""
    if size == 0:
        return _reject("empty_file", "the object has 0 bytes")
    if size > limits.max_bytes:
        return _reject("file_too_large", f"{size} bytes > limit {limits.max_bytes}")
    return None


def validate_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> ValidatedImage:
    """Decode ``data`` completely and decide whether it is a usable cell image."""
    early = check_size(len(data), limits)
    if early is not None:
        return early
    with warnings.catch_warnings():
        # Pillow's own decompression-bomb guard warns before it errors; treat both as refusal.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            return _reject("image_too_large", str(error))
        except UnidentifiedImageError:
            return _reject("not_an_image", "not a format Pillow recognises")
        except (OSError, ValueError, SyntaxError) as error:
            return _reject("corrupt_image", f"header: {error}")
        with image:
            return validate_open_image(image, limits)


def validate_open_image(image: Image.Image, limits: ImageLimits, *,
                        check_blank: bool = True) -> ValidatedImage:
    """Validate an image already opened (header read, nothing decoded yet); callers that
    go on to use the pixels (scoring) decode once for both. ``check_blank=False`` leaves
    the blank-image test to a caller that checks a smaller copy first (see
    :func:`is_blank`)."""
    fmt = image.format or "unknown"
    width, height = image.size
    fields: dict[str, object] = {"format": fmt, "width": width, "height": height,
                                 "mode": image.mode}
    if fmt not in ALLOWED_FORMATS:
        return _reject("unsupported_format", f"{fmt} is not one of {sorted(ALLOWED_FORMATS)}",
                       **fields)
    # Header-only checks come first so a bomb is refused before a single row is decoded.
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        return _reject("image_too_large",
                       f"{width}x{height} exceeds {limits.max_side} px a side or "
                       f"{limits.max_pixels} pixels", **fields)
    if min(width, height) < limits.min_side:
        return _reject("image_too_small", f"{width}x{height} is under {limits.min_side} px",
                       **fields)
    if getattr(image, "n_frames", 1) > 1:
        return _reject("multi_frame", f"{image.n_frames} frames; one cell per file expected",
                       **fields)
    sixteen_bit = _sixteen_bit(image)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        return _reject("corrupt_image", f"decode failed: {error}", **fields)
    mode = image.mode
    if mode in GRAYSCALE_MODES:
        return _reject("grayscale", f"mode {mode}: colour (stain) is required", **fields)
    if mode != "RGB" and mode not in CONVERTIBLE_MODES:
        return _reject("unsupported_mode", f"pixel mode {mode}", **fields)

    rgb = _to_rgb(image)
    if check_blank and is_blank(rgb):
        return _reject("blank_image", "every pixel is (near) black", **fields)
    converted_from = None if mode == "RGB" else mode
    if sixteen_bit:
        converted_from = f"{mode}16" if mode == "RGB" else f"{mode};16"
    if converted_from is None:
        return ValidatedImage(reason=None, format=fmt, width=width, height=height, mode=mode)
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return ValidatedImage(reason=None, format=fmt, width=width, height=height, mode=mode,
                          converted_from=converted_from, converted_png=buffer.getvalue())


BLANK_MAX_VALUE = 10  # an image whose every channel stays under this is (near) black


def is_blank(image: Image.Image) -> bool:
    """Every pixel (near) black. One pass in numpy: a quarter of Pillow's per-band
    getextrema here."""
    return int(np.asarray(_to_rgb(image)).max()) < BLANK_MAX_VALUE


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA") and ("transparency" in image.info or image.mode == "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", image.size, (0, 0, 0))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode bytes already accepted by :func:`validate_image` into an RGB image."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return _to_rgb(image)
