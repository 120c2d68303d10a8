"""Bulk scoring of slide scans: ``scans/<slide>/<file>`` in, ``predictions/<slide>.csv`` out.

No Prefect here: the flow (flows/score.py), the one-off command (:func:`score`) and the
tests drive the same functions.

When is a slide due?
    A slide (a folder under ``scans/``) is due when any of these holds:

    1. ``predictions/<slide>.csv`` is missing;
    2. there is no scoring marker for the slide made by the serving model version (a new
       champion makes every slide due again);
    3. the set of (key, ETag) of the objects under ``scans/<slide>/`` differs from the set the
       last scoring covered (a re-scan added, replaced or removed cells).

    The marker is ``state/scoring/done/<slide>/<fingerprint>@<version>.json``, written after
    the slide's CSV (pointer last). ``fingerprint`` is a SHA-256 of the sorted
    ``key<TAB>etag`` lines of the slide's objects, and it is in the marker's NAME, so finding
    the due slides costs listings only (scans/, predictions/, the markers), never a GET per
    slide. A due slide is re-scored whole: its CSV is one consistent scoring by one model.

Exactly once
    A due slide is cut into shards (a slide per shard; a slide of more than ``shard_size``
    cells into near-equal shards). Each shard writes its rows as one whole object,
    ``state/scoring/parts/<slide>/<fingerprint>@<version>/<start>-<end>.csv``; when every shard
    of the slide has its part, the parts are concatenated in key order into
    ``predictions/<slide>.csv`` (one whole PUT), then the marker is written and the parts are
    deleted. Every key is a function of (slide, cells, model, cell range), so:

    - a run killed at any point leaves only whole objects; the next run finds the slide still
      due (no marker), skips the shards whose parts exist and scores the rest: every cell ends
      up in the CSV exactly once (checked before the CSV is written);
    - a run with nothing due writes nothing (not even a lease);
    - two runs that did score the same slide would write the same keys with the same rows,
      never a duplicated row; the lease below only saves the wasted work.

Two runs at once: a lease object in the bucket
    ``state/scoring/leases/<slide>.json`` (owner token, host, pid, expiry). Chosen over a
    Prefect concurrency limit because it also guards the one-off command and Dask workers,
    works without a Prefect server and is testable against any store. S3 offers no portable
    compare-and-swap (conditional PUTs are not on every S3-compatible server), so a claim is
    read - write - wait ``settle`` seconds - read back: the last writer wins and everyone
    else backs off; that is safe whenever each claimant's read-to-write gap is shorter than
    ``settle`` (milliseconds against a default of a second). The settle is not idle time:
    the first shards are fetched and scored meanwhile, and a shard's part is written only
    once its slide's claim is confirmed (a slide lost to a rival gets nothing written).
    After claiming, the slide is planned again, so a slide finished by another run
    meanwhile is not scored twice. A
    background thread renews held leases every ``ttl/3``; a lease whose expiry passed, or
    whose owner process on this host is gone (SIGKILL), is stale and may be taken over.

Per-slide summary: ``predictions/summary.csv``
    One row per scored slide (cells_scored, parasitized, parasitemia_pct, unreadable,
    mean_probability, model_version, scored_at, scan_fingerprint), rebuilt whole from the
    per-slide markers (each marker holds its slide's summary) whenever the set of
    (slide, fingerprint, version) it shows differs from the markers. One file is what a lab
    wants to open; rebuilding from the markers instead of editing the old file means two
    runs finishing together cannot lose each other's rows for good: the next run that sees a
    stale summary rewrites it. ``parasitemia_pct`` = 100 x parasitized / cells_scored
    (unreadable cells are not in the denominator: nothing is known about them).

Speed and memory
    Per shard, a pool of threads fetches objects and decodes them (one full decode that both
    validates and resizes, the same preprocessing as training), at most two batches ahead of
    the inference, which runs in large batches in the calling thread: a bounded
    producer/consumer pipeline, so memory holds two batches of images whatever the size of
    the run. On S3 a fetch thread sends ``DEFAULT_PIPELINE`` (64) of ``malaria.io.s3get``'s
    signed GETs at once, pipelined on its kept-alive socket, and reads the answers back to
    back: a tenth of boto3's client CPU per object, and the server wakes once per batch of
    requests rather than per object (+30% end to end where it shares the cores;
    ``MALARIA_GET_PIPELINE=1`` sends one at a time, for a server that mishandles
    pipelining). The model is loaded once per process and kept in a module-level cache
    keyed by (registry, version). Inference is a ``tf.function`` around the Keras model
    (``malaria.model.trainer.predict_probabilities``), at the operating point the model was
    evaluated at (its threshold, and its test-time augmentation if it was evaluated with
    it); ONNX Runtime and XLA were measured against it and were slower here (see
    benchmarks/README.md).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import logging
import math
import os
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from malaria.core import layout
from malaria.core.images import DEFAULT_LIMITS, ImageLimits, check_size, validate_open_image
from malaria.core.labels import PARASITIZED, UNINFECTED
from malaria.dataset.records import model_input
from malaria.io.processes import pid_alive
from malaria.io.store import (
    ObjectInfo,
    ObjectNotFound,
    Store,
    get_csv,
    get_json,
    open_store,
    put_csv,
    put_json,
)
from malaria.registry.registry import ModelRegistry, sha256_file

log = logging.getLogger(__name__)

PREDICTION_COLUMNS: tuple[str, ...] = (
    "key", "slide", "cell_file", "probability", "predicted_class", "threshold",
    "model_version", "scored_at", "error",
)
SUMMARY_COLUMNS: tuple[str, ...] = (
    "slide", "cells_scored", "parasitized", "parasitemia_pct", "unreadable",
    "mean_probability", "model_version", "scored_at", "scan_fingerprint",
)
SUMMARY_FILE = "summary.csv"

DEFAULT_SHARD_SIZE = 2000
DEFAULT_BATCH_SIZE = 256
DEFAULT_CONCURRENCY = 16
DEFAULT_PARALLEL_SHARDS = 2
# GETs sent together on one connection (HTTP/1.1 pipelining) by a fetch thread.
DEFAULT_PIPELINE = int(os.environ.get("MALARIA_GET_PIPELINE", "64"))
DEFAULT_LEASE_TTL = 900.0
DEFAULT_LEASE_SETTLE = 1.0
DEFAULT_THRESHOLD = 0.5
MISSING_OBJECT = "missing_object"  # listed, then deleted before it was fetched
DECODE_ERROR = "decode_error"  # a decoder raised something unexpected

_HEADER = ",".join(PREDICTION_COLUMNS) + "\r\n"  # what csv.writer writes for the header


class ScoringError(RuntimeError):
    """Scoring cannot proceed; the message says why."""


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------- where


@dataclass(frozen=True)
class ScoringPaths:
    """Where scans are read and predictions and bookkeeping written.

    URLs rather than open stores, so the value pickles to Dask workers, which open their
    own clients.
    """

    scans_url: str
    out_url: str
    scans_prefix: str = layout.SCANS
    predictions_prefix: str = layout.PREDICTIONS
    state_prefix: str = layout.SCORING_STATE
    registry_url: str | None = None  # where models/ and champion.json are

    @classmethod
    def bucket(cls, data_url: str) -> ScoringPaths:
        """The system of record's layout: scans/, predictions/, state/scoring/, models/."""
        return cls(data_url, data_url, registry_url=data_url)

    @classmethod
    def folders(cls, scans: str | Path, out: str | Path,
                registry_url: str | None = None) -> ScoringPaths:
        """``scans`` holds ``<slide>/<file>``; ``out`` receives ``<slide>.csv``,
        ``summary.csv`` and the bookkeeping in ``out/_scoring/``.

        When ``scans`` and ``out`` are the ``scans`` and ``predictions`` folders of one
        bucket or folder, the bucket layout is used, so the command and the flow share
        their bookkeeping.
        """
        scans_url, out_url = str(scans).rstrip("/"), str(out).rstrip("/")
        scans_parent, _, scans_name = scans_url.rpartition("/")
        out_parent, _, out_name = out_url.rpartition("/")
        if (scans_parent and scans_parent == out_parent and f"{scans_name}/" == layout.SCANS
                and f"{out_name}/" == layout.PREDICTIONS and not scans_parent.endswith(":/")):
            return cls(scans_parent, scans_parent, registry_url=registry_url or scans_parent)
        return cls(scans_url, out_url, "", "", "_scoring/", registry_url)

    def scans_store(self) -> Store:
        return open_store(self.scans_url)

    def out_store(self) -> Store:
        return open_store(self.out_url)

    def slide_prefix(self, slide: str) -> str:
        return f"{self.scans_prefix}{slide}/"

    def prediction_key(self, slide: str) -> str:
        return f"{self.predictions_prefix}{slide}.csv"

    @property
    def summary_key(self) -> str:
        return f"{self.predictions_prefix}{SUMMARY_FILE}"

    def marker_prefix(self, slide: str) -> str:
        return layout.scoring_marker_prefix(slide, self.state_prefix)

    def marker_key(self, slide: str, fingerprint: str, version: str) -> str:
        return layout.scoring_marker_key(slide, fingerprint, version, self.state_prefix)

    def parts_prefix(self, slide: str) -> str:
        return layout.scoring_parts_prefix(slide, self.state_prefix)

    def part_key(self, shard: Shard, version: str) -> str:
        return layout.scoring_part_key(shard.slide, shard.fingerprint, version, shard.start,
                                       shard.end, self.state_prefix)

    def lease_key(self, slide: str) -> str:
        return layout.scoring_lease_key(slide, self.state_prefix)


