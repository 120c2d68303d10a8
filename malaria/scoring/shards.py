"""Planning a due slide into shards, and scoring one shard into its part (one whole object
under a key fixed by its cells and the model, so a retry or a resumed run is safe)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from malaria.core.defaults import SCORE_BATCH_SIZE, SCORE_CONCURRENCY, SCORE_SHARD_SIZE
from malaria.core.images import DEFAULT_LIMITS, ImageLimits
from malaria.core.labels import PARASITIZED, predicted_class
from malaria.io.store import key_problem
from malaria.scoring.due import Cell, due_reason, fingerprint, marker_names
from malaria.scoring.infer import score_cells
from malaria.scoring.model import LoadedModel, ModelRef, load_model
from malaria.scoring.output import csv_text, read_prediction_rows, utc_now
from malaria.scoring.paths import ScoringPaths

log = logging.getLogger(__name__)

INVALID_KEY = "invalid_key"  # listed, but not a key any store may read (see check_key)


@dataclass(frozen=True)
class Shard:
    slide: str
    index: int
    count: int  # shards in the slide
    start: int  # cell range [start, end) in the slide's key order
    end: int
    fingerprint: str
    cells: tuple[Cell, ...]

    @property
    def name(self) -> str:
        return f"{self.slide}[{self.index + 1}/{self.count}]"


@dataclass(frozen=True)
class SlidePlan:
    slide: str
    fingerprint: str
    cells: int
    reason: str
    shards: tuple[Shard, ...]
    done: frozenset[int] = frozenset()  # shards whose part is already written (resume)

    @property
    def pending(self) -> list[Shard]:
        return [s for s in self.shards if s.index not in self.done]


def split_shards(slide: str, cells: Sequence[Cell], shard_size: int,
                 fp: str | None = None) -> tuple[Shard, ...]:
    """Near-equal shards of at most ``shard_size`` cells (2,001 cells -> 1,000 + 1,001,
    not 2,000 + 1), in key order."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    fp = fp or fingerprint(cells)
    n = len(cells)
    count = max(1, math.ceil(n / shard_size))
    bounds = [round(i * n / count) for i in range(count + 1)]
    return tuple(Shard(slide, i, count, bounds[i], bounds[i + 1], fp,
                       tuple(cells[bounds[i]:bounds[i + 1]])) for i in range(count))


def plan_slide(paths: ScoringPaths, version: str, slide: str,
               shard_size: int = SCORE_SHARD_SIZE) -> SlidePlan | None:
    """Shards for a due slide, listing it afresh (call it after taking the lease: a slide
    that another run finished meanwhile comes back ``None``)."""
    scans, out = paths.scans_store(), paths.out_store()
    cells = sorted((Cell(i.key, i.etag, i.size) for i in scans.list(paths.slide_prefix(slide))),
                   key=lambda c: c.key)
    if not cells:
        return None
    fp = fingerprint(cells)
    reason = due_reason(out.exists(paths.prediction_key(slide)),
                        marker_names(paths, out, slide).get(slide, []), fp, version)
    if reason is None:
        return None
    shards = split_shards(slide, cells, shard_size, fp)
    parts = {info.key for info in out.list(paths.parts_prefix(slide))}
    done = frozenset(s.index for s in shards if paths.part_key(s, version) in parts)
    return SlidePlan(slide, fp, len(cells), reason, shards, done)


# ------------------------------------------------------------------------ one shard


@dataclass(frozen=True)
class ShardResult:
    slide: str
    index: int
    count: int
    cells: int
    unreadable: int
    parasitized: int
    seconds: float
    resumed: bool = False  # its part existed: nothing was scored

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.seconds if self.seconds > 0 else 0.0

    @property
    def name(self) -> str:
        return f"{self.slide}[{self.index + 1}/{self.count}]"


def _rows(shard: Shard, scored: Sequence[tuple[float | None, str]], ref: ModelRef,
          scored_at: str) -> list[list[str]]:
    rows = []
    for cell, (probability, error) in zip(shard.cells, scored, strict=True):
        if probability is None:
            rows.append([cell.key, shard.slide, cell.key.rsplit("/", 1)[-1], "", "",
                         f"{ref.threshold:g}", ref.version, scored_at, error])
        else:
            label = predicted_class(probability, ref.threshold)
            rows.append([cell.key, shard.slide, cell.key.rsplit("/", 1)[-1],
                         f"{probability:.6f}", label, f"{ref.threshold:g}", ref.version,
                         scored_at, ""])
    return rows


def _score_valid_keys(paths: ScoringPaths, shard: Shard, model: LoadedModel, **options: Any
                      ) -> list[tuple[float | None, str]]:
    """``score_cells`` over the shard, except that a listed key no store may read (an empty,
    ``.`` or ``..`` segment: a hostile or mangled bucket) is an error row, not a failed
    shard that would fail again on every run."""
    problems = [key_problem(cell.key) for cell in shard.cells]
    valid = [cell for cell, problem in zip(shard.cells, problems, strict=True) if not problem]
    if len(valid) < len(shard.cells):
        log.warning("%s: %d listed keys are not valid object keys; scored as %s",
                    shard.name, len(shard.cells) - len(valid), INVALID_KEY)
    scored = iter(score_cells(paths.scans_store(), valid, model, **options) if valid else [])
    return [(None, INVALID_KEY) if problem else next(scored) for problem in problems]


def score_shard(paths: ScoringPaths, ref: ModelRef, shard: Shard, *,
                batch_size: int = SCORE_BATCH_SIZE, concurrency: int = SCORE_CONCURRENCY,
                limits: ImageLimits = DEFAULT_LIMITS) -> ShardResult:
    """Score one shard and write its part (one whole object). A shard whose part exists
    is not scored again (resume after a crash, or a task retry)."""
    out = paths.out_store()
    key = paths.part_key(shard, ref.version)
    start = time.perf_counter()
    if out.exists(key):
        rows = read_prediction_rows(out.get_bytes(key).decode())
        return ShardResult(shard.slide, shard.index, shard.count, len(rows),
                           sum(1 for r in rows if r["error"]),
                           sum(1 for r in rows if r["predicted_class"] == PARASITIZED),
                           time.perf_counter() - start, resumed=True)
    model = load_model(ref)
    scored = _score_valid_keys(paths, shard, model, batch_size=batch_size,
                               concurrency=concurrency, limits=limits, tta=ref.tta)
    rows = _rows(shard, scored, ref, utc_now())
    unreadable = sum(1 for p, _ in scored if p is None)
    parasitized = sum(1 for r in rows if r[4] == PARASITIZED)
    out.put_bytes(key, csv_text(rows).encode(), content_type="text/csv")
    return ShardResult(shard.slide, shard.index, shard.count, len(rows), unreadable,
                       parasitized, time.perf_counter() - start)
