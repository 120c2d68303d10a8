"""Leases on slides in the bucket, so that two runs never score the same slide (see
malaria.scoring for the protocol).

Where the server honours conditional writes (``Store.conditional_writes``), a claim is a
create-if-absent, or a replace-if-unchanged of a stale lease on the ETag read, and a renewal
a replace-if-unchanged of our own: of two claimants exactly one write succeeds, however
long either's write takes (a PUT retried after a 503 included), so a claim is decided when
its write returns and no settle is needed. Elsewhere the fallback is today's read - write -
wait ``settle`` - read back, which is safe only while every claimant's read-to-write gap is
shorter than ``settle``: a write delayed past it (retries after 5xx, a stalled connection)
can land on a lease another run has already confirmed, and both would then hold the slide
until the next renewal shows one of them the loss. The flow re-checks a lease before
writing a slide's CSV (``still_held``), which narrows that window to the CSV write itself;
the CSV and its rows are the same whoever writes them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from malaria.core.defaults import SCORE_LEASE_SETTLE_S, SCORE_LEASE_TTL_S
from malaria.io.processes import holder_is_live
from malaria.io.store import ObjectNotFound, WriteConflict, json_bytes, read_for_update
from malaria.scoring.paths import ScoringPaths

log = logging.getLogger(__name__)


def _parse(data: bytes) -> dict[str, Any]:
    """A lease document; {} (stale) when unparsable."""
    try:
        lease = json.loads(data)
    except ValueError:
        return {}
    return lease if isinstance(lease, dict) else {}


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
    """Leases on slides in the bucket (see malaria.scoring): ``acquire`` claims what it
    can, a heartbeat thread renews, ``release``/leaving the ``with`` block deletes ours.

    The leases must be held by a process that lives as long as the run (the flow's), not
    by a task that may run on another worker.
    """

    def __init__(self, paths: ScoringPaths, *, ttl: float = SCORE_LEASE_TTL_S,
                 settle: float = SCORE_LEASE_SETTLE_S, owner: LeaseOwner | None = None,
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
        self._atomic: bool | None = None  # conditional writes honoured (asked once)

    # -- reading

    def read(self, slide: str) -> dict[str, Any] | None:
        try:
            return _parse(self.store.get_bytes(self.paths.lease_key(slide)))
        except ObjectNotFound:
            return None

    def _read_versioned(self, slide: str) -> tuple[dict[str, Any] | None, str | None]:
        """The lease (None: none; {}: unparsable, treated as stale) and its ETag."""
        found = read_for_update(self.store, self.paths.lease_key(slide))
        if found is None:
            return None, None
        data, etag = found
        return _parse(data), etag

    @property
    def atomic(self) -> bool:
        """Whether claims are decided by conditional writes (no settle needed)."""
        if self._atomic is None:
            self._atomic = self.store.conditional_writes(self.paths.lease_key("probe"))
        return self._atomic

    def is_live(self, lease: dict[str, Any] | None, now: float | None = None) -> bool:
        """Held by someone (the rule in :func:`malaria.io.processes.holder_is_live`)."""
        return holder_is_live(lease, self.owner.host, time.time() if now is None else now)

    # -- writing

    def _payload(self) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.owner.token, "host": self.owner.host, "pid": self.owner.pid,
                "label": self.owner.label, "renewed_at": now, "expires_at": now + self.ttl,
                "expires": datetime.fromtimestamp(now + self.ttl, UTC).isoformat()}

    def _write(self, slide: str, etag: str | None) -> bool:
        """Write our lease over the one read (``etag``; None: there was none); False when
        another writer got there first."""
        key, data = self.paths.lease_key(slide), json_bytes(self._payload())
        try:
            if etag is None:
                self.store.put_if_absent(key, data, content_type="application/json")
            else:
                self.store.put_if_match(key, data, etag, content_type="application/json")
        except WriteConflict:
            return False
        return True

    def _claim(self, slide: str) -> bool:
        current, etag = self._read_versioned(slide)
        if current and current.get("owner") != self.owner.token and self.is_live(current):
            return False
        return self._write(slide, etag)

    def claim(self, slides: Iterable[str]) -> list[str]:
        """First half of ``acquire``: write our claim on each slide that has no live lease of
        another owner; returns the claimed slides. Nothing may be written for a slide until
        ``confirm`` grants it."""
        slides = list(dict.fromkeys(slides))
        if not slides:
            return []
        with ThreadPoolExecutor(self.concurrency) as pool:
            # Read and write per slide in one thread: the read-to-write gap stays short.
            oks = list(pool.map(self._claim, slides))
        self._claimed_at = time.monotonic()
        return [s for s, ok in zip(slides, oks, strict=True) if ok]

    def confirm(self, claimed: Sequence[str]) -> list[str]:
        """Second half: keep the slides whose lease is still ours; they are held from now
        on. Without conditional writes, first wait until ``settle`` seconds after the
        claims (a rival's write, if any, has landed); with them the claim was decided when
        its write returned, and the read-back only catches a writer outside the protocol."""
        if not claimed:
            return []
        if not self.atomic:  # a rival's unconditional write may still be on its way
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
            lease, etag = self._read_versioned(slide)
            # Replace-if-unchanged: a takeover between our read and write is a loss, not
            # something we overwrite.
            if not (lease and lease.get("owner") == self.owner.token and self._write(slide, etag)):
                lost.append(slide)
        if lost:
            log.warning("lost the lease on slides %s (expired and taken over)", lost)
            with self._lock:
                self.held.difference_update(lost)
                self.lost.update(lost)
        return lost

    def still_held(self, slide: str) -> bool:
        """Read the lease again now (before writing a slide's results): ours and live? A
        lease found lost is moved to ``lost``."""
        with self._lock:
            if slide not in self.held:
                return False
        lease = self.read(slide)
        if lease and lease.get("owner") == self.owner.token and self.is_live(lease):
            return True
        log.warning("lost the lease on slide %s (taken over)", slide)
        with self._lock:
            self.held.discard(slide)
            self.lost.add(slide)
        return False

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