# ------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelRef:
    """Which model scores, and where a worker finds it (a small, picklable value)."""

    version: str
    threshold: float
    source: str  # "registry" | "file"
    location: str  # the registry's store URL, or a model file path
    architecture: str = ""
    tta: int = 1  # views averaged per cell (test-time augmentation), 1 = none


def _views(value: Any) -> int:
    if value is True:
        return 8
    if value is None or value is False:
        return 1
    return max(1, min(8, int(value)))


def resolve_model(paths: ScoringPaths, model_path: str | Path | None = None,
                  threshold: float | None = None, tta: bool | int | None = None) -> ModelRef:
    """The serving champion of ``paths.registry_url``, or a model file.

    Predictions use the operating point the model was evaluated at: the threshold and the
    test-time augmentation (``tta``: views averaged per cell; 8 costs 8x the inference)
    recorded in its metrics.json, or in the card beside a model file (``<file>.json``,
    written by ``malaria train``); 0.5 and none without a card. ``threshold`` and ``tta``
    override them. A file's version is ``file-<first 12 hex of its SHA-256>``, so scoring
    with another file makes every slide due again, as a new champion does.
    """
    if model_path is not None:
        from malaria.model.run import load_model_card

        path = Path(model_path).resolve()
        if not path.is_file():
            raise ScoringError(f"model file {path} does not exist")
        card = load_model_card(path)
        return ModelRef(
            version=f"file-{sha256_file(path)[:12]}",
            threshold=float(card.get("threshold", DEFAULT_THRESHOLD) if threshold is None
                            else threshold),
            source="file", location=str(path), architecture=str(card.get("architecture", "")),
            tta=_views(card.get("tta") if tta is None else tta))
    if not paths.registry_url:
        raise ScoringError("no model: give a model file or a registry URL")
    registry = ModelRegistry(open_store(paths.registry_url))
    version = registry.champion_version()
    if version is None:
        raise ScoringError(f"no champion model in {paths.registry_url} "
                           "(train and promote one, or give a model file)")
    record = registry.get(version)
    recorded = float(record.get("threshold", DEFAULT_THRESHOLD))
    return ModelRef(version=version, threshold=recorded if threshold is None else threshold,
                    source="registry", location=paths.registry_url,
                    architecture=str(record.get("architecture", "")),
                    tta=_views(record.get("tta") if tta is None else tta))


