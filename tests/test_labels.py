"""Class names and labels, slide parsing, labels files, and the bucket layout."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from malaria.core import layout
from malaria.core.labels import (
    CLASS_NAMES,
    CLASS_OF_LABEL,
    LABEL_OF_CLASS,
    PARASITIZED,
    UNINFECTED,
    LabelEntry,
    LabelsFileError,
    canonical_class,
    class_from_key,
    merge_labels,
    parse_labels_csv,
    predicted_class,
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


def test_class_names_and_labels_are_one_mapping() -> None:
    assert set(CLASS_NAMES) == {PARASITIZED, UNINFECTED} == set(LABEL_OF_CLASS)
    assert LABEL_OF_CLASS[PARASITIZED] == 1 and LABEL_OF_CLASS[UNINFECTED] == 0
    assert {label: name for name, label in LABEL_OF_CLASS.items()} == CLASS_OF_LABEL
    assert predicted_class(0.5, 0.5) == PARASITIZED  # the threshold itself is positive
    assert predicted_class(0.4999, 0.5) == UNINFECTED


def test_layout_keys() -> None:
    assert layout.PREDICTION_SUMMARY_KEY == "predictions/summary.csv"
    assert layout.prediction_key("12") == "predictions/12.csv"
    assert layout.dataset_key("Parasitized", "3", "a.png") == "dataset/Parasitized/3/a.png"
    assert layout.dataset_class_prefix("Uninfected") == "dataset/Uninfected/"
    assert layout.incoming_key("/Parasitized/a.png") == "incoming/Parasitized/a.png"
    assert layout.model_file_key("v1", "metrics.json") == "models/v1/metrics.json"
    assert layout.checkpoint_prefix("ab12") == "checkpoints/ab12/"
    assert layout.report_key("nightly-1", "x.gif") == "reports/nightly-1/x.gif"
    at = datetime(2026, 11, 27, 6, 15, 0, 123456, tzinfo=UTC)
    assert layout.alert_key(at, "5f0c-run") == "alerts/2026-11-27T061500-5f0c-run.json"
    paris = at.astimezone(timezone(timedelta(hours=1)))
    assert layout.alert_key(paris, "r") == layout.alert_key(at.replace(tzinfo=None), "r")
    assert layout.alert_key(at, "../../x").startswith("alerts/2026-11-27T061500-")
    assert "/" not in layout.alert_key(at, "../../x").removeprefix("alerts/")


ROOT = Path(__file__).resolve().parent.parent
PREFIXES = tuple(value for name, value in vars(layout).items()
                 if name.isupper() and isinstance(value, str) and value.endswith("/"))


def _key_literals(path: Path) -> list[str]:
    """String pieces (f-string parts too) that spell a bucket key by hand: they start with a
    layout prefix, or name the prediction summary, and hold no space (prose is fine)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                                | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings and " " not in node.value):
            text = node.value
            if text.startswith(PREFIXES) or text.endswith(layout.PREDICTION_SUMMARY_FILE):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text!r}")
    return found


def test_bucket_keys_are_built_by_the_layout_module() -> None:
    """Every key goes through malaria.core.layout (tests may spell keys: they check it)."""
    own = ROOT / "malaria" / "core" / "layout.py"
    found = [hit for folder in ("malaria", "tasks", "flows", "malaria_cli", "malaria_dev",
                                "deployments", "benchmarks")
             for path in sorted((ROOT / folder).rglob("*.py")) if path != own
             for hit in _key_literals(path)]
    assert not found, "keys spelled outside malaria/core/layout.py:\n" + "\n".join(found)
