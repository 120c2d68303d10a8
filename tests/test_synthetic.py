"""Unit tests for malaria_dev.synthetic: the stand-in for the real NIH cell images."""

from __future__ import annotations

import io
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from malaria.core.labels import CLASS_NAMES
from malaria_dev.synthetic import (
    BadInput,
    SyntheticCell,
    bad_inputs,
    generate_cells,
    generate_scan_cells,
    render_cell,
    write_labelled_tree,
)

NAME_RE = re.compile(r"^C(\d+)P(\d+)ThinF_IMG_(\d{8})_(\d{6})_cell_(\d+)\.png$")
SLIDE_RE = re.compile(r"C(\d+)")


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _purple_pixels(rgb: np.ndarray) -> int:
    """Cell pixels whose green is far below the cell's own green/(red+blue) balance.

    Parasites are stained purple (red and blue kept, green absorbed); the cell body is
    pink or lilac. Comparing with the cell's median makes the measure stain-independent,
    and the ratio ignores the dark anti-aliased rim.
    """
    a = rgb.astype(np.float32)
    inside = a.sum(axis=-1) > 60
    ratio = a[..., 1] / (a[..., 0] + a[..., 2] + 1)
    return int(((ratio < np.median(ratio[inside]) - 0.1) & inside).sum())


@pytest.fixture(scope="module")
def cells() -> list[SyntheticCell]:
    return list(generate_cells(120, slides=6, seed=11))


def test_same_seed_same_cells_and_other_seed_differs() -> None:
    first = list(generate_cells(8, seed=3))
    assert first == list(generate_cells(8, seed=3))
    other = list(generate_cells(8, seed=4))
    assert [c.data for c in first] != [c.data for c in other]


def test_a_cell_does_not_depend_on_how_many_are_generated() -> None:
    # Per-cell random streams: a bigger request extends a smaller one.
    assert (
        list(generate_cells(5, seed=2, parasitized_fraction=0.0))
        == list(generate_cells(9, seed=2, parasitized_fraction=0.0))[:5]
    )


def test_names_follow_the_nih_pattern_and_carry_the_slide(cells: list[SyntheticCell]) -> None:
    names = [c.file_name for c in cells]
    assert len(set(names)) == len(names)
    for cell in cells:
        match = NAME_RE.match(cell.file_name)
        assert match, cell.file_name
        slide = SLIDE_RE.match(cell.file_name)
        assert slide is not None
        assert int(slide.group(1)) == cell.slide_id
    # A slide count gives ids from 201 up, clear of the real slides (< 200).
    assert {c.slide_id for c in cells} == set(range(201, 207))


def test_cells_of_one_slide_share_one_patient(cells: list[SyntheticCell]) -> None:
    patients: dict[int, set[str]] = {}
    for cell in cells:
        match = NAME_RE.match(cell.file_name)
        assert match
        patients.setdefault(cell.slide_id, set()).add(match.group(2))
    assert all(len(p) == 1 for p in patients.values())


def test_explicit_slide_ids_are_used() -> None:
    got = list(generate_cells(6, slides=[7, 150, 7], seed=1))
    assert [c.slide_id for c in got] == [7, 150, 7, 150, 7, 150]
    assert all(c.file_name.startswith(f"C{c.slide_id}P") for c in got)


def test_pngs_are_8_bit_rgb_of_varied_sizes_in_range(cells: list[SyntheticCell]) -> None:
    sizes = []
    for cell in cells:
        assert cell.data[:8] == b"\x89PNG\r\n\x1a\n"
        assert cell.data[24:26] == bytes([8, 2])  # IHDR: bit depth 8, colour type RGB
        with Image.open(io.BytesIO(cell.data)) as im:
            assert (im.format, im.mode) == ("PNG", "RGB")
            sizes.append(im.size)
    assert all(80 <= w <= 200 and 80 <= h <= 200 for w, h in sizes)
    assert len(set(sizes)) > len(sizes) // 2
    assert any(w != h for w, h in sizes)


