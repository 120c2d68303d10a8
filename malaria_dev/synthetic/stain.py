"""What all synthetic cells of one slide share: stain colours, optics, patient, session.

A slide's style comes from (slide id, seed) alone, and every random draw has its own
stream (``seeded_rng``), so adding a draw to one never shifts another.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

import numpy as np

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
TAG_STYLE = 1
TAG_LABELS = 2
TAG_CELL = 3
TAG_SCAN_LABELS = 4
TAG_SCAN_CELL = 5
TAG_NAMES = 6
TAG_SCAN_NAMES = 7


@dataclass(frozen=True)
class SlideStyle:
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


def seeded_rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


@lru_cache(maxsize=1024)
def slide_style(slide_id: int, seed: int) -> SlideStyle:
    rng = seeded_rng(seed, slide_id, TAG_STYLE)
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
    return SlideStyle(
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

