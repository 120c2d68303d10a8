"""The due rule: which slides need scoring, from listings only (see malaria.scoring)."""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from malaria.io.store import ObjectInfo, Store
from malaria.scoring.leases import SlideLeases
from malaria.scoring.paths import SUMMARY_FILE, ScoringPaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    key: str
    etag: str
    size: int


def fingerprint(cells: Iterable[Cell]) -> str:
    """Names the set of (key, ETag): any added, removed or replaced object changes it."""
    digest = hashlib.sha256()
    for cell in sorted(cells, key=lambda c: c.key):
        digest.update(f"{cell.key}\t{cell.etag}\n".encode())
    return digest.hexdigest()[:32]


def _slide_of(paths: ScoringPaths, key: str) -> str | None:
    rest = key[len(paths.scans_prefix):]
    slide, sep, name = rest.partition("/")
    # Objects directly under scans/ belong to no slide; hidden folders are tool litter.
    if not sep or not name or slide.startswith("."):
        return None
    if not slide:  # scans//x: no slide name to key its CSV, marker or lease by
        log.warning("skipping %s: an empty slide folder name", key)
        return None
    return slide


def iter_slides(paths: ScoringPaths, store: Store | None = None
                ) -> Iterator[tuple[str, list[Cell]]]:
    """``(slide, cells)`` for every slide under the scans prefix, streaming the listing
    (key order keeps a slide's objects together), so only one slide's listing is held."""
    store = store or paths.scans_store()
    infos = ((slide, info) for info in store.list(paths.scans_prefix)
             if (slide := _slide_of(paths, info.key)) is not None)
    for slide, group in itertools.groupby(infos, key=lambda pair: pair[0]):
        if f"{slide}.csv" == SUMMARY_FILE:
            log.warning("slide folder %r is skipped: its CSV would overwrite %s", slide,
                        SUMMARY_FILE)
            continue
        yield slide, [Cell(info.key, info.etag, info.size) for _, info in group]


def marker_names(paths: ScoringPaths, store: Store, slide: str | None = None
                  ) -> dict[str, list[ObjectInfo]]:
    """slide -> its markers (``<fingerprint>@<version>.json``)."""
    base = f"{paths.state_prefix}done/"
    found: dict[str, list[ObjectInfo]] = {}
    for info in store.list(paths.marker_prefix(slide) if slide else base):
        rest = info.key[len(base):]
        name_slide, _, name = rest.partition("/")
        if "@" in name and name.endswith(".json") and "/" not in name:
            found.setdefault(name_slide, []).append(info)
    return found


def marker_id(info: ObjectInfo) -> tuple[str, str]:
    """(fingerprint, version) from a marker's key."""
    name = info.key.rsplit("/", 1)[-1].removesuffix(".json")
    fp, _, version = name.partition("@")
    return fp, version


def due_reason(has_csv: bool, markers: Sequence[ObjectInfo], fp: str,
               version: str) -> str | None:
    """Why a slide is due (``None``: it is not); the rule in malaria.scoring's docstring."""
    ids = {marker_id(m) for m in markers}
    if has_csv and (fp, version) in ids:
        return None
    if not has_csv:
        return "no predictions CSV"
    if fp in {f for f, _ in ids}:
        return f"scored by another model version than {version}"
    if {v for _, v in ids} == {version}:
        return "cells added, replaced or removed since it was scored"
    return "not scored by this model and these cells"


@dataclass(frozen=True)
class DueSlide:
    slide: str
    cells: int
    reason: str


def find_due_slides(paths: ScoringPaths, version: str) -> tuple[list[DueSlide], int]:
    """The due slides, and how many slides are up to date. Listings only."""
    out = paths.out_store()
    with_csv = set()
    for info in out.list(paths.predictions_prefix):
        rest = info.key[len(paths.predictions_prefix):]
        if "/" not in rest and rest.endswith(".csv") and rest != SUMMARY_FILE:
            with_csv.add(rest.removesuffix(".csv"))
    markers = marker_names(paths, out)
    due: list[DueSlide] = []
    finished: dict[str, str] = {}  # up-to-date slide -> "<fingerprint>@<version>"
    for slide, cells in iter_slides(paths):
        fp = fingerprint(cells)
        reason = due_reason(slide in with_csv, markers.get(slide, []), fp, version)
        if reason is None:
            finished[slide] = f"{fp}@{version}"
        else:
            due.append(DueSlide(slide, len(cells), reason))
    _clean_leftovers(paths, out, finished)
    return due, len(finished)


def _clean_leftovers(paths: ScoringPaths, out: Store, finished: dict[str, str]) -> None:
    """Delete what a run killed between a slide's marker and its clean-up left behind: the
    parts of exactly the finished scoring (never those of another version or cell set,
    which a concurrent run may still be writing) and leases of dead owners. After a clean
    run there is nothing here, and nothing is written."""
    parts_base = f"{paths.state_prefix}parts/"
    for info in list(out.list(parts_base)):
        slide, _, rest = info.key[len(parts_base):].partition("/")
        if slide in finished and rest.split("/", 1)[0] == finished[slide]:
            out.delete(info.key)
    leases_base = f"{paths.state_prefix}leases/"
    probe = SlideLeases(paths, ttl=0)
    for info in list(out.list(leases_base)):
        slide = info.key[len(leases_base):].removesuffix(".json")
        if slide in finished and not probe.is_live(probe.read(slide)):
            out.delete(info.key)
