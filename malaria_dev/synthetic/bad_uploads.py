"""A catalogue of bad uploads (empty, truncated, wrong format, too small, too large,
grayscale, ...) with the outcome the ingest validator must reach for each."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from malaria.core.labels import CLASS_NAMES
from malaria_dev.synthetic.drawing import render_arrays, to_uint8
from malaria_dev.synthetic.stain import TAG_CELL, seeded_rng, slide_style


@dataclass(frozen=True)
class BadInput:
    """An upload the ingest validator must handle, with the outcome it must reach."""

    key: str  # path relative to the bucket's incoming/ prefix
    data: bytes
    expected_outcome: str  # "quarantined" | "accepted" | "duplicate"
    expected_reason: str | None  # quarantine reason, or converted_from when accepted
    description: str


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)


def _png_by_hand(
    width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes
) -> bytes:
    """A PNG from already filtered scanlines (each row starts with its filter byte)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw_rows, 9))
        + _png_chunk(b"IEND", b"")
    )


def _rgb16_png(rgb: np.ndarray) -> bytes:
    """48-bit RGB PNG: Pillow cannot write 16 bits per channel, so build the file."""
    h, w, _ = rgb.shape
    # Spread 8-bit values over 16 bits (x * 257) and add a little sub-8-bit detail, so the
    # file really carries 16-bit data.
    wide = rgb.astype(np.uint16) * 257 + (np.arange(w, dtype=np.uint16) % 97)[None, :, None]
    rows = wide.astype(">u2").view(np.uint8).reshape(h, w * 6)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    return _png_by_hand(w, h, 16, 2, raw)


