"""Drawing one red-blood-cell crop: outline, shading, pallor, specks and parasites.

Vectorised numpy on coordinate grids (a few hundred cells per second on one core).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from malaria_dev.synthetic.stain import SlideStyle, slide_style

MIN_SIDE = 80
MAX_SIDE = 200


def _draw_size(rng: np.random.Generator, style: SlideStyle) -> tuple[int, int]:
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
    style: SlideStyle,
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


def render_arrays(
    rng: np.random.Generator,
    *,
    parasitized: bool,
    style: SlideStyle,
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
    img, mask = render_arrays(rng, parasitized=parasitized, style=slide_style(slide_id, seed), size=size)
    return Image.fromarray(to_uint8(img * mask[..., None]))


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)