def test_cells_sit_on_a_black_background(cells: list[SyntheticCell]) -> None:
    for cell in cells[:20]:
        rgb = _decode(cell.data)
        h, w, _ = rgb.shape
        assert rgb[0, 0].max() < 10 and rgb[-1, -1].max() < 10
        centre = rgb[h // 2 - 5 : h // 2 + 5, w // 2 - 5 : w // 2 + 5]
        assert centre.mean() > 80
        # Pinkish: red above green inside the cell.
        assert centre[..., 0].mean() > centre[..., 1].mean()


def test_class_balance_is_exact() -> None:
    for n, fraction in [(120, 0.5), (50, 0.3), (7, 0.0), (7, 1.0)]:
        got = Counter(c.class_name for c in generate_cells(n, parasitized_fraction=fraction))
        assert got[CLASS_NAMES[0]] == round(n * fraction)
        assert got[CLASS_NAMES[1]] == n - round(n * fraction)


def test_parasitized_cells_carry_purple_marks(cells: list[SyntheticCell]) -> None:
    counts: dict[str, list[int]] = {name: [] for name in CLASS_NAMES}
    for cell in cells:
        counts[cell.class_name].append(_purple_pixels(_decode(cell.data)))
    parasitized = np.array(counts["Parasitized"])
    uninfected = np.array(counts["Uninfected"])
    assert parasitized.mean() > 10 * (uninfected.mean() + 1)
    # Visible in nearly every infected cell, so a small CNN can learn it quickly.
    assert (parasitized > 5).mean() >= 0.9
    assert (uninfected > 5).mean() <= 0.05


def test_slides_have_their_own_stain(cells: list[SyntheticCell]) -> None:
    # Median cell colour varies less within a slide than between slides.
    by_slide: dict[int, list[np.ndarray]] = {}
    for cell in cells:
        rgb = _decode(cell.data).reshape(-1, 3)
        by_slide.setdefault(cell.slide_id, []).append(np.median(rgb[rgb.sum(1) > 60], axis=0))
    means = np.array([np.mean(v, axis=0) for v in by_slide.values()])
    within = np.mean([np.var(np.array(v), axis=0).sum() for v in by_slide.values()])
    assert np.var(means, axis=0).sum() > within


def test_render_cell_honours_size_and_seed() -> None:
    a = render_cell(np.random.default_rng(5), parasitized=True, slide_id=300, size=(90, 170))
    assert a.mode == "RGB" and a.size == (90, 170)
    b = render_cell(np.random.default_rng(5), parasitized=True, slide_id=300, size=(90, 170))
    assert a.tobytes() == b.tobytes()


def test_other_formats_use_their_suffix() -> None:
    for fmt, suffix in [("JPEG", ".jpg"), ("TIFF", ".tif"), ("WEBP", ".webp")]:
        cell = next(generate_cells(1, image_format=fmt))
        assert cell.file_name.endswith(suffix)
        with Image.open(io.BytesIO(cell.data)) as im:
            assert im.format == fmt and im.mode == "RGB"


def test_bad_arguments_fail_at_the_call() -> None:
    with pytest.raises(ValueError):
        generate_cells(3, parasitized_fraction=1.5)
    with pytest.raises(ValueError):
        generate_cells(3, slides=0)
    with pytest.raises(ValueError):
        generate_cells(3, image_format="GIF")
    with pytest.raises(ValueError):
        generate_scan_cells(-1, slide_id=300)


def test_write_labelled_tree(tmp_path: Path) -> None:
    paths = write_labelled_tree(tmp_path / "cells", 10, seed=2)
    assert len(paths) == 10 and all(p.is_file() for p in paths)
    assert {p.parent.name for p in paths} == set(CLASS_NAMES)
    assert {p.parent.parent for p in paths} == {tmp_path / "cells"}
    cell = next(generate_cells(10, seed=2))
    assert (tmp_path / "cells" / cell.class_name / cell.file_name).read_bytes() == cell.data


def test_scan_cells_are_one_slide_with_the_asked_parasitemia() -> None:
    scan = list(generate_scan_cells(40, slide_id=203, seed=11, parasitized_fraction=0.1))
    assert {c.slide_id for c in scan} == {203}
    assert sum(c.class_name == "Parasitized" for c in scan) == 4
    names = {c.file_name for c in scan}
    assert len(names) == 40 and all(NAME_RE.match(n) for n in names)
    training = {c.file_name for c in generate_cells(40, slides=[203], seed=11)}
    assert not names & training
    assert scan == list(generate_scan_cells(40, slide_id=203, seed=11))


# --- bad inputs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad() -> list[BadInput]:
    return bad_inputs()


def _by_reason(items: list[BadInput], reason: str) -> list[BadInput]:
    return [b for b in items if b.expected_reason == reason]


def test_bad_inputs_keys_and_outcomes(bad: list[BadInput]) -> None:
    keys = [b.key for b in bad]
    assert len(set(keys)) == len(keys)
    assert {b.expected_outcome for b in bad} == {"quarantined", "accepted", "duplicate"}
    for item in bad:
        slide = SLIDE_RE.search(item.key.rsplit("/", 1)[-1])
        assert slide and 900 <= int(slide.group(1)) <= 999, item.key
        assert item.description
    assert bad == bad_inputs()


def test_bad_inputs_cover_every_reason(bad: list[BadInput]) -> None:
    quarantined = Counter(b.expected_reason for b in bad if b.expected_outcome == "quarantined")
    assert quarantined == {
        "empty_file": 1,
        "corrupt_image": 1,
        "not_an_image": 1,
        "unsupported_format": 1,
        "image_too_small": 1,
        "image_too_large": 1,
        "grayscale": 2,
        "no_label": 1,
        "label_conflict": 2,
    }
    converted = {b.expected_reason for b in bad if b.expected_outcome == "accepted"}
    assert converted == {"RGBA", "P", "RGB16", None}


def test_huge_image_is_a_small_file_with_a_huge_header(
    bad: list[BadInput], monkeypatch: pytest.MonkeyPatch
) -> None:
    (item,) = _by_reason(bad, "image_too_large")
    assert len(item.data) < 10_000
    # Pillow refuses > 2x MAX_IMAGE_PIXELS at open(): a validator must expect that error.
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(item.data))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(io.BytesIO(item.data)) as im:
        assert im.size == (20000, 20000)


