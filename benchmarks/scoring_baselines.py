"""The baselines and bounds ``benchmarks.scoring`` measures beside the score flow, on the same
cells and model file in the same run (see that module's docstring)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from malaria.core import layout
from malaria.core.defaults import SCORE_KEYS_PER_FETCH
from malaria.core.labels import PARASITIZED, UNINFECTED


def article_loop(model: Any, files: list[Path], size: int) -> float:
    """(a) per file: load_img, img_to_array, batch axis, model.predict on one image."""
    import keras
    import numpy as np

    start = time.perf_counter()
    for path in files:
        image = keras.utils.load_img(path, target_size=(size, size))
        x = np.expand_dims(keras.utils.img_to_array(image), axis=0)
        model.predict(x, verbose=0)  # the model rescales inside: no second /255 here
    return len(files) / (time.perf_counter() - start)


def keras_download(store: Any, out: Any, model: Any, size: int, batch_size: int,
                   folder: Path) -> tuple[float, int]:
    """(b) boto3 download into a folder, image_dataset_from_directory + model.predict, a
    CSV per slide, boto3 upload."""
    import keras
    import pandas as pd

    client = store.client
    start = time.perf_counter()
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=store.bucket, Prefix=layout.SCANS):
        for item in page.get("Contents", []):
            path = folder / item["Key"]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(store.bucket, item["Key"], str(path))
    dataset = keras.utils.image_dataset_from_directory(
        folder / "scans", labels=None, image_size=(size, size), batch_size=batch_size,
        shuffle=False)
    probabilities = model.predict(dataset, verbose=0).reshape(-1)
    frame = pd.DataFrame({"file": dataset.file_paths, "probability": probabilities})
    frame["slide"] = frame.file.map(lambda p: Path(p).parent.name)
    frame["predicted_class"] = (frame.probability >= 0.5).map(
        {True: PARASITIZED, False: UNINFECTED})
    for slide, rows in frame.groupby("slide"):
        path = folder / f"{slide}.csv"
        rows.to_csv(path, index=False)
        out.client.upload_file(str(path), out.bucket, layout.prediction_key(str(slide)))
    return len(frame) / (time.perf_counter() - start), len(frame)


class MemoryStore:
    """Bytes already in memory, behind the one method the scorer reads with."""

    def __init__(self, data: dict[str, bytes]) -> None:
        self.data = data

    def get_bytes(self, key: str) -> bytes:
        return self.data[key]

    def get_many(self, keys: list[str]) -> list[bytes]:
        return [self.data[key] for key in keys]


def compute_bound(cells: list[tuple[str, bytes]], model_path: Path, batch_size: int,
                  concurrency: int, shard_size: int,
                  views: int = 1) -> tuple[float, dict[str, float]]:
    """(c) decode + resize + inference with the project's shard scorer, no storage: the best
    of one ``score_cells`` over every cell, and the shards of the end-to-end run scored as
    the flow's thread runner runs them (``SCORE_PARALLEL_SHARDS`` at a time), so that the
    bound gets the same overlap between shards that the project has. ``views``: test-time
    views per cell, as the project scores the model."""
    from itertools import groupby

    from malaria.core.defaults import SCORE_PARALLEL_SHARDS
    from malaria.scoring.due import Cell
    from malaria.scoring.infer import score_cells
    from malaria.scoring.model import ModelRef, load_model
    from malaria.scoring.shards import split_shards

    loaded = load_model(ModelRef("bench", 0.5, "file", str(model_path)))
    store = MemoryStore(dict(cells))
    keys = [Cell(key, "", len(data)) for key, data in cells]

    def score(chunk: Any) -> None:
        score_cells(store, chunk, loaded, batch_size=batch_size,  # type: ignore[arg-type]
                    concurrency=concurrency, tta=views)

    start = time.perf_counter()
    score(keys)
    single = len(keys) / (time.perf_counter() - start)
    shards = [shard.cells for slide, group in groupby(keys, key=lambda c: c.key.split("/")[0])
              for shard in split_shards(slide, list(group), shard_size)]
    start = time.perf_counter()
    with ThreadPoolExecutor(SCORE_PARALLEL_SHARDS) as pool:
        list(pool.map(score, shards))
    sharded = len(keys) / (time.perf_counter() - start)
    return max(single, sharded), {"single_pipeline": round(single, 1),
                                  "shards_as_scheduled": round(sharded, 1)}


def storage_bound(store: Any, keys: list[str], concurrency: int) -> float:
    """(c) concurrent GETs of the same objects with the scorer's own GET (the store's
    ``get_many``, as many keys per call as a fetch thread asks for), nothing decoded."""
    chunks = [keys[i:i + SCORE_KEYS_PER_FETCH]
              for i in range(0, len(keys), SCORE_KEYS_PER_FETCH)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in pool.map(store.get_many, chunks):
            pass
    return len(keys) / (time.perf_counter() - start)
