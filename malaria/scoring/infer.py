"""Fetch, decode and batched inference of a list of cells: a bounded producer/consumer
pipeline (fetch threads at most two batches ahead of the model)."""

from __future__ import annotations

import io
import itertools
import logging
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from malaria.core.defaults import SCORE_BATCH_SIZE, SCORE_CONCURRENCY, SCORE_KEYS_PER_FETCH
from malaria.core.images import (
    BLANK_MAX_VALUE,
    DEFAULT_LIMITS,
    ImageLimits,
    check_size,
    is_blank,
    validate_open_image,
)
from malaria.dataset.decode import model_input
from malaria.io.store import ObjectNotFound, Store
from malaria.scoring.due import Cell
from malaria.scoring.model import LoadedModel

log = logging.getLogger(__name__)

MISSING_OBJECT = "missing_object"  # listed, then deleted before it was fetched
DECODE_ERROR = "decode_error"  # a decoder raised something unexpected


def prepare_cell(data: bytes, size: int,
                 limits: ImageLimits = DEFAULT_LIMITS) -> tuple[np.ndarray | None, str]:
    """Validate and preprocess one cell with a single decode: ``(array, "")`` or
    ``(None, reason)`` with the validator's reason code (``corrupt_image``, ``grayscale``...).

    Never raises for bad bytes: an unreadable cell is a row with an error, not a crash.
    """
    early = check_size(len(data), limits)
    if early is not None:
        return None, str(early.reason)
    try:
        with warnings.catch_warnings():
            # Pillow's decompression-bomb guard warns before it errors; both are refusals.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                return None, "image_too_large"
            except UnidentifiedImageError:
                return None, "not_an_image"
            except (OSError, ValueError, SyntaxError):
                return None, "corrupt_image"
            with image:
                verdict = validate_open_image(image, limits, check_blank=False)
                if not verdict.accepted:
                    return None, str(verdict.reason)
                array = model_input(image, size)
                # The blank test on the model's input first: area averaging never raises
                # the maximum, so a shrunk copy that is bright enough proves the original is.
                # Only a dark copy (or an enlarged one) needs the full-size pass.
                shrunk = max(image.size) >= size
                if (not shrunk or int(array.max()) < BLANK_MAX_VALUE) and is_blank(image):
                    return None, "blank_image"
                return array, ""
    except Exception:  # a decoder bug on hostile bytes must not stop a slide
        log.warning("unexpected decoder error", exc_info=True)
        return None, DECODE_ERROR


def _fetch_prepare(store: Store, cells: Sequence[Cell], size: int,
                   limits: ImageLimits) -> list[tuple[np.ndarray | None, str]]:
    """A few cells fetched together (one ``Store.get_many`` call), then decoded.
    An empty or huge object is known from the listing and not fetched."""
    refusals = [check_size(cell.size, limits) for cell in cells]
    fetched = iter(store.get_many([cell.key for cell, refused in zip(cells, refusals, strict=True)
                                   if refused is None]))
    results: list[tuple[np.ndarray | None, str]] = []
    for refused in refusals:
        if refused is not None:
            results.append((None, str(refused.reason)))
            continue
        data = next(fetched)
        results.append((None, MISSING_OBJECT) if isinstance(data, ObjectNotFound)
                       else prepare_cell(data, size, limits))
    return results


def score_cells(store: Store, cells: Sequence[Cell], model: LoadedModel, *,
                batch_size: int = SCORE_BATCH_SIZE, concurrency: int = SCORE_CONCURRENCY,
                limits: ImageLimits = DEFAULT_LIMITS, tta: int = 1,
                keys_per_fetch: int = SCORE_KEYS_PER_FETCH) -> list[tuple[float | None, str]]:
    """``(probability, "")`` or ``(None, error)`` per cell, in order.

    Producer/consumer: ``concurrency`` threads fetch and decode at most two batches ahead
    (the bounded queue: a deque of futures, one per ``keys_per_fetch`` cells fetched by one
    ``get_many`` call), while this thread fills a preallocated batch and runs the model
    on it. Pillow and TensorFlow release the GIL, so fetching, decoding and inference
    overlap.
    """
    results: list[tuple[float | None, str]] = [(None, "")] * len(cells)
    size = model.input_size
    batch = np.empty((batch_size, size, size, 3), np.uint8)
    members: list[int] = []

    def flush() -> None:
        probabilities = model.predict(batch[:len(members)], tta)
        for index, probability in zip(members, probabilities, strict=True):
            results[index] = (float(probability), "")
        members.clear()

    ahead = 2 * batch_size // keys_per_fetch + 1  # chunks in flight: two batches' worth
    window: deque[tuple[int, Future[list[tuple[np.ndarray | None, str]]]]] = deque()
    chunks = ((start, cells[start:start + keys_per_fetch])
              for start in range(0, len(cells), keys_per_fetch))
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="score-fetch")
    try:
        def top_up() -> None:
            for start, chunk in itertools.islice(chunks, ahead - len(window)):
                window.append((start, pool.submit(_fetch_prepare, store, chunk, size, limits)))

        top_up()
        while window:
            start, future = window.popleft()
            prepared = future.result()
            top_up()
            for index, (array, error) in enumerate(prepared, start):
                if array is None:
                    results[index] = (None, error)
                    continue
                batch[len(members)] = array
                members.append(index)
                if len(members) == batch_size:
                    flush()
        if members:
            flush()
    finally:
        for _, future in window:
            future.cancel()
        pool.shutdown(wait=True)
    return results
