"""Labelled synthetic cells with NIH-style file names, and a class-folder tree of them."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from malaria.core.labels import CLASS_NAMES
from malaria_dev.synthetic.drawing import render_cell
from malaria_dev.synthetic.stain import (
    TAG_CELL,
    TAG_LABELS,
    TAG_NAMES,
    TAG_SCAN_CELL,
    TAG_SCAN_LABELS,
    TAG_SCAN_NAMES,
    SlideStyle,
    seeded_rng,
    slide_style,
)

# Real NIH slide numbers are below 200, so synthetic slides counted from here never mix
# with them; bad_inputs uses 900-999.
FIRST_SYNTHETIC_SLIDE = 201

_FORMAT_SUFFIX = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "TIFF": ".tif",
    "WEBP": ".webp",
    "BMP": ".bmp",
}


@dataclass(frozen=True)
class SyntheticCell:
    """One generated crop, encoded, with the label and name it would carry in the bucket."""

    class_name: str  # "Parasitized" or "Uninfected"
    slide_id: int
    file_name: str  # C{slide}P{patient}ThinF_IMG_{date}_{time}_cell_{n}.png
    data: bytes  # encoded image (PNG, 8-bit RGB, unless another format was asked for)


def _encode(image: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "PNG":
        # A low zlib level: the files are small anyway and encoding dominates otherwise.
        image.save(buf, format="PNG", compress_level=3)
    elif image_format in ("JPEG", "WEBP"):
        image.save(buf, format=image_format, quality=92)
    else:
        image.save(buf, format=image_format)
    return buf.getvalue()


class _Namer:
    """Hands out NIH-style file names for one slide: fields of view, each with cells."""

    def __init__(
        self, slide_id: int, style: SlideStyle, rng: np.random.Generator, start: datetime
    ) -> None:
        self._prefix = f"C{slide_id}P{style.patient}ThinF_IMG_"
        self._rng = rng
        self._time = start
        self._left = 0
        self._cell = 0

    def next_name(self, suffix: str) -> str:
        if self._left == 0:
            # A new field of view: later timestamp, a fresh run of cell numbers.
            self._time += timedelta(seconds=int(self._rng.integers(40, 400)))
            self._left = int(self._rng.integers(15, 60))
            self._cell = int(self._rng.integers(0, 12))
        self._left -= 1
        # Not every segmented cell was kept, so numbers skip now and then.
        self._cell += 1 + int(self._rng.random() < 0.3)
        stamp = self._time.strftime("%Y%m%d_%H%M%S")
        return f"{self._prefix}{stamp}_cell_{self._cell}{suffix}"


def _resolve_slides(slides: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(slides, int):
        if slides < 1:
            raise ValueError(f"slides must be at least 1, got {slides}")
        return tuple(range(FIRST_SYNTHETIC_SLIDE, FIRST_SYNTHETIC_SLIDE + slides))
    ids = tuple(dict.fromkeys(int(s) for s in slides))  # keep order, drop repeats
    if not ids or min(ids) < 0:
        raise ValueError(f"slides must be non-empty non-negative ids, got {slides!r}")
    return ids


def _labels(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(n * fraction) parasitized cells, in a shuffled order."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"parasitized_fraction must be in [0, 1], got {fraction}")
    labels = np.zeros(n, dtype=bool)
    labels[: round(n * fraction)] = True
    return rng.permutation(labels)


def _format(image_format: str) -> tuple[str, str]:
    """Pillow's format name and the file suffix for a requested format."""
    fmt = {"JPG": "JPEG", "TIF": "TIFF"}.get(image_format.upper(), image_format.upper())
    if fmt not in _FORMAT_SUFFIX:
        raise ValueError(
            f"image_format must be one of {sorted(_FORMAT_SUFFIX)}, got {image_format!r}"
        )
    return fmt, _FORMAT_SUFFIX[fmt]


