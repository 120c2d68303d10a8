"""The due rule: which slides need scoring, from listings only (see malaria.scoring)."""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Collection, Iterable, Iterator, Sequence
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


FORCED = "forced: re-scored on request although up to date"


def check_slide_names(slides: Iterable[str]) -> list[str]:
    """Requested slide names, sorted and unique; ``ValueError`` for one that is not a
    single folder name (``a/b`` would list another slide's cells under this name)."""
    names = sorted(set(slides))
    for name in names:
        if not name or "/" in name or name.startswith(".") or name != name.strip():
            raise ValueError(f"not a slide folder name: {name!r}")
    return names


def iter_slides(paths: ScoringPaths, store: Store | None = None,
                slides: Collection[str] | None = None) -> Iterator[tuple[str, list[Cell]]]:
    """``(slide, cells)`` for every slide under the scans prefix (or only ``slides``, each
    listed on its own), streaming the listing (key order keeps a slide's objects
    together), so only one slide's listing is held."""
    store = store or paths.scans_store()
    listing = store.list(paths.scans_prefix) if slides is None else itertools.chain.from_iterable(
        store.list(paths.slide_prefix(slide)) for slide in check_slide_names(slides))
    infos = ((slide, info) for info in listing
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


def find_due_slides(paths: ScoringPaths, version: str, slides: Collection[str] | None = None,
                    force: bool = False) -> tuple[list[DueSlide], int]:
    """The due slides, and how many slides are up to date. Listings only.

    ``slides``: only these are considered (a requested slide with no scans is logged).
    ``force``: those slides are due even when up to date (a lab asks for a re-score); only
    with ``slides``, so a forced run never re-scores a whole bucket by accident."""
    if force and slides is None:
        raise ValueError("force re-scores named slides only: give the slides")
    out = paths.out_store()
    with_csv = set()
    for info in out.list(paths.predictions_prefix):
        rest = info.key[len(paths.predictions_prefix):]
        if "/" not in rest and rest.endswith(".csv") and rest != SUMMARY_FILE:
            with_csv.add(rest.removesuffix(".csv"))
    markers = marker_names(paths, out)
    due: list[DueSlide] = []
    finished: dict[str, str] = {}  # up-to-date slide -> "<fingerprint>@<version>"
    seen = set()
    for slide, cells in iter_slides(paths, slides=slides):
        seen.add(slide)
        fp = fingerprint(cells)
        reason = due_reason(slide in with_csv, markers.get(slide, []), fp, version)
        if reason is None and force:
            reason = FORCED
        if reason is None:
            finished[slide] = f"{fp}@{version}"
        else:
            due.append(DueSlide(slide, len(cells), reason))
    missing = sorted(set(slides or ()) - seen)
    if missing:
        log.warning("requested slides with no scans under %s: %s", paths.scans_prefix,
                    ", ".join(missing[:20]))
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
