"""Class synonyms, slide parsing and labels files."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from malaria.core.labels import (
    LabelEntry,
    LabelsFileError,
    canonical_class,
    class_from_key,
    merge_labels,
    parse_labels_csv,
    slide_from_name,
)
from malaria.core.layout import quarantine_key, safe_file_name


@pytest.mark.parametrize(("name", "expected"), [
    ("Parasitized", "Parasitized"), ("PARASITE", "Parasitized"), ("infected", "Parasitized"),
    ("Uninfected", "Uninfected"), ("healthy", "Uninfected"), ("Negative", "Uninfected"),
    ("cells", None), ("", None),
])
def test_class_synonyms(name: str, expected: str | None) -> None:
    assert canonical_class(name) == expected


def test_class_from_nearest_folder() -> None:
    assert class_from_key("batch1/parasitized/x.png") == "Parasitized"
    assert class_from_key("Uninfected/infected/x.png") == "Parasitized"  # nearest folder wins
    assert class_from_key("loose/x.png") is None
    assert class_from_key("Parasitized.png") is None


@pytest.mark.parametrize(("name", "slide"), [
    ("C100P61ThinF_IMG_20150918_144104_cell_162.png", "100"),
    ("C39P4thinF_original_IMG_20150622_105253_cell_94.png", "39"),
    ("C3thin_original_IMG_20150608_162922_cell_7.png", "3"),
    ("C47P8thinOriginalOlympusCX21_IMG_cell_1.png", "47"),
    ("c007P1_cell_1.png", "7"),
    ("cell_1.png", None),
    ("IMG_C100_cell.png", None),
])
def test_slide_from_name(name: str, slide: str | None) -> None:
    assert slide_from_name(name) == slide


@given(st.integers(min_value=0, max_value=10**6), st.text(max_size=20))
def test_slide_parse_round_trips(slide: int, rest: str) -> None:
    name = f"C{slide}P1ThinF{rest}"
    assert slide_from_name(name) == str(slide)


@given(st.text(min_size=1, max_size=300))
def test_safe_file_names_are_safe(name: str) -> None:
    safe = safe_file_name(name)
    assert safe and len(safe) <= 150
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in safe)
    assert ".." not in safe.split("/")


def test_quarantine_keys_do_not_collide() -> None:
    assert quarantine_key("corrupt_image", "incoming/a/x.png") != quarantine_key(
        "corrupt_image", "incoming/b/x.png")


def test_labels_csv() -> None:
    data = "\ufeffFile,Class,slide\nbatch/x.png,infected,12\nbatch/y.png,Healthy,\n,,\n".encode()
    labels = parse_labels_csv(data)
    assert labels == {"batch/x.png": LabelEntry("Parasitized", "12"),
                      "batch/y.png": LabelEntry("Uninfected", None)}


def test_labels_csv_errors() -> None:
    with pytest.raises(LabelsFileError, match="unknown label"):
        parse_labels_csv(b"key,label\na.png,maybe\n")
    with pytest.raises(LabelsFileError, match="column"):
        parse_labels_csv(b"name,what\na.png,x\n")
    with pytest.raises(LabelsFileError, match="UTF-8"):
        parse_labels_csv(b"\xff\xfe\x00bad")
    with pytest.raises(LabelsFileError, match="but"):
        merge_labels({"a.csv": {"k": LabelEntry("Parasitized", None)},
                      "b.csv": {"k": LabelEntry("Uninfected", None)}})