def _huge_png_header(side: int = 20000) -> bytes:
    """A small file whose header claims side x side RGB; only a few rows of data follow.

    A validator must refuse it from the header, without decoding (or allocating) it.
    """
    row = b"\x00" + bytes(side * 3)
    return _png_by_hand(side, side, 8, 2, row * 4)


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def bad_inputs(seed: int = 0) -> list[BadInput]:
    """Uploads that exercise every branch of ingest validation, with expected outcomes.

    Keys are relative to the bucket's incoming/ prefix and all unique; slides are 900-999
    so they never mix with generate_cells' slides. Every image is a distinct cell, so
    only the intended pairs share bytes.
    """
    counter = iter(range(1_000_000))

    def cell(slide: int, parasitized: bool) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        style = slide_style(slide, seed)
        colour, mask = render_arrays(
            seeded_rng(seed, slide, TAG_CELL, next(counter)),
            parasitized=parasitized,
            style=style,
            size=None,
        )
        rgb = to_uint8(colour * mask[..., None])
        return Image.fromarray(rgb), colour, mask

    def name(slide: int, n: int, ext: str = ".png", cell_part: str | None = None) -> str:
        part = cell_part if cell_part is not None else f"cell_{n}"
        return f"C{slide}P{slide - 900}ThinF_IMG_20200101_000000_{part}{ext}"

    par, uni = CLASS_NAMES
    items: list[BadInput] = []

    def add(key: str, data: bytes, outcome: str, reason: str | None, desc: str) -> None:
        items.append(BadInput(key, data, outcome, reason, desc))

    add(f"{par}/{name(901, 1)}", b"", "quarantined", "empty_file", "zero-byte upload")

    png = _save(cell(901, True)[0], "PNG")
    add(
        f"{par}/{name(901, 2)}",
        png[: int(len(png) * 0.6)],
        "quarantined",
        "corrupt_image",
        "PNG cut off at 60% of its bytes (interrupted upload)",
    )
    add(
        f"{uni}/{name(901, 3)}",
        b"This is not an image, just a text file with a .png name.\n",
        "quarantined",
        "not_an_image",
        "plain text named .png",
    )
    gif = _save(cell(902, False)[0].convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
    add(
        f"{uni}/{name(902, 4, '.gif')}",
        gif,
        "quarantined",
        "unsupported_format",
        "a real GIF image: decodable, but not a format the microscopes produce",
    )
    tiny = Image.fromarray(np.full((4, 4, 3), (200, 140, 150), np.uint8))
    add(
        f"{uni}/{name(902, 5)}",
        _save(tiny, "PNG"),
        "quarantined",
        "image_too_small",
        "4x4 RGB PNG, below the 16 px minimum side",
    )
    add(
        f"{par}/{name(903, 6)}",
        _huge_png_header(20000),
        "quarantined",
        "image_too_large",
        "PNG header claims 20000x20000 (a few KB on disk; must be refused before decoding)",
    )
    add(
        f"{par}/{name(903, 7)}",
        _save(cell(903, True)[0].convert("L"), "PNG"),
        "quarantined",
        "grayscale",
        "8-bit grayscale PNG (mode L): stain colour is lost",
    )
    gray16 = np.asarray(cell(903, False)[0].convert("L"), dtype=np.uint16) * 257
    add(
        f"{uni}/{name(903, 8)}",
        _save(Image.fromarray(gray16), "PNG"),
        "quarantined",
        "grayscale",
        "16-bit grayscale PNG (mode I;16)",
    )

    _, colour, mask = cell(904, True)
    rgba = np.dstack([to_uint8(colour), to_uint8(mask * 255.0)])
    add(
        f"{par}/{name(904, 9)}",
        _save(Image.fromarray(rgba), "PNG"),
        "accepted",
        "RGBA",
        "RGBA PNG: composited onto black, then accepted",
    )
    palette = cell(904, False)[0].convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    add(
        f"{uni}/{name(904, 10)}",
        _save(palette, "PNG"),
        "accepted",
        "P",
        "palette PNG (mode P): converted to RGB, then accepted",
    )
    rgb16 = np.asarray(cell(905, True)[0])
    add(
        f"{par}/{name(905, 11)}",
        _rgb16_png(rgb16),
        "accepted",
        "RGB16",
        "48-bit RGB PNG (16 bits per channel): reduced to 8-bit RGB, then accepted",
    )

    add(
        f"{uni}/{name(905, 0, cell_part='cell 7 é')}",
        _save(cell(905, False)[0], "PNG"),
        "accepted",
        None,
        "valid cell under a key with spaces and non-ASCII characters",
    )
    add(
        f"loose/{name(906, 1)}",
        _save(cell(906, False)[0], "PNG"),
        "quarantined",
        "no_label",
        "valid cell outside any class folder",
    )

    conflict = _save(cell(907, True)[0], "PNG")
    add(
        f"{par}/{name(907, 11)}",
        conflict,
        "quarantined",
        "label_conflict",
        "same bytes as the Uninfected cell_12 in this run, under another label",
    )
    add(
        f"{uni}/{name(907, 12)}",
        conflict,
        "quarantined",
        "label_conflict",
        "same bytes as the Parasitized cell_11 in this run, under another label",
    )

    twice = _save(cell(908, False)[0], "PNG")
    add(
        f"{uni}/{name(908, 21)}",
        twice,
        "accepted",
        None,
        "first of two identical uploads under one label (first in key order)",
    )
    add(
        f"{uni}/{name(908, 22)}",
        twice,
        "duplicate",
        None,
        "second copy of cell_21's bytes under the same label",
    )

    add(
        f"{par}/{name(909, 1, '.jpg')}",
        _save(cell(909, True)[0], "JPEG", quality=92),
        "accepted",
        None,
        "valid JPEG cell",
    )
    add(
        f"{uni}/{name(909, 2, '.tif')}",
        _save(cell(909, False)[0], "TIFF"),
        "accepted",
        None,
        "valid TIFF cell",
    )
    add(
        f"{par}/{name(910, 3, '.webp')}",
        _save(cell(910, True)[0], "WEBP", quality=92),
        "accepted",
        None,
        "valid WebP cell",
    )
    # Lower-case class folder: labels are matched case-insensitively.
    add(
        f"uninfected/{name(910, 4, '.bmp')}",
        _save(cell(910, False)[0], "BMP"),
        "accepted",
        None,
        "valid BMP cell in a lower-case class folder",
    )
    return items