@dataclass
class LoadedModel:
    """A model ready to score: ``predict(uint8 NHWC batch, views) -> P(parasitized)``."""

    version: str
    input_size: int
    backend: str
    predict: Callable[[np.ndarray, int], np.ndarray]


# Keyed by (where, version): two registries may both have a "v1".
_MODEL_CACHE: dict[tuple[str, str], LoadedModel] = {}
_MODEL_LOCK = threading.Lock()
_MODEL_CACHE_SIZE = 2  # the champion, and the one it replaced while a run drains


def _model_file(ref: ModelRef) -> Path:
    if ref.source == "file":
        return Path(ref.location)
    # Per-version folder: the download is checked against the recorded SHA-256 and renamed
    # into place, so concurrent workers on one host never load a partial file.
    where = hashlib.sha256(ref.location.encode()).hexdigest()[:8]
    folder = Path(tempfile.gettempdir()) / "malaria-models" / where / ref.version
    folder.mkdir(parents=True, exist_ok=True)
    return ModelRegistry(open_store(ref.location)).download_model(ref.version, folder)


def load_model(ref: ModelRef) -> LoadedModel:
    """The model of ``ref.version``, loaded once per process (every later shard of the same
    version in this process, thread or Dask task, reuses it)."""
    with _MODEL_LOCK:
        cache_key = (ref.location, ref.version)
        cached = _MODEL_CACHE.get(cache_key)
        if cached is not None:
            return cached
        import keras

        from malaria.model.architectures import input_size_of
        from malaria.model.trainer import predict_probabilities

        model = keras.models.load_model(_model_file(ref), compile=False)
        size = input_size_of(model)

        def predict(images: np.ndarray, views: int = 1) -> np.ndarray:
            return predict_probabilities(model, images, batch_size=max(1, len(images)),
                                         tta=views)

        loaded = LoadedModel(ref.version, size, "tf.function", predict)
        predict(np.zeros((1, size, size, 3), np.uint8))  # trace now, not in the first batch
        while len(_MODEL_CACHE) >= _MODEL_CACHE_SIZE:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
        _MODEL_CACHE[cache_key] = loaded
        return loaded


def clear_model_cache() -> None:
    with _MODEL_LOCK:
        _MODEL_CACHE.clear()


# ------------------------------------------------------------------------------ decode


def prepare_cell(data: bytes, size: int,
                 limits: ImageLimits = DEFAULT_LIMITS) -> tuple[np.ndarray | None, str]:
    """Validate and preprocess one cell with a single decode: ``(array, "")`` or
    ``(None, reason)`` with the validator's reason code (``corrupt_image``, ``grayscale``...).

    Never raises for bad bytes: an unreadable cell is a row with an error, not a crash.
    """
    early = check_size(len(data), limits)
    if early is not None:
        return None, str(early.reason)
    try:
        with warnings.catch_warnings():
            # Pillow's decompression-bomb guard warns before it errors; both are refusals.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                return None, "image_too_large"
            except UnidentifiedImageError:
                return None, "not_an_image"
            except (OSError, ValueError, SyntaxError):
                return None, "corrupt_image"
            with image:
                verdict = validate_open_image(image, limits)
                if not verdict.accepted:
                    return None, str(verdict.reason)
                return model_input(image, size), ""
    except Exception:  # a decoder bug on hostile bytes must not stop a slide
        log.warning("unexpected decoder error", exc_info=True)
        return None, DECODE_ERROR


# ------------------------------------------------------------------------- due slides


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


