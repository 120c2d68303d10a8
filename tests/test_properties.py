"""Hostile input, as properties (issue 13, "what to build" 6): the image validator on random
and mutated bytes, key handling (no path ever escapes its folder) and CSV writing (no cell a
spreadsheet would evaluate). Example counts stay modest: CI runs on two cores."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import resource
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from malaria.core.csvsafe import escape_cell, is_formula_safe, unescape_cell
from malaria.core.images import ImageLimits, validate_image
from malaria.io.store import LocalStore, ObjectInfo, StorageError, check_key

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


# -------------------------------------------------------------------------- image validator


def _encoded(fmt: str, mode: str = "RGB", size: tuple[int, int] = (24, 20)) -> bytes:
    image = Image.new(mode, size)
    for x in range(size[0]):
        for y in range(size[1]):
            value = (x * 7 + y * 13) % 256
            image.putpixel((x, y), (value, 255 - value, 90) if mode == "RGB" else value)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = [_encoded(fmt) for fmt in ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")]
SEEDS.append(_encoded("PNG", "L"))
LIMITS = ImageLimits(max_side=2048, max_pixels=2_000_000)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image with a few byte flips, an insertion, a truncation or a header (size
    fields) rewrite: the bytes a broken microscope or a fuzzing attacker sends."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, min(64, len(data))))  # the header: sizes, counts, offsets
        data[at:at] = draw(st.binary(min_size=1, max_size=8))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def _check_verdict(data: bytes) -> None:
    verdict = validate_image(data, LIMITS)
    if verdict.accepted:
        assert verdict.reason is None and verdict.format and verdict.width and verdict.height
    else:
        assert isinstance(verdict.reason, str) and verdict.reason


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@SETTINGS
@given(st.binary(max_size=4096))
def test_validator_on_random_bytes_never_raises(data: bytes) -> None:
    _check_verdict(data)


@SETTINGS
@given(mutated_images())
def test_validator_on_mutated_images_never_raises(data: bytes) -> None:
    _check_verdict(data)


@SETTINGS
@given(st.integers(2049, 2**31 - 1), st.integers(1, 2**31 - 1), st.booleans())
def test_validator_memory_stays_bounded_on_huge_headers(side: int, other: int,
                                                        flip: bool) -> None:
    # A PNG whose (CRC-correct) header claims a huge size: refused from the header, never
    # allocated. The peak RSS is a high-water mark: it would keep a single big allocation.
    before = _peak_rss_mb()
    png = bytearray(SEEDS[0])
    width, height = (other, side) if flip else (side, other)
    png[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    assert validate_image(bytes(png), LIMITS).reason == "image_too_large"
    assert _peak_rss_mb() - before < 256


# ------------------------------------------------------------------------------- keys


SEGMENTS = st.sampled_from(["a", "b.png", ".", "..", "", ".hidden", "..x", "/", "\x00",
                            "~", "C:", "\\", " "])
HOSTILE_KEYS = st.lists(SEGMENTS, min_size=0, max_size=6).map("/".join) | st.text(
    alphabet="ab./\\\x00~", max_size=12)


@SETTINGS
@given(HOSTILE_KEYS)
def test_check_key_accepts_only_keys_with_plain_segments(key: str) -> None:
    try:
        checked = check_key(key)
    except StorageError:
        return
    segments = checked.split("/")
    assert all(s not in ("", ".", "..") for s in segments) and "\x00" not in checked


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() or p.is_symlink()]


@SETTINGS
@given(st.lists(HOSTILE_KEYS, min_size=1, max_size=5))
def test_local_store_never_writes_outside_its_root(keys: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = base / "deep" / "bucket"
        store = LocalStore(root)
        for key in keys:
            try:
                store.put_bytes(key, b"x")
            except (StorageError, NotADirectoryError, IsADirectoryError, FileExistsError):
                continue  # refused, or a file/folder clash ("a" and "a/b"): never elsewhere
            assert store.get_bytes(key) == b"x"
        assert all(_inside(p, root) for p in _all_files(base))


class _HostileStore:
    """A bucket that lists whatever keys it likes and serves bytes for any of them."""

    url = "hostile://"

    def __init__(self, keys: Sequence[str], documents: dict[str, bytes] | None = None) -> None:
        self.keys = keys
        self.documents = documents or {}

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for key in self.keys:
            yield ObjectInfo(key, 1, "e", datetime.now(UTC))

    def get_bytes(self, key: str) -> bytes:
        return self.documents.get(key, b"payload")

    def download_file(self, key: str, path: Path) -> None:
        path.write_bytes(self.get_bytes(key))


@SETTINGS
@given(st.lists(HOSTILE_KEYS, min_size=1, max_size=5))
def test_download_folder_never_writes_outside_its_folder(tails: list[str]) -> None:
    from malaria.model.checkpoints import download_folder

    prefix = "checkpoints/run/"
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        folder = base / "a" / "b" / "ckpt"
        folder.mkdir(parents=True)
        download_folder(_HostileStore([prefix + t for t in tails]), prefix, folder)  # type: ignore[arg-type]
        assert all(_inside(p, folder) for p in _all_files(base))


@SETTINGS
@given(HOSTILE_KEYS)
def test_a_model_file_name_never_leaves_the_download_folder(name: str) -> None:
    from malaria.registry.registry import ModelRegistry, RegistryError

    payload = b"weights"
    record = {"version": "v1", "model": {"file": name,
                                         "sha256": hashlib.sha256(payload).hexdigest()}}
    store = _HostileStore([], {"models/v1/metrics.json": json.dumps(record).encode()})
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        folder = base / "a" / "b" / "download"
        folder.mkdir(parents=True)
        try:
            path = ModelRegistry(store).download_model("v1", folder)  # type: ignore[arg-type]
        except (RegistryError, StorageError):
            pass
        else:
            assert _inside(path, folder) and path.read_bytes() == payload
        assert all(_inside(p, folder) for p in _all_files(base))


# -------------------------------------------------------------------------------- CSVs


TEXT = st.text(max_size=20) | st.sampled_from(["=1+2", "+1", "-2", "@A1", "\tx", "\rx",
                                               "'=x", "''-y", "'", "="])


def _cells(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


@SETTINGS
@given(TEXT)
def test_escaping_is_exact_and_leaves_no_formula(value: str) -> None:
    escaped = escape_cell(value)
    assert is_formula_safe(escaped)
    assert unescape_cell(escaped) == value


@SETTINGS
@given(st.lists(st.lists(TEXT, min_size=9, max_size=9), min_size=1, max_size=4))
def test_prediction_csv_cells_are_never_formulas(rows: list[list[str]]) -> None:
    from malaria.scoring.output import csv_text, read_prediction_rows

    text = csv_text(rows)
    assert all(is_formula_safe(cell) for row in _cells(text) for cell in row)
    read = read_prediction_rows(text)
    assert [list(r.values()) for r in read] == rows


@SETTINGS
@given(st.lists(TEXT, min_size=6, max_size=6))
def test_manifest_cells_are_never_formulas(values: list[str]) -> None:
    from malaria.ingest.manifest import ManifestRow, read_rows, rows_to_csv

    row = ManifestRow(run_id=values[0], source_key=values[1], size=3, etag=values[2],
                      outcome=values[3], detail=values[4], slide=values[5])
    data = rows_to_csv([row])
    assert all(is_formula_safe(cell) for r in _cells(data.decode()) for cell in r)
    assert list(read_rows(data)) == [row]


@SETTINGS
@given(st.lists(TEXT, min_size=1, max_size=4, unique=True))
def test_summary_csv_cells_are_never_formulas(slides: list[str]) -> None:
    from malaria.scoring.output import SlideSummary, summary_csv_bytes

    rows = [SlideSummary(slide=s, cells_scored=1, parasitized=0, parasitemia_pct=0.0,
                         unreadable=0, mean_probability=0.1, model_version="v1",
                         scored_at="2026-01-01T00:00:00+00:00", scan_fingerprint="f")
            for s in slides]
    text = summary_csv_bytes(rows).decode()
    cells = _cells(text)
    assert all(is_formula_safe(cell) for row in cells for cell in row)
    assert [unescape_cell(row[0]) for row in cells[1:]] == slides
