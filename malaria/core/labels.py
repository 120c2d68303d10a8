"""Class names (declared here once), the model's label for each, their synonyms, and slide
ids parsed from cell file names."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass

PARASITIZED = "Parasitized"
UNINFECTED = "Uninfected"
CLASS_NAMES: tuple[str, str] = (PARASITIZED, UNINFECTED)  # in folder (alphabetical) order
UNKNOWN_SLIDE = "unknown"

# The model's label for each class: Parasitized is the positive class (1), as every metric,
# threshold and probability in the product counts it.
LABEL_OF_CLASS: dict[str, int] = {UNINFECTED: 0, PARASITIZED: 1}
CLASS_OF_LABEL: dict[int, str] = {label: name for name, label in LABEL_OF_CLASS.items()}

_SYNONYMS: dict[str, str] = {
    "parasitized": PARASITIZED,
    "parasitised": PARASITIZED,
    "parasite": PARASITIZED,
    "parasites": PARASITIZED,
    "infected": PARASITIZED,
    "positive": PARASITIZED,
    "uninfected": UNINFECTED,
    "healthy": UNINFECTED,
    "negative": UNINFECTED,
    "normal": UNINFECTED,
}

# The slide is the number after the leading "C": prefixes vary ("C39P4thinF_", "C3thin_",
# "C47P8thinOriginal..."), so parse the number instead of splitting on a word.
_SLIDE = re.compile(r"^C(\d+)(?!\d)", re.IGNORECASE)


def canonical_class(name: str) -> str | None:
    """``Parasitized`` / ``Uninfected`` for any usual spelling, in any case; else None."""
    return _SYNONYMS.get(name.strip().lower())


def predicted_class(probability: float, threshold: float) -> str:
    """The class a probability of Parasitized means at ``threshold`` (>= is Parasitized)."""
    return PARASITIZED if probability >= threshold else UNINFECTED


def class_from_key(key: str) -> str | None:
    """The class named by the nearest folder of ``key`` that is a class synonym."""
    folders = key.split("/")[:-1]
    for folder in reversed(folders):
        found = canonical_class(folder)
        if found:
            return found
    return None


def slide_from_name(file_name: str) -> str | None:
    """``C100P61ThinF_IMG_..._cell_162.png`` -> ``"100"``; None when the name has no slide."""
    match = _SLIDE.match(file_name)
    return str(int(match.group(1))) if match else None


@dataclass(frozen=True)
class LabelEntry:
    label: str
    slide: str | None


class LabelsFileError(ValueError):
    """A labels CSV that cannot be used as a whole."""


def parse_labels_csv(data: bytes, *, source: str = "labels.csv") -> dict[str, LabelEntry]:
    """Read a labels CSV: columns ``key`` (or ``file``/``filename``/``path``), ``label`` (or
    ``class``), optional ``slide``. Keys are relative to ``incoming/``. Unknown labels are
    an error for the whole file: a half-applied labels file would be worse than none."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise LabelsFileError(f"{source}: not UTF-8 text") from error
    reader = csv.DictReader(io.StringIO(text))
    fields = {name.strip().lower(): name for name in (reader.fieldnames or [])}
    key_col = next((fields[c] for c in ("key", "file", "filename", "path") if c in fields), None)
    label_col = next((fields[c] for c in ("label", "class") if c in fields), None)
    slide_col = fields.get("slide")
    if key_col is None or label_col is None:
        raise LabelsFileError(f"{source}: needs a 'key' (or 'file') column and a 'label' column")
    entries: dict[str, LabelEntry] = {}
    for line_number, row in enumerate(reader, start=2):
        key = (row.get(key_col) or "").strip().lstrip("/")
        label = canonical_class(row.get(label_col) or "")
        if not key:
            continue
        if label is None:
            raise LabelsFileError(f"{source}:{line_number}: unknown label {row.get(label_col)!r}")
        slide = (row.get(slide_col) or "").strip() if slide_col else ""
        entries[key] = LabelEntry(label=label, slide=slide or None)
    return entries


def merge_labels(tables: Mapping[str, Mapping[str, LabelEntry]]) -> dict[str, LabelEntry]:
    """Merge labels files; a key labelled differently by two files is an error."""
    merged: dict[str, LabelEntry] = {}
    origin: dict[str, str] = {}
    for source, table in sorted(tables.items()):
        for key, entry in table.items():
            if key in merged and merged[key].label != entry.label:
                raise LabelsFileError(
                    f"{key!r} is {merged[key].label} in {origin[key]} but {entry.label} in {source}"
                )
            merged[key] = entry
            origin[key] = source
    return merged