def test_rgb16_png_is_valid_48_bit(bad: list[BadInput]) -> None:
    (item,) = _by_reason(bad, "RGB16")
    width, height, depth, colour_type = struct.unpack(">IIBB", item.data[16:26])
    assert (depth, colour_type) == (16, 2)
    with Image.open(io.BytesIO(item.data)) as im:
        im.load()  # checks the compressed data and CRCs
        assert im.size == (width, height)
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.mean() > 20


def test_bad_images_are_what_they_claim(bad: list[BadInput]) -> None:
    (empty,) = _by_reason(bad, "empty_file")
    assert empty.data == b""
    (truncated,) = _by_reason(bad, "corrupt_image")
    with pytest.raises(OSError), Image.open(io.BytesIO(truncated.data)) as im:
        im.load()
    (text,) = _by_reason(bad, "not_an_image")
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(text.data))

    def opened(reason: str) -> list[tuple[str | None, str, tuple[int, int]]]:
        out = []
        for item in _by_reason(bad, reason):
            with Image.open(io.BytesIO(item.data)) as im:
                im.load()
                out.append((im.format, im.mode, im.size))
        return out

    assert opened("unsupported_format")[0][0] == "GIF"
    assert opened("image_too_small") == [("PNG", "RGB", (4, 4))]
    assert sorted(mode for _, mode, _ in opened("grayscale")) == ["I;16", "L"]
    assert opened("RGBA")[0][:2] == ("PNG", "RGBA")
    assert opened("P")[0][:2] == ("PNG", "P")


def test_valid_inputs_decode_in_their_format(bad: list[BadInput]) -> None:
    formats = set()
    for item in bad:
        if item.expected_outcome == "accepted" and item.expected_reason is None:
            with Image.open(io.BytesIO(item.data)) as im:
                im.load()
                assert im.mode == "RGB" and min(im.size) >= 80
                formats.add(im.format)
    assert formats == {"PNG", "JPEG", "TIFF", "WEBP", "BMP"}
    keys = {b.key for b in bad}
    assert any(" " in k and not k.isascii() for k in keys)
    assert any(k.split("/")[0].lower() not in {c.lower() for c in CLASS_NAMES} for k in keys)


def test_only_the_intended_pairs_share_bytes(bad: list[BadInput]) -> None:
    groups: dict[bytes, list[BadInput]] = {}
    for item in bad:
        groups.setdefault(item.data, []).append(item)
    shared = [sorted(g, key=lambda b: b.key) for g in groups.values() if len(g) > 1]
    assert len(shared) == 2
    for group in shared:
        folders = {b.key.split("/")[0].lower() for b in group}
        outcomes = [(b.expected_outcome, b.expected_reason) for b in group]
        if len(folders) == 2:
            assert outcomes == [("quarantined", "label_conflict")] * 2
        else:
            # Same label twice: the first in key order is kept, the second is a duplicate.
            assert outcomes == [("accepted", None), ("duplicate", None)]
