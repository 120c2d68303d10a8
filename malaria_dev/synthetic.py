"""Synthetic thin-blood-smear cell crops that look like the NIH malaria cell images.

Tests, demos and end-to-end runs must work on a machine without the real data set, so
this module draws single red-blood-cell crops with the look and the file naming of the
NIH/NLM images: a pinkish cell on a black background, a stain style shared by all cells
of one slide, and purple ring forms or chromatin dots in parasitized cells.

It also builds a catalogue of bad uploads (empty, truncated, wrong format, too small,
too large, grayscale, ...) with the outcome the ingest validator must reach for each.

Everything is deterministic for a seed, and drawing is vectorised numpy on coordinate
grids (a few hundred cells per second on one core).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("Parasitized", "Uninfected")

# Real NIH slide numbers are below 200, so synthetic slides counted from here never mix
# with them; bad_inputs uses 900-999.
FIRST_SYNTHETIC_SLIDE = 201
MIN_SIDE = 80
MAX_SIDE = 200

_FORMAT_SUFFIX = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "TIFF": ".tif",
    "WEBP": ".webp",
    "BMP": ".bmp",
}

# Stain looks seen in the real data (RGB of the cell body): Giemsa pink, peach, a cold
# lilac/grey-blue, magenta and mauve. A slide picks one and mixes in a little of another.
_STAIN_ANCHORS = np.array(
    [
        (214, 150, 160),  # pink
        (222, 168, 156),  # peach
        (186, 174, 212),  # lilac
        (214, 122, 186),  # magenta
        (192, 140, 172),  # mauve
    ],
    dtype=np.float32,
)
_STAIN_WEIGHTS = np.array([0.34, 0.18, 0.2, 0.12, 0.16])

# Separate random streams, so that adding a draw to one never shifts another.
_TAG_STYLE = 1
_TAG_LABELS = 2
_TAG_CELL = 3
_TAG_SCAN_LABELS = 4
_TAG_SCAN_CELL = 5
_TAG_NAMES = 6
_TAG_SCAN_NAMES = 7


@dataclass(frozen=True)
class SyntheticCell:
    """One generated crop, encoded, with the label and name it would carry in the bucket."""

    class_name: str  # "Parasitized" or "Uninfected"
    slide_id: int
    file_name: str  # C{slide}P{patient}ThinF_IMG_{date}_{time}_cell_{n}.png
    data: bytes  # encoded image (PNG, 8-bit RGB, unless another format was asked for)


@dataclass(frozen=True)
class BadInput:
    """An upload the ingest validator must handle, with the outcome it must reach."""

    key: str  # path relative to the bucket's incoming/ prefix
    data: bytes
    expected_outcome: str  # "quarantined" | "accepted" | "duplicate"
    expected_reason: str | None  # quarantine reason, or converted_from when accepted
    description: str


@dataclass(frozen=True)
class _SlideStyle:
    """What all cells of one slide share: stain, optics, patient and session date."""

    base: tuple[float, float, float]
    pallor: tuple[float, float, float]
    parasite: tuple[float, float, float]
    chromatin: tuple[float, float, float]
    mean_side: float
    rim: float
    texture: float
    noise: float
    pallor_strength: float
    patient: int
    session: datetime


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


@lru_cache(maxsize=1024)
def _slide_style(slide_id: int, seed: int) -> _SlideStyle:
    rng = _rng(seed, slide_id, _TAG_STYLE)
    first, second = rng.choice(len(_STAIN_ANCHORS), size=2, p=_STAIN_WEIGHTS)
    mix = rng.uniform(0.0, 0.4)
    base = (1 - mix) * _STAIN_ANCHORS[first] + mix * _STAIN_ANCHORS[second]
    base = base * rng.uniform(0.9, 1.06) + rng.normal(0.0, 6.0, 3)
    base = np.clip(base, 60, 245)
    # The pallor is a paler, slightly warmer version of the cell colour.
    pallor = base + (np.array([250.0, 232.0, 226.0]) - base) * rng.uniform(0.45, 0.75)
    # Parasites stain dark purple to violet; chromatin is darker still.
    violet = rng.uniform(0.0, 1.0)
    parasite = (1 - violet) * np.array([118.0, 28.0, 116.0]) + violet * np.array(
        [88.0, 36.0, 150.0]
    )
    parasite = parasite + rng.normal(0.0, 8.0, 3)
    chromatin = parasite * rng.uniform(0.55, 0.75)
    day = datetime(2016, 1, 4) + timedelta(days=int(rng.integers(0, 4 * 365)))
    session = day + timedelta(seconds=int(rng.integers(8 * 3600, 12 * 3600)))
    return _SlideStyle(
        base=_triple(base),
        pallor=_triple(pallor),
        parasite=_triple(parasite),
        chromatin=_triple(chromatin),
        mean_side=float(rng.uniform(105.0, 150.0)),
        rim=float(rng.uniform(0.03, 0.14)),
        texture=float(rng.uniform(0.015, 0.045)),
        noise=float(rng.uniform(0.006, 0.018)),
        pallor_strength=float(rng.uniform(0.15, 0.7)),
        patient=int(rng.integers(1, 200)),
        session=session,
    )


def _triple(a: np.ndarray) -> tuple[float, float, float]:
    return (float(a[0]), float(a[1]), float(a[2]))


def _draw_size(rng: np.random.Generator, style: _SlideStyle) -> tuple[int, int]:
    # Crops are the cell's bounding box: sides vary with the cell, aspect near 1.
    side = style.mean_side * rng.lognormal(0.0, 0.12)
    aspect = rng.uniform(0.84, 1.19)
    width = int(np.clip(round(side * np.sqrt(aspect)), MIN_SIDE, MAX_SIDE))
    height = int(np.clip(round(side / np.sqrt(aspect)), MIN_SIDE, MAX_SIDE))
    return width, height


def _window(
    shape: tuple[int, int], cy: float, cx: float, half: float
) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    """Slices of a square window around (cy, cx), and the offsets of its pixels."""
    h, w = shape
    y0, y1 = max(int(cy - half), 0), min(int(cy + half) + 2, h)
    x0, x1 = max(int(cx - half), 0), min(int(cx + half) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return None
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    return slice(y0, y1), slice(x0, x1), dy, dx


def _blend(
    img: np.ndarray,
    win: tuple[slice, slice, np.ndarray, np.ndarray],
    alpha: np.ndarray,
    colour: np.ndarray | tuple[float, float, float],
) -> None:
    """Paint `colour` over the window with per-pixel opacity `alpha`, in place."""
    sy, sx = win[0], win[1]
    a = alpha[..., None]
    img[sy, sx] = img[sy, sx] * (1 - a) + np.asarray(colour, dtype=np.float32) * a


def _draw_ring(
    img: np.ndarray,
    rng: np.random.Generator,
    cy: float,
    cx: float,
    scale: float,
    strength: float,
    style: _SlideStyle,
) -> None:
    # Ring form (early trophozoite): a thin annulus with one or two chromatin dots on it.
    radius = rng.uniform(5.0, 9.5) * scale
    thick = rng.uniform(1.6, 2.6) * scale
    win = _window(img.shape[:2], cy, cx, radius + 3 * thick + 4 * scale)
    if win is None:
        return
    dy, dx = win[2], win[3]
    dist = np.sqrt(dy * dy + dx * dx)
    ring = np.exp(-(((dist - radius) / thick) ** 2))
    if rng.random() < 0.35:
        # An open ring: real rings are often thinner or broken on one side.
        gap = rng.uniform(-np.pi, np.pi)
        ring *= np.clip(0.55 + 1.2 * np.cos(np.arctan2(dy, dx) - gap), 0.0, 1.0)
    _blend(img, win, ring * strength * 0.85, style.parasite)
    for _ in range(1 if rng.random() < 0.8 else 2):
        angle = rng.uniform(-np.pi, np.pi)
        ddy = dy - radius * np.sin(angle)
        ddx = dx - radius * np.cos(angle)
        dot_r = rng.uniform(2.0, 3.4) * scale
        dot = np.exp(-(ddy * ddy + ddx * ddx) / (dot_r * dot_r))
        _blend(img, win, np.clip(dot * 1.4, 0, 1) * strength, style.chromatin)


def _draw_blob(
    img: np.ndarray,
    rng: np.random.Generator,
    cy: float,
    cx: float,
    scale: float,
    strength: float,
    colour: tuple[float, float, float],
    dark: tuple[float, float, float],
    *,
    mature: bool,
    halo: float = 0.0,
) -> None:
    # Chromatin dots and amoeboid trophozoites: a few overlapping lobes, thresholded softly
    # so the outline is irregular; mature forms are larger, paler, with dark dots inside.
    size = rng.uniform(6.0, 10.0) if mature else rng.uniform(3.4, 5.6)
    size *= scale
    win = _window(img.shape[:2], cy, cx, 3.2 * size + 2)
    if win is None:
        return
    dy, dx = win[2], win[3]
    field = np.zeros(dy.shape[0:1] + dx.shape[1:2], dtype=np.float32)
    for _ in range(int(rng.integers(2, 5))):
        oy, ox = rng.normal(0.0, 0.55 * size, 2)
        s = size * rng.uniform(0.45, 0.8)
        field += np.exp(-((dy - oy) ** 2 + (dx - ox) ** 2) / (2 * s * s))
    alpha = np.clip((field - 0.35) * 2.2, 0.0, 1.0)
    if halo > 0:
        # Pale bluish-purple cytoplasm around the chromatin.
        _blend(img, win, np.clip(field * 0.9, 0.0, 1.0) * halo * strength, colour)
    if mature:
        _blend(img, win, alpha * strength * 0.6, colour)
        for _ in range(int(rng.integers(1, 4))):
            oy, ox = rng.normal(0.0, 0.5 * size, 2)
            r = rng.uniform(1.2, 2.2) * scale
            dot = np.exp(-((dy - oy) ** 2 + (dx - ox) ** 2) / (r * r))
            _blend(img, win, np.clip(dot * 1.3, 0, 1) * alpha * strength, dark)
    else:
        mid = 0.5 * (np.asarray(colour) + np.asarray(dark))
        _blend(img, win, alpha * strength * 0.95, mid)


def _draw_speck(
    img: np.ndarray,
    rng: np.random.Generator,
    cy: float,
    cx: float,
    scale: float,
    colour: np.ndarray,
    opacity: float,
) -> None:
    radius = rng.uniform(0.8, 1.8) * scale
    win = _window(img.shape[:2], cy, cx, 3 * radius + 1)
    if win is None:
        return
    dy, dx = win[2], win[3]
    _blend(img, win, np.exp(-(dy * dy + dx * dx) / (radius * radius)) * opacity, colour)


def _render(
    rng: np.random.Generator,
    *,
    parasitized: bool,
    style: _SlideStyle,
    size: tuple[int, int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one cell; return its colour (h, w, 3 float32, 0-255) and its mask (h, w, 0-1)."""
    w, h = size if size is not None else _draw_size(rng, style)
    if w < 1 or h < 1:
        raise ValueError(f"size must be positive, got {(w, h)}")
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]
    cx = (w - 1) / 2 + rng.normal(0.0, 0.015 * w)
    cy = (h - 1) / 2 + rng.normal(0.0, 0.015 * h)
    # The crop is the cell's bounding box, so the cell nearly touches (or is cut by) the
    # crop edges.
    fill = rng.uniform(0.9, 1.0)
    rx, ry = fill * w / 2, fill * h / 2
    r_mean = (rx + ry) / 2
    u = (xs - np.float32(cx)) / np.float32(rx)
    v = (ys - np.float32(cy)) / np.float32(ry)
    rho = np.sqrt(u * u + v * v)
    # Outline radius as a function of angle, from a few low harmonics: cos(k*theta + phi)
    # is Re(c * z**k) with z = e^(i*theta), which avoids arctan2 and cos on the full grid.
    z = np.empty((h, w), dtype=np.complex64)
    z.real = u
    z.imag = v
    z /= np.maximum(rho, np.float32(1e-6))
    irregular = rng.random() < 0.2
    amp = 0.075 if irregular else 0.025
    outline = np.ones((h, w), dtype=np.float32)
    zk = z * z
    for k in range(2, 7):
        c = rng.normal(0.0, amp / (k - 1)) * np.exp(1j * rng.uniform(-np.pi, np.pi))
        outline += (zk * np.complex64(c)).real
        zk = zk * z
    inside = outline - rho  # > 0 inside the cell, in units of the radius
    # Anti-aliased edge about a pixel wide: real crops have smooth but crisp outlines.
    mask = np.clip(inside * r_mean / rng.uniform(0.8, 1.6) + 0.5, 0.0, 1.0)

    # Brightness: a slightly darker rim, slow blotchy texture and a little fine noise.
    shade = 1.0 - style.rim * rng.uniform(0.6, 1.4) * np.exp(
        -np.maximum(inside, 0.0) / np.float32(rng.uniform(0.06, 0.14))
    )
    blotch = rng.standard_normal((5, 5)).astype(np.float32)
    blotch_img = Image.fromarray(blotch).resize((w, h), Image.Resampling.BICUBIC)
    shade += np.asarray(blotch_img) * np.float32(style.texture)
    shade += rng.standard_normal((h, w), dtype=np.float32) * np.float32(style.noise)

    colour = np.asarray(style.base, dtype=np.float32) * np.float32(rng.uniform(0.95, 1.05))
    colour = colour + rng.normal(0.0, 4.0, 3).astype(np.float32)
    img = shade[..., None] * colour

    # Central pallor: the thin middle of the biconcave disc lets more light through.
    strength = style.pallor_strength * rng.uniform(0.0, 1.6) if rng.random() < 0.85 else 0.0
    if strength > 0.02:
        pu, pv = rng.normal(0.0, 0.15, 2)
        su, sv = rng.uniform(0.15, 0.35, 2)
        pallor = np.exp(-(((u - pu) / su) ** 2 + ((v - pv) / sv) ** 2) / 2)
        a = np.minimum(pallor * np.float32(strength), 0.9)[..., None]
        img = img * (1 - a) + np.asarray(style.pallor, dtype=np.float32) * a
    img = img.astype(np.float32, copy=False)

    scale = r_mean / 62.0  # parasites are a fixed physical size; cells are ~125 px here

    def point_inside(max_rel: float) -> tuple[float, float]:
        # Uniform over the disc, then pulled inside the local outline.
        rad = np.sqrt(rng.uniform(0.0, 1.0)) * max_rel
        ang = rng.uniform(-np.pi, np.pi)
        return cy + rad * ry * np.sin(ang), cx + rad * rx * np.cos(ang)

    # Harmless specks occur in both classes, so a dot alone is not the answer.
    if rng.random() < 0.4:
        speck_colour = 0.8 * colour + 0.2 * np.array([150.0, 110.0, 190.0], np.float32)
        for _ in range(int(rng.integers(1, 5))):
            py, px = point_inside(0.85)
            _draw_speck(img, rng, py, px, scale, speck_colour, rng.uniform(0.12, 0.3))
    if rng.random() < 0.07:
        # A rarer darker grain of stain debris: small, muted, a little purple.
        debris = 0.4 * colour + 0.45 * np.asarray(style.chromatin, np.float32)
        py, px = point_inside(0.9)
        _draw_speck(img, rng, py, px, scale, debris, rng.uniform(0.5, 0.8))
    if parasitized:
        faint = rng.random() < 0.1
        strength = rng.uniform(0.45, 0.6) if faint else rng.uniform(0.8, 1.0)
        count = int(rng.choice([1, 2, 3, 4], p=[0.68, 0.2, 0.08, 0.04]))
        for _ in range(count):
            # Many parasites sit near the membrane (applique forms), others anywhere.
            py, px = point_inside(0.8 if rng.random() < 0.6 else 0.55)
            kind = rng.random()
            if kind < 0.5:
                _draw_ring(img, rng, py, px, scale, strength, style)
            else:
                _draw_blob(
                    img,
                    rng,
                    py,
                    px,
                    scale,
                    strength,
                    style.parasite,
                    style.chromatin,
                    mature=kind > 0.85,
                    halo=rng.uniform(0.0, 0.35),
                )
    elif rng.random() < 0.04:
        # A platelet lying on the cell edge: lilac, soft, rare.
        ang = rng.uniform(-np.pi, np.pi)
        rel = rng.uniform(0.82, 0.95)
        py, px = cy + rel * ry * np.sin(ang), cx + rel * rx * np.cos(ang)
        lilac = (176.0, 132.0, 196.0)
        strength = rng.uniform(0.5, 0.75)
        _draw_blob(img, rng, py, px, scale, strength, lilac, lilac, mature=False)
    return img, mask