def _marker_names(paths: ScoringPaths, store: Store, slide: str | None = None
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


def _marker_id(info: ObjectInfo) -> tuple[str, str]:
    """(fingerprint, version) from a marker's key."""
    name = info.key.rsplit("/", 1)[-1].removesuffix(".json")
    fp, _, version = name.partition("@")
    return fp, version


def due_reason(has_csv: bool, markers: Sequence[ObjectInfo], fp: str,
               version: str) -> str | None:
    """Why a slide is due (``None``: it is not); the rule of the module docstring."""
    ids = {_marker_id(m) for m in markers}
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
    markers = _marker_names(paths, out)
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


# ------------------------------------------------------------------------------ leases


@dataclass(frozen=True)
class LeaseOwner:
    token: str
    host: str
    pid: int
    label: str = ""

    @classmethod
    def current(cls, label: str = "") -> LeaseOwner:
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), label)


class SlideLeases:
    """Leases on slides in the bucket (see the module docstring): ``acquire`` claims what it
    can, a heartbeat thread renews, ``release``/leaving the ``with`` block deletes ours.

    The leases must be held by a process that lives as long as the run (the flow's or the
    command's), not by a task that may run on another worker.
    """

    def __init__(self, paths: ScoringPaths, *, ttl: float = DEFAULT_LEASE_TTL,
                 settle: float = DEFAULT_LEASE_SETTLE, owner: LeaseOwner | None = None,
                 concurrency: int = 16) -> None:
        self.paths = paths
        self.store = paths.out_store()
        self.ttl = float(ttl)
        self.settle = float(settle)
        self.owner = owner or LeaseOwner.current()
        self.concurrency = concurrency
        self.held: set[str] = set()
        self.lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._claimed_at = 0.0

    # -- reading

    def read(self, slide: str) -> dict[str, Any] | None:
        try:
            lease = get_json(self.store, self.paths.lease_key(slide))
        except ObjectNotFound:
            return None
        except ValueError:  # unparsable: treated as stale
            return {}
        return lease if isinstance(lease, dict) else {}

    def is_live(self, lease: dict[str, Any] | None, now: float | None = None) -> bool:
        """Held by someone: not expired, and its owner process (when on this host) alive."""
        if not lease:
            return False
        now = time.time() if now is None else now
        try:
            if float(lease["expires_at"]) <= now:
                return False
            host, pid = str(lease.get("host", "")), int(lease.get("pid", 0))
        except (KeyError, TypeError, ValueError):
            return False
        return not (host == self.owner.host and pid > 0 and not pid_alive(pid))

    # -- writing

    def _payload(self) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.owner.token, "host": self.owner.host, "pid": self.owner.pid,
                "label": self.owner.label, "renewed_at": now, "expires_at": now + self.ttl,
                "expires": datetime.fromtimestamp(now + self.ttl, UTC).isoformat()}

    def _claim(self, slide: str) -> bool:
        current = self.read(slide)
        if current and current.get("owner") != self.owner.token and self.is_live(current):
            return False
        put_json(self.store, self.paths.lease_key(slide), self._payload())
        return True

    def claim(self, slides: Iterable[str]) -> list[str]:
        """First half of ``acquire``: write our claim on each slide that has no live lease of
        another owner; returns the claimed slides. Work on them may start now, but nothing
        may be written for a slide until ``confirm`` grants it."""
        slides = list(dict.fromkeys(slides))
        if not slides:
            return []
        with ThreadPoolExecutor(self.concurrency) as pool:
            # Read and write per slide in one thread: the read-to-write gap stays short.
            oks = list(pool.map(self._claim, slides))
        self._claimed_at = time.monotonic()
        return [s for s, ok in zip(slides, oks, strict=True) if ok]

    def confirm(self, claimed: Sequence[str]) -> list[str]:
        """Second half: ``settle`` seconds after the claims (a rival's write, if any, has
        landed), keep the slides whose lease is still ours; they are held from now on."""
        if not claimed:
            return []
        time.sleep(max(0.0, self._claimed_at + self.settle - time.monotonic()))
        with ThreadPoolExecutor(self.concurrency) as pool:
            leases = list(pool.map(self.read, claimed))
        granted = [s for s, lease in zip(claimed, leases, strict=True)
                   if lease and lease.get("owner") == self.owner.token]
        with self._lock:
            self.held.update(granted)
        return granted

    def acquire(self, slides: Iterable[str]) -> list[str]:
        """Claim ``slides``; return those this owner now holds (in the given order)."""
        return self.confirm(self.claim(slides))

    def renew(self) -> list[str]:
        """Push the expiry of every held lease; return the slides lost to another owner."""
        lost = []
        with self._lock:
            held = sorted(self.held)
        for slide in held:
            lease = self.read(slide)
            if lease and lease.get("owner") == self.owner.token:
                put_json(self.store, self.paths.lease_key(slide), self._payload())
            else:
                lost.append(slide)
        if lost:
            log.warning("lost the lease on slides %s (expired and taken over)", lost)
            with self._lock:
                self.held.difference_update(lost)
                self.lost.update(lost)
        return lost

    def release(self, slide: str) -> None:
        with self._lock:
            if slide not in self.held:
                return
            self.held.discard(slide)
        lease = self.read(slide)
        if lease and lease.get("owner") == self.owner.token:
            self.store.delete(self.paths.lease_key(slide))

    def release_all(self) -> None:
        for slide in sorted(self.held):
            self.release(slide)

    # -- heartbeat

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except Exception:  # a failed renewal is retried at the next beat
                log.warning("lease renewal failed", exc_info=True)

    def __enter__(self) -> SlideLeases:
        self._thread = threading.Thread(target=self._beat, name="scoring-leases", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.release_all()


# ------------------------------------------------------------------------------ shards


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
               shard_size: int = DEFAULT_SHARD_SIZE) -> SlidePlan | None:
    """Shards for a due slide, listing it afresh (call it after taking the lease: a slide
    that another run finished meanwhile comes back ``None``)."""
    scans, out = paths.scans_store(), paths.out_store()
    cells = sorted((Cell(i.key, i.etag, i.size) for i in scans.list(paths.slide_prefix(slide))),
                   key=lambda c: c.key)
    if not cells:
        return None
    fp = fingerprint(cells)
    reason = due_reason(out.exists(paths.prediction_key(slide)),
                        _marker_names(paths, out, slide).get(slide, []), fp, version)
    if reason is None:
        return None
    shards = split_shards(slide, cells, shard_size, fp)
    parts = {info.key for info in out.list(paths.parts_prefix(slide))}
    done = frozenset(s.index for s in shards if paths.part_key(s, version) in parts)
    return SlidePlan(slide, fp, len(cells), reason, shards, done)


