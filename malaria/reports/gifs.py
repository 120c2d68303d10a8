"""Pictures for people: an animated GIF of cells per class, like the source article's."""

from __future__ import annotations

import io
from collections.abc import Iterable

from PIL import Image

from malaria.core import layout
from malaria.core.images import decode_rgb
from malaria.core.labels import CLASS_NAMES
from malaria.dataset.decode import to_square
from malaria.io.store import Store

GIF_SIDE = 300
GIF_FRAME_MS = 700  # slow enough to look at each cell


def cells_gif(images: Iterable[bytes], *, side: int = GIF_SIDE,
              frame_ms: int = GIF_FRAME_MS) -> bytes:
    """One frame per cell, each padded to a square and resized to ``side`` px."""
    frames = [Image.fromarray(to_square(decode_rgb(data), side)) for data in images]
    if not frames:
        raise ValueError("no images for the GIF")
    # A shared adaptive palette per frame keeps stain colours close to the originals.
    paletted = [frame.quantize(colors=255, method=Image.Quantize.MEDIANCUT) for frame in frames]
    buffer = io.BytesIO()
    paletted[0].save(buffer, format="GIF", save_all=True, append_images=paletted[1:],
                     duration=frame_ms, loop=0, optimize=False)
    return buffer.getvalue()


def class_gifs(store: Store, *, per_class: int = 100, run_id: str) -> dict[str, str]:
    """GIFs of the first ``per_class`` cells of each class in ``dataset/``; returns the keys."""
    keys: dict[str, str] = {}
    for class_name in CLASS_NAMES:
        cell_keys = []
        for info in store.list(layout.dataset_class_prefix(class_name)):
            cell_keys.append(info.key)
            if len(cell_keys) >= per_class:
                break
        if not cell_keys:
            continue
        gif = cells_gif(store.get_bytes(key) for key in cell_keys)
        key = layout.report_key(run_id, f"{class_name.lower()}-first-{len(cell_keys)}.gif")
        store.put_bytes(key, gif, content_type="image/gif")
        keys[class_name] = key
    return keys