def render_cell(
    rng: np.random.Generator,
    *,
    parasitized: bool,
    slide_id: int,
    seed: int = 0,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """Draw one cell crop as an RGB image.

    The stain style comes from (slide_id, seed), so all cells of a slide look alike; the
    cell's own shape, jitter and parasites come from `rng`. `size` is (width, height) in
    pixels; by default it is drawn around the slide's typical size within 80-200 px.
    """
    img, mask = _render(rng, parasitized=parasitized, style=_slide_style(slide_id, seed), size=size)
    return Image.fromarray(_to_uint8(img * mask[..., None]))


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


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
        self, slide_id: int, style: _SlideStyle, rng: np.random.Generator, start: datetime
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
    labels = _labels(n, parasitized_fraction, _rng(seed, _TAG_LABELS))
    namers = {
        sid: _Namer(
            sid,
            _slide_style(sid, seed),
            _rng(seed, sid, _TAG_NAMES),
            _slide_style(sid, seed).session,
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
                _rng(seed, sid, _TAG_CELL, i), parasitized=parasitized, slide_id=sid, seed=seed
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
    style = _slide_style(slide_id, seed)
    labels = _labels(n, parasitized_fraction, _rng(seed, slide_id, _TAG_SCAN_LABELS))
    name_rng = _rng(seed, slide_id, _TAG_SCAN_NAMES)
    start = style.session + timedelta(days=int(name_rng.integers(30, 400)))
    namer = _Namer(slide_id, style, name_rng, start)

    def cells() -> Iterator[SyntheticCell]:
        for i in range(n):
            parasitized = bool(labels[i])
            image = render_cell(
                _rng(seed, slide_id, _TAG_SCAN_CELL, i),
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


# --- bad inputs for the ingest validator ---------------------------------------------


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
        style = _slide_style(slide, seed)
        colour, mask = _render(
            _rng(seed, slide, _TAG_CELL, next(counter)),
            parasitized=parasitized,
            style=style,
            size=None,
        )
        rgb = _to_uint8(colour * mask[..., None])
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
    rgba = np.dstack([_to_uint8(colour), _to_uint8(mask * 255.0)])
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