# ------------------------------------------------------------------------ shard scorer


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
    discarded: bool = False  # scored, but the slide's lease went to another run: not written

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.seconds if self.seconds > 0 else 0.0

    @property
    def name(self) -> str:
        return f"{self.slide}[{self.index + 1}/{self.count}]"


def _fetch_prepare(store: Store, cells: Sequence[Cell], size: int,
                   limits: ImageLimits) -> list[tuple[np.ndarray | None, str]]:
    """A few cells fetched in one pipelined round trip (``Store.get_many``), then decoded.
    An empty or huge object is known from the listing and not fetched."""
    refusals = [check_size(cell.size, limits) for cell in cells]
    fetched = iter(store.get_many([cell.key for cell, refused in zip(cells, refusals, strict=True)
                                   if refused is None]))
    results: list[tuple[np.ndarray | None, str]] = []
    for refused in refusals:
        if refused is not None:
            results.append((None, str(refused.reason)))
            continue
        data = next(fetched)
        results.append((None, MISSING_OBJECT) if isinstance(data, ObjectNotFound)
                       else prepare_cell(data, size, limits))
    return results


def score_cells(store: Store, cells: Sequence[Cell], model: LoadedModel, *,
                batch_size: int = DEFAULT_BATCH_SIZE, concurrency: int = DEFAULT_CONCURRENCY,
                limits: ImageLimits = DEFAULT_LIMITS, tta: int = 1,
                pipeline: int = DEFAULT_PIPELINE) -> list[tuple[float | None, str]]:
    """``(probability, "")`` or ``(None, error)`` per cell, in order.

    Producer/consumer: ``concurrency`` threads fetch and decode at most two batches ahead
    (the bounded queue: a deque of futures, one per ``pipeline`` cells fetched in one
    pipelined round trip), while this thread fills a preallocated batch and runs the model
    on it. Pillow and TensorFlow release the GIL, so fetching, decoding and inference
    overlap.
    """
    results: list[tuple[float | None, str]] = [(None, "")] * len(cells)
    size = model.input_size
    batch = np.empty((batch_size, size, size, 3), np.uint8)
    members: list[int] = []

    def flush() -> None:
        probabilities = model.predict(batch[:len(members)], tta)
        for index, probability in zip(members, probabilities, strict=True):
            results[index] = (float(probability), "")
        members.clear()

    ahead = 2 * batch_size // pipeline + 1  # chunks in flight: two batches' worth
    window: deque[tuple[int, Future[list[tuple[np.ndarray | None, str]]]]] = deque()
    chunks = ((start, cells[start:start + pipeline]) for start in range(0, len(cells), pipeline))
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="score-fetch")
    try:
        def top_up() -> None:
            for start, chunk in itertools.islice(chunks, ahead - len(window)):
                window.append((start, pool.submit(_fetch_prepare, store, chunk, size, limits)))

        top_up()
        while window:
            start, future = window.popleft()
            prepared = future.result()
            top_up()
            for index, (array, error) in enumerate(prepared, start):
                if array is None:
                    results[index] = (None, error)
                    continue
                batch[len(members)] = array
                members.append(index)
                if len(members) == batch_size:
                    flush()
        if members:
            flush()
    finally:
        for _, future in window:
            future.cancel()
        pool.shutdown(wait=True)
    return results


def _rows(shard: Shard, scored: Sequence[tuple[float | None, str]], ref: ModelRef,
          scored_at: str) -> list[list[str]]:
    rows = []
    for cell, (probability, error) in zip(shard.cells, scored, strict=True):
        if probability is None:
            rows.append([cell.key, shard.slide, cell.key.rsplit("/", 1)[-1], "", "",
                         f"{ref.threshold:g}", ref.version, scored_at, error])
        else:
            label = PARASITIZED if probability >= ref.threshold else UNINFECTED
            rows.append([cell.key, shard.slide, cell.key.rsplit("/", 1)[-1],
                         f"{probability:.6f}", label, f"{ref.threshold:g}", ref.version,
                         scored_at, ""])
    return rows


