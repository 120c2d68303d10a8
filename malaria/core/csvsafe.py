"""The one rule for text cells in every CSV the product writes for people (prediction CSVs,
``summary.csv``, manifests and the ingest ledger): a spreadsheet must never read a cell as a
formula.

A text cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (after
any number of single quotes) is written with one more single quote in front (OWASP's advice
against CSV injection): a spreadsheet shows it as text (``'=1+2`` shows ``=1+2``), and
:func:`unescape_cell` gives the original back exactly, so the product's own round trips
(finalize comparing keys, the summary check, the ingest ledger) see the values it wrote.
Quotes in front count too, so that a value already starting with ``'=`` survives the round
trip: escaping is a bijection. Numbers (``int``/``float``) are written as they are: a number
is never a formula.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NEEDS_QUOTE = re.compile(r"'*[=+\-@\t\r]")
_QUOTED = re.compile(r"'+[=+\-@\t\r]")


def escape_cell(value: Any) -> Any:
    """``value`` as a CSV cell a spreadsheet will not evaluate (non-text values unchanged)."""
    if isinstance(value, str) and _NEEDS_QUOTE.match(value):
        return "'" + value
    return value


def unescape_cell(value: str) -> str:
    """The value :func:`escape_cell` was given."""
    return value[1:] if _QUOTED.match(value) else value


def escape_row(row: Iterable[Any]) -> list[Any]:
    return [escape_cell(value) for value in row]


def escape_record(record: Mapping[str, Any]) -> dict[str, Any]:
    return {name: escape_cell(value) for name, value in record.items()}


def unescape_record(record: Mapping[Any, Any]) -> dict[Any, Any]:
    """A ``csv.DictReader`` row as written: its text cells unescaped (a short row's missing
    cells, ``None``, become empty strings; a long row's extra cells are left as read)."""
    return {name: unescape_cell(value) if isinstance(value, str) else
            ("" if value is None else value) for name, value in record.items()}


def is_formula_safe(cell: str) -> bool:
    """True when a spreadsheet would not read ``cell`` (as written in a CSV) as a formula."""
    return not cell.startswith(FORMULA_STARTS)