def generate_cells(
    n: int,
    *,
    slides: int | Sequence[int] = 6,
    parasitized_fraction: float = 0.5,
    seed: int = 0,
    image_format: str = "PNG",
) -> Iterator[SyntheticCell]:
    """Yield `n` labelled cells spread round-robin over the slides.

    `slides` is either a count (ids 201, 202, ... so they never collide with real NIH
    slides, which are numbered below 200) or explicit slide ids. Exactly
    round(n * parasitized_fraction) cells are parasitized. The same arguments always give
    the same cells, names and bytes; names are unique.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    ids = _resolve_slides(slides)
    fmt, suffix = _format(image_format)
    labels = _labels(n, parasitized_fraction, seeded_rng(seed, TAG_LABELS))
    namers = {
        sid: _Namer(
            sid,
            slide_style(sid, seed),
            seeded_rng(seed, sid, TAG_NAMES),
            slide_style(sid, seed).session,
        )
        for sid in ids
    }

    # Arguments are checked above, eagerly; only the drawing is lazy.
    def cells() -> Iterator[SyntheticCell]:
        for i in range(n):
            sid = ids[i % len(ids)]
            parasitized = bool(labels[i])
            # One stream per cell, so a cell does not depend on how many came before it.
            image = render_cell(
                seeded_rng(seed, sid, TAG_CELL, i), parasitized=parasitized, slide_id=sid, seed=seed
            )
            yield SyntheticCell(
                class_name=CLASS_NAMES[0] if parasitized else CLASS_NAMES[1],
                slide_id=sid,
                file_name=namers[sid].next_name(suffix),
                data=_encode(image, fmt),
            )

    return cells()


def generate_scan_cells(
    n: int,
    *,
    slide_id: int,
    seed: int = 0,
    parasitized_fraction: float = 0.1,
) -> Iterator[SyntheticCell]:
    """Yield `n` cells of one new slide scan, as PNG, for scoring.

    The class is recorded so tests can check predictions and the parasitemia estimate
    (exactly round(n * parasitized_fraction) cells are parasitized). The scan is a later
    session than the training cells of the same slide, so names never collide with
    generate_cells' names.
    """
    if n < 0 or slide_id < 0:
        raise ValueError(f"n and slide_id must be non-negative, got {n} and {slide_id}")
    style = slide_style(slide_id, seed)
    labels = _labels(n, parasitized_fraction, seeded_rng(seed, slide_id, TAG_SCAN_LABELS))
    name_rng = seeded_rng(seed, slide_id, TAG_SCAN_NAMES)
    start = style.session + timedelta(days=int(name_rng.integers(30, 400)))
    namer = _Namer(slide_id, style, name_rng, start)

    def cells() -> Iterator[SyntheticCell]:
        for i in range(n):
            parasitized = bool(labels[i])
            image = render_cell(
                seeded_rng(seed, slide_id, TAG_SCAN_CELL, i),
                parasitized=parasitized,
                slide_id=slide_id,
                seed=seed,
            )
            yield SyntheticCell(
                class_name=CLASS_NAMES[0] if parasitized else CLASS_NAMES[1],
                slide_id=slide_id,
                file_name=namer.next_name(".png"),
                data=_encode(image, "PNG"),
            )

    return cells()


def write_labelled_tree(
    dest: Path,
    n: int,
    *,
    slides: int | Sequence[int] = 6,
    parasitized_fraction: float = 0.5,
    seed: int = 0,
    image_format: str = "PNG",
) -> list[Path]:
    """Write `n` generated cells as dest/<class>/<file>, the layout of the NIH download."""
    dest = Path(dest)
    for name in CLASS_NAMES:
        (dest / name).mkdir(parents=True, exist_ok=True)
    paths = []
    for cell in generate_cells(
        n,
        slides=slides,
        parasitized_fraction=parasitized_fraction,
        seed=seed,
        image_format=image_format,
    ):
        path = dest / cell.class_name / cell.file_name
        path.write_bytes(cell.data)
        paths.append(path)
    return paths