def _csv_text(rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # "\r\n" line ends, RFC 4180; pandas reads it as is
    writer.writerow(PREDICTION_COLUMNS)
    writer.writerows(rows)
    return buffer.getvalue()


def score_shard(paths: ScoringPaths, ref: ModelRef, shard: Shard, *,
                batch_size: int = DEFAULT_BATCH_SIZE, concurrency: int = DEFAULT_CONCURRENCY,
                limits: ImageLimits = DEFAULT_LIMITS,
                may_write: Callable[[str], bool] | None = None) -> ShardResult:
    """Score one shard and write its part (one whole object). A shard whose part exists
    is not scored again (resume after a crash, or a task retry). ``may_write(slide)``, when
    given, is asked (and may block) after scoring and before writing: a slide whose lease
    is not confirmed as ours gets nothing written (``discarded``)."""
    out = paths.out_store()
    key = paths.part_key(shard, ref.version)
    start = time.perf_counter()
    if out.exists(key):
        rows = list(csv.DictReader(io.StringIO(out.get_bytes(key).decode())))
        return ShardResult(shard.slide, shard.index, shard.count, len(rows),
                           sum(1 for r in rows if r["error"]),
                           sum(1 for r in rows if r["predicted_class"] == PARASITIZED),
                           time.perf_counter() - start, resumed=True)
    model = load_model(ref)
    scored = score_cells(paths.scans_store(), shard.cells, model, batch_size=batch_size,
                         concurrency=concurrency, limits=limits, tta=ref.tta)
    rows = _rows(shard, scored, ref, utc_now())
    unreadable = sum(1 for p, _ in scored if p is None)
    parasitized = sum(1 for r in rows if r[4] == PARASITIZED)
    if may_write is not None and not may_write(shard.slide):
        return ShardResult(shard.slide, shard.index, shard.count, len(rows), unreadable,
                           parasitized, time.perf_counter() - start, discarded=True)
    out.put_bytes(key, _csv_text(rows).encode(), content_type="text/csv")
    return ShardResult(shard.slide, shard.index, shard.count, len(rows), unreadable,
                       parasitized, time.perf_counter() - start)


# ----------------------------------------------------------------------------- finalize


@dataclass(frozen=True)
class SlideSummary:
    slide: str
    cells_scored: int
    parasitized: int
    parasitemia_pct: float | None
    unreadable: int
    mean_probability: float | None
    model_version: str
    scored_at: str
    scan_fingerprint: str

    @classmethod
    def from_rows(cls, slide: str, rows: Sequence[dict[str, str]], version: str,
                  fp: str) -> SlideSummary:
        probabilities = [float(r["probability"]) for r in rows if not r["error"]]
        parasitized = sum(1 for r in rows if r["predicted_class"] == PARASITIZED)
        scored = len(probabilities)
        return cls(
            slide=slide,
            cells_scored=scored,
            parasitized=parasitized,
            parasitemia_pct=round(100.0 * parasitized / scored, 3) if scored else None,
            unreadable=len(rows) - scored,
            mean_probability=round(float(np.mean(probabilities)), 6) if scored else None,
            model_version=version,
            scored_at=max((r["scored_at"] for r in rows), default=utc_now()),
            scan_fingerprint=fp,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finalize_slide(paths: ScoringPaths, ref: ModelRef, plan: SlidePlan) -> SlideSummary:
    """Concatenate the slide's parts into ``predictions/<slide>.csv`` (one whole PUT), then
    write the marker, then clear the parts. Refuses unless every cell is there exactly
    once."""
    out = paths.out_store()
    texts = []
    for shard in plan.shards:
        key = paths.part_key(shard, ref.version)
        try:
            text = out.get_bytes(key).decode()
        except ObjectNotFound as error:
            raise ScoringError(f"slide {plan.slide}: shard {shard.name} has no part {key}"
                               ) from error
        if not text.startswith(_HEADER):
            raise ScoringError(f"part {key} does not start with the prediction header")
        texts.append(text[len(_HEADER):])
    body = _HEADER + "".join(texts)
    rows = list(csv.DictReader(io.StringIO(body)))
    expected = [c.key for s in plan.shards for c in s.cells]
    if [r["key"] for r in rows] != expected:
        raise ScoringError(f"slide {plan.slide}: the parts do not hold each of its "
                           f"{len(expected)} cells exactly once ({len(rows)} rows)")
    summary = SlideSummary.from_rows(plan.slide, rows, ref.version, plan.fingerprint)
    out.put_bytes(paths.prediction_key(plan.slide), body.encode(), content_type="text/csv")
    marker = paths.marker_key(plan.slide, plan.fingerprint, ref.version)
    put_json(out, marker, {**summary.to_dict(), "cells": len(rows),
                           "shards": len(plan.shards), "threshold": ref.threshold,
                           "predictions": paths.prediction_key(plan.slide)})
    # Pointer written: older markers and every part of the slide are now garbage.
    for info in list(out.list(paths.marker_prefix(plan.slide))):
        if info.key != marker:
            out.delete(info.key)
    for info in list(out.list(paths.parts_prefix(plan.slide))):
        out.delete(info.key)
    return summary


def _slide_order(slide: str) -> tuple[int, int, str]:
    return (0, int(slide), "") if slide.isdigit() else (1, 0, slide)


def rebuild_summary(paths: ScoringPaths, *, concurrency: int = 16
                    ) -> tuple[bool, list[SlideSummary]]:
    """Rewrite ``predictions/summary.csv`` whole when it does not show exactly the latest
    marker of every slide; return (written, rows)."""
    out = paths.out_store()
    latest: dict[str, ObjectInfo] = {}
    for slide, infos in _marker_names(paths, out).items():
        latest[slide] = max(infos, key=lambda i: (i.last_modified, i.key))
    expected = {(s, *_marker_id(i)) for s, i in latest.items()}
    try:
        current = get_csv(out, paths.summary_key)
        shown = {(str(r.slide), str(r.scan_fingerprint), str(r.model_version))
                 for r in current.itertuples()}
        if shown == expected and len(current) == len(expected):
            return False, []
    except ObjectNotFound:
        if not expected:
            return False, []
    except (AttributeError, ValueError):  # unreadable or foreign columns: rebuild it
        log.warning("%s is unreadable; rebuilding it", paths.summary_key)
    slides = sorted(latest, key=_slide_order)
    with ThreadPoolExecutor(concurrency) as pool:
        records = list(pool.map(lambda s: get_json(out, latest[s].key), slides))
    rows = [SlideSummary(**{k: r.get(k) for k in SUMMARY_COLUMNS}) for r in records]
    import pandas as pd

    frame = pd.DataFrame([r.to_dict() for r in rows], columns=list(SUMMARY_COLUMNS))
    put_csv(out, paths.summary_key, frame)
    return True, rows


# --------------------------------------------------------------------- one-off entry


@dataclass
class ScoreReport:
    model_version: str
    slides_due: list[str] = field(default_factory=list)
    slides_busy: list[str] = field(default_factory=list)  # leased by another run
    slides: list[SlideSummary] = field(default_factory=list)  # scored in this run
    shards_scored: int = 0
    shards_resumed: int = 0
    cells: int = 0  # cells scored in this run (resumed shards not counted)
    seconds: float = 0.0
    summary_written: bool = False
    up_to_date: int = 0

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"model {self.model_version}: {len(self.slides)} slides scored "
                f"({self.cells} cells in {self.seconds:.1f} s, {self.cells_per_s:.0f} cells/s; "
                f"{self.shards_scored} shards, {self.shards_resumed} resumed), "
                f"{self.up_to_date} up to date, {len(self.slides_busy)} busy elsewhere")


@dataclass
class SlideTally:
    """Which planned slides still have shards out, and the counts that go into ``report``.
    The one piece of bookkeeping behind both the in-process scorer and the score flow."""

    report: ScoreReport
    plans: dict[str, SlidePlan] = field(default_factory=dict)
    left: dict[str, int] = field(default_factory=dict)  # shards not yet back, per slide

    def add(self, plan: SlidePlan | None) -> None:
        """A slide's fresh plan; ``None`` (another run finished the slide after this run
        listed it) counts as up to date."""
        if plan is None:
            self.report.up_to_date += 1
            return
        self.plans[plan.slide], self.left[plan.slide] = plan, len(plan.pending)
        self.report.shards_resumed += len(plan.done)

    def complete(self, slide: str) -> bool:
        return self.left.get(slide) == 0

    def shard_done(self, result: ShardResult) -> bool | None:
        """Count a shard that came back: True when it was its slide's last, None when its
        slide was dropped meanwhile (nothing counted)."""
        if result.slide not in self.left:
            return None
        if result.resumed:
            self.report.shards_resumed += 1
        else:
            self.report.shards_scored += 1
            self.report.cells += result.cells
        self.left[result.slide] -= 1
        return self.left[result.slide] == 0

    def pop(self, slide: str) -> SlidePlan:
        """The plan of a slide whose shards are all in, to finalize."""
        self.left.pop(slide)
        return self.plans.pop(slide)

    def drop(self, slide: str) -> None:
        self.plans.pop(slide, None)
        self.left.pop(slide, None)


def run_scoring(paths: ScoringPaths, ref: ModelRef, *, shard_size: int = DEFAULT_SHARD_SIZE,
                batch_size: int = DEFAULT_BATCH_SIZE, concurrency: int = DEFAULT_CONCURRENCY,
                parallel_shards: int = DEFAULT_PARALLEL_SHARDS,
                lease_ttl: float = DEFAULT_LEASE_TTL, lease_settle: float = DEFAULT_LEASE_SETTLE,
                on_shard: Callable[[ShardResult], None] | None = None) -> ScoreReport:
    """Score every due slide in this process: the same steps as the flow, without Prefect.

    Slides are planned one at a time as the shards of the previous ones are handed out, and
    at most ``parallel_shards + 1`` shards are in flight, so memory does not grow with the
    number of due cells. ``parallel_shards`` shards run at once so that one's fetching
    overlaps the other's last batch (a single shard's pipeline drains at its end).
    """
    started = time.perf_counter()
    report = ScoreReport(model_version=ref.version)
    due, report.up_to_date = find_due_slides(paths, ref.version)
    report.slides_due = [d.slide for d in due]
    if due:
        with (SlideLeases(paths, ttl=lease_ttl, settle=lease_settle) as leases,
              ThreadPoolExecutor(1, thread_name_prefix="score-lease") as confirmer):
            # The lease's settle second overlaps the first shards' fetching and inference;
            # their parts wait for the confirmation before they are written.
            claimed = leases.claim(report.slides_due)
            confirmation = confirmer.submit(leases.confirm, claimed)
            _score_slides(paths, ref, claimed, leases, report, shard_size=shard_size,
                          batch_size=batch_size, concurrency=concurrency,
                          parallel_shards=parallel_shards, on_shard=on_shard,
                          confirmation=confirmation)
            granted = set(confirmation.result())
            report.slides_busy = [s for s in report.slides_due if s not in granted]
    report.summary_written, _ = rebuild_summary(paths)
    report.seconds = time.perf_counter() - started
    return report


def _score_slides(paths: ScoringPaths, ref: ModelRef, slides: Sequence[str],
                  leases: SlideLeases, report: ScoreReport, *, shard_size: int,
                  batch_size: int, concurrency: int, parallel_shards: int,
                  on_shard: Callable[[ShardResult], None] | None,
                  confirmation: Future[list[str]] | None = None) -> None:
    """Score ``slides``. With ``confirmation`` (the claimed slides' lease check, still
    running), shards start at once and only slides it grants get parts written and
    finalized; without it every slide in ``slides`` is held already."""
    tally = SlideTally(report)
    queue: deque[Shard] = deque()
    to_plan = iter(slides)
    def granted(slide: str) -> bool:  # blocks until the confirmation is in
        return confirmation is None or slide in confirmation.result()

    def known_lost(slide: str) -> bool:  # without waiting for the confirmation
        return confirmation is not None and confirmation.done() and not granted(slide)

    def finish(slide: str) -> None:
        if not granted(slide):  # its parts came from a killed run; another run holds it
            drop(slide)
            return
        report.slides.append(finalize_slide(paths, ref, tally.pop(slide)))
        leases.release(slide)

    def drop(slide: str) -> None:  # another run holds it: forget its remaining shards
        tally.drop(slide)
        remaining = [s for s in queue if s.slide != slide]
        queue.clear()
        queue.extend(remaining)

    def next_shard() -> Shard | None:
        while True:
            while queue and known_lost(queue[0].slide):
                drop(queue[0].slide)
            if queue:
                return queue.popleft()
            slide = next(to_plan, None)
            if slide is None:
                return None
            if known_lost(slide):
                continue
            plan = plan_slide(paths, ref.version, slide, shard_size)
            tally.add(plan)
            if plan is None:  # finished by another run between listing and lease
                leases.release(slide)
                continue
            if tally.complete(slide):
                finish(slide)  # every part was written by a killed run
            queue.extend(plan.pending)

    with ThreadPoolExecutor(max(1, parallel_shards)) as pool:
        in_flight: set[Future[ShardResult]] = set()
        while True:
            while len(in_flight) <= parallel_shards and (shard := next_shard()) is not None:
                in_flight.add(pool.submit(score_shard, paths, ref, shard,
                                          batch_size=batch_size, concurrency=concurrency,
                                          may_write=granted))
            if not in_flight:
                break
            done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                result = future.result()
                if result.discarded:
                    drop(result.slide)
                    continue
                last = tally.shard_done(result)
                if last is None:  # dropped while this shard was in flight
                    continue
                if on_shard is not None:
                    on_shard(result)
                if last:
                    finish(result.slide)


def score(scans: str | Path, out: str | Path, *, model_path: str | Path | None = None,
          registry_url: str | None = None, threshold: float | None = None,
          tta: bool | int | None = None, shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = DEFAULT_BATCH_SIZE,
          concurrency: int = DEFAULT_CONCURRENCY,
          parallel_shards: int = DEFAULT_PARALLEL_SHARDS,
          lease_ttl: float = DEFAULT_LEASE_TTL, lease_settle: float = DEFAULT_LEASE_SETTLE,
          on_shard: Callable[[ShardResult], None] | None = None) -> ScoreReport:
    """One-off scoring (``malaria score``): ``scans`` (a URL or folder of ``<slide>/<file>``)
    to ``out`` (``<slide>.csv`` and ``summary.csv``), with ``model_path`` or, without it,
    the champion of ``registry_url`` (default: ``$MALARIA_DATA_URL``)."""
    from malaria.core.settings import data_url

    paths = ScoringPaths.folders(scans, out, registry_url=registry_url)
    if paths.registry_url is None and model_path is None:
        paths = ScoringPaths(**{**asdict(paths), "registry_url": data_url()})
    ref = resolve_model(paths, model_path, threshold, tta)
    return run_scoring(paths, ref, shard_size=shard_size, batch_size=batch_size,
                       concurrency=concurrency, parallel_shards=parallel_shards,
                       lease_ttl=lease_ttl, lease_settle=lease_settle, on_shard=on_shard)
