"""Records, the decoded-image cache, slide splits, class weights, the input pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from malaria.core.layout import dataset_key
from malaria.dataset.cache import ImageCache
from malaria.dataset.decode import decode_to_array, to_square
from malaria.dataset.pipeline import class_weights, load_arrays, make_dataset
from malaria.dataset.records import (
    CellRecord,
    file_content_id,
    folder_reader,
    records_from_folder,
    records_from_store,
    store_reader,
)
from malaria.dataset.split import split_by_slide
from malaria.io.store import LocalStore, S3Store
from malaria_dev.synthetic import generate_cells, write_labelled_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cells")
    write_labelled_tree(root, 24, slides=4, seed=3)
    return root


def test_records_from_folder(tree: Path) -> None:
    records = records_from_folder(tree)
    assert len(records) == 24
    assert {r.label for r in records} == {0, 1}
    assert {r.slide for r in records} == {"201", "202", "203", "204"}
    for record in records:
        assert record.label == (record.key.startswith("Parasitized/"))
        assert record.content_id == file_content_id((tree / record.key).read_bytes())


def test_records_from_folder_without_slide_in_name(tmp_path: Path) -> None:
    (tmp_path / "uninfected").mkdir()
    Image.new("RGB", (30, 20), (200, 100, 120)).save(tmp_path / "uninfected" / "cell.png")
    (tmp_path / "uninfected" / "notes.txt").write_text("not an image")
    [record] = records_from_folder(tmp_path)
    assert (record.label, record.slide) == (0, "unknown")


def _fill(store: S3Store | LocalStore, n: int, seed: int = 0) -> dict[str, bytes]:
    written = {}
    for cell in generate_cells(n, slides=3, seed=seed):
        key = dataset_key(cell.class_name, str(cell.slide_id), cell.file_name)
        store.put_bytes(key, cell.data)
        written[key] = cell.data
    store.put_bytes("dataset/README.txt", b"not a cell")
    store.put_bytes("incoming/Parasitized/x.png", b"not in the dataset")
    return written


def test_records_from_store(any_store: S3Store | LocalStore) -> None:
    written = _fill(any_store, 12)
    records = records_from_store(any_store)
    assert sorted(r.key for r in records) == sorted(written)
    for record in records:
        assert record.slide == record.key.split("/")[2]
        assert record.label == int(record.key.split("/")[1] == "Parasitized")
    if isinstance(any_store, S3Store):
        # A single-PUT ETag is the MD5 of the bytes: the same id as for a local file.
        for record in records:
            assert record.content_id == file_content_id(written[record.key])


def test_to_square_pads_with_black_and_keeps_shape() -> None:
    image = Image.new("RGB", (100, 50), (255, 255, 255))
    array = to_square(image, 40)
    assert array.shape == (40, 40, 3) and array.dtype == np.uint8
    # A 2:1 white rectangle stays 2:1 (padded top and bottom), not stretched.
    assert array[0].max() == 0 and array[-1].max() == 0
    assert array[20].min() == 255
    assert to_square(Image.new("RGB", (20, 20), (9, 9, 9)), 64).shape == (64, 64, 3)


def test_decode_composites_transparency_onto_black() -> None:
    import io

    rgba = Image.new("RGBA", (32, 32), (250, 10, 10, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    assert decode_to_array(buffer.getvalue(), 16).max() == 0


class CountingReader:
    def __init__(self, root: Path) -> None:
        self.inner = folder_reader(root)
        self.calls = 0

    def __call__(self, key: str) -> bytes:
        self.calls += 1
        return self.inner(key)


def test_cache_decodes_each_image_once(tree: Path, tmp_path: Path) -> None:
    records = records_from_folder(tree)
    cache = ImageCache(tmp_path / "cache")
    reader = CountingReader(tree)
    first = cache.load(records[:16], 32, reader)
    assert (cache.stats.decoded, reader.calls) == (16, 16)

    again = ImageCache(tmp_path / "cache")  # a later run, same folder
    reader = CountingReader(tree)
    second = again.load(records, 32, reader)
    assert (again.stats.decoded, again.stats.reused) == (8, 16)  # only the new ones
    assert reader.calls == 8
    np.testing.assert_array_equal(second[:16], first)

    reader = CountingReader(tree)
    again.load(records, 32, reader)
    assert reader.calls == 0
    # Another input size is another cache entry.
    assert again.load(records[:2], 24, CountingReader(tree)).shape == (2, 24, 24, 3)


def test_cache_reads_from_a_store(local_store: LocalStore, tmp_path: Path) -> None:
    _fill(local_store, 6)
    records = records_from_store(local_store)
    arrays = load_arrays(records, ImageCache(tmp_path / "c"), 28, store_reader(local_store))
    assert arrays.images.shape == (6, 28, 28, 3)
    assert arrays.labels.tolist() == [float(r.label) for r in records]


def _records(layout: list[tuple[int, int]]) -> list[CellRecord]:
    """(parasitized, uninfected) cell counts per slide -> records."""
    records = []
    for slide, (pos, neg) in enumerate(layout):
        for i in range(pos + neg):
            records.append(CellRecord(f"k/{slide}/{i}", int(i < pos), str(slide), f"{slide}-{i}"))
    return records


def _splits(records: list[CellRecord], seed: int) -> Iterator[list[str]]:
    split = split_by_slide(records, seed=seed, val_fraction=0.2, test_fraction=0.2)
    yield split.train
    yield split.val
    yield split.test


@settings(max_examples=40, deadline=None)
@given(
    layout=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)).filter(sum), min_size=1,
                    max_size=30),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_is_disjoint_complete_and_deterministic(layout: list[tuple[int, int]],
                                                      seed: int) -> None:
    records = _records(layout)
    parts = list(_splits(records, seed))
    all_slides = [s for part in parts for s in part]
    assert len(all_slides) == len(set(all_slides))  # no slide in two splits
    assert set(all_slides) == {r.slide for r in records}
    assert parts == list(_splits(records, seed))


def test_split_is_stratified_and_seeded() -> None:
    # 20 slides mostly parasitized, 10 of healthy patients (uninfected only).
    records = _records([(40, 10)] * 20 + [(0, 30)] * 10)
    split = split_by_slide(records, seed=7, val_fraction=0.2, test_fraction=0.2)
    labels_of = {r.slide: set() for r in records}
    for record in records:
        labels_of[record.slide].add(record.label)
    for part in (split.train, split.val, split.test):
        assert set().union(*(labels_of[s] for s in part)) == {0, 1}
    assert len(split.test) == 6 and len(split.val) == 6
    other = split_by_slide(records, seed=8, val_fraction=0.2, test_fraction=0.2)
    assert other.test != split.test


def test_class_weights() -> None:
    assert class_weights(np.array([0, 1] * 50)) is None
    weights = class_weights(np.array([1] * 80 + [0] * 20))
    assert weights is not None
    assert weights[0] * 20 == pytest.approx(weights[1] * 80)
    assert weights[0] * 20 + weights[1] * 80 == pytest.approx(100)
    assert class_weights(np.ones(5)) is None


def test_make_dataset_batches_and_weights() -> None:
    images = np.zeros((10, 8, 8, 3), np.uint8)
    labels = np.array([1] * 8 + [0] * 2, np.float32)
    ds = make_dataset(images, labels, batch_size=4, shuffle=True, seed=1,
                      weights=class_weights(labels))
    batches = list(ds.as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert len(batches[0]) == 3 and batches[0][0].dtype == np.uint8
