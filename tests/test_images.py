"""Validation policy: every bad input gets its reason; convertible ones become 8-bit RGB."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from malaria.core.images import ImageLimits, validate_image
from malaria_dev.synthetic import bad_inputs, render_cell

# Outcomes that depend on the key or on other objects are tested in test_ingest.py.
KEY_DEPENDENT = {"no_label", "label_conflict"}
CONTENT_CASES = [b for b in bad_inputs() if b.expected_reason not in KEY_DEPENDENT
                 and b.expected_outcome != "duplicate"]


@pytest.mark.parametrize("case", CONTENT_CASES, ids=[c.description[:40] for c in CONTENT_CASES])
def test_bad_input_corpus(case) -> None:  # type: ignore[no-untyped-def]
    result = validate_image(case.data)
    if case.expected_outcome == "quarantined":
        assert result.reason == case.expected_reason, result.detail
        assert result.detail
    else:
        assert result.accepted, result.detail
        assert result.converted_from == case.expected_reason


def test_converted_images_are_8bit_rgb_png() -> None:
    for case in CONTENT_CASES:
        result = validate_image(case.data)
        if result.accepted and result.converted_png is not None:
            image = Image.open(io.BytesIO(result.converted_png))
            assert (image.format, image.mode) == ("PNG", "RGB")


def test_rgba_is_composited_onto_black() -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[8:24, 8:24, 3] = 255  # opaque centre, transparent border
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    result = validate_image(buffer.getvalue())
    assert result.accepted and result.converted_from == "RGBA"
    pixels = np.asarray(Image.open(io.BytesIO(result.converted_png or b"")))
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[16, 16].tolist() == [200, 0, 0]


def test_bomb_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = next(c for c in bad_inputs() if c.expected_reason == "image_too_large")

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("a 20000x20000 image must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert validate_image(huge.data).reason == "image_too_large"


def test_limits_are_configurable() -> None:
    cell = render_cell(np.random.default_rng(0), parasitized=True, slide_id=1, size=(120, 100))
    buffer = io.BytesIO()
    cell.save(buffer, "PNG")
    assert validate_image(buffer.getvalue()).accepted
    assert validate_image(buffer.getvalue(), ImageLimits(max_side=110)).reason == "image_too_large"
    assert validate_image(buffer.getvalue(), ImageLimits(min_side=101)).reason == "image_too_small"
    assert validate_image(buffer.getvalue(), ImageLimits(max_bytes=10)).reason == "file_too_large"


def test_blank_and_multiframe_images_are_refused() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, "PNG")
    assert validate_image(buffer.getvalue()).reason == "blank_image"
    frames = [Image.new("RGB", (64, 64), (200, 100, 100)), Image.new("RGB", (64, 64), (90, 9, 9))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "TIFF", save_all=True, append_images=frames[1:])
    assert validate_image(buffer.getvalue()).reason == "multi_frame"
