"""The ingest lock: one object in the bucket that makes ingest a single writer.

Every ingest run (the ``ingest`` deployment, ``malaria ingest`` with its temporary local API,
the nightly flow's subflow) holds it from before it loads the ledger until after its last
write, so no run decides with a ledger another run is changing. It lives in the bucket, not
in a Prefect server, because the CLI's temporary server knows nothing of the others.

Protocol (as the scoring leases): read the lock; if a live lock of another owner is there,
wait (bounded) and look again; else write our own token. Where the server honours
conditional writes (``Store.conditional_writes``) that write is a create-if-absent, or a
replace-if-unchanged of the stale lock read, so exactly one rival wins at once; elsewhere,
wait ``settle`` seconds (a rival's write, if any, has landed) and read it back: ours means
held. A heartbeat thread renews it
every ``ttl / 3``; a lock not renewed for ``ttl`` seconds (its run died), or whose owner
process on this host is gone, is stale and may be taken over. ``verify`` re-reads it, so a
run checks it still holds the lock right before each chunk writes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from malaria.core import layout
from malaria.core.defaults import (
    INGEST_LOCK_POLL_S,
    INGEST_LOCK_SETTLE_S,
    INGEST_LOCK_TTL_S,
    INGEST_LOCK_WAIT_S,
)
from malaria.io.processes import holder_is_live
from malaria.io.store import (
    ObjectNotFound,
    Store,
    WriteConflict,
    get_json,
    json_bytes,
    put_json,
    read_for_update,
)

log = logging.getLogger(__name__)

# Beside the ledger folder, not in it: the ledger loads every object under its prefix.
INGEST_LOCK_KEY = layout.INGEST_LOCK_KEY


class IngestLockBusy(RuntimeError):
    """Another run held the lock for longer than this run would wait; nothing was written."""


class IngestLockLost(RuntimeError):
    """The lock expired and another run took it over: this run must stop writing."""


def describe(lock: dict[str, Any]) -> str:
    """A person's reading of a lock: who holds it and until when."""
    return (f"{lock.get('label') or 'an ingest run'} on host {lock.get('host', '?')} "
            f"(pid {lock.get('pid', '?')}), acquired {lock.get('acquired', '?')}, "
            f"expires {lock.get('expires', '?')}")


class IngestLock:
    """``with IngestLock(store, label=run_id):`` holds the ingest lock for the block.

    ``wait`` bounds how long ``acquire`` waits for another run; then it raises
    ``IngestLockBusy`` (having written nothing). ``on_wait`` is told about the holder
    once, when this run starts to wait.
    """

    def __init__(self, store: Store, *, label: str = "", key: str = INGEST_LOCK_KEY,
                 ttl: float = INGEST_LOCK_TTL_S, settle: float = INGEST_LOCK_SETTLE_S,
                 wait: float = INGEST_LOCK_WAIT_S, poll: float = INGEST_LOCK_POLL_S,
                 on_wait: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.store = store
        self.key = key
        self.label = label
        self.ttl = float(ttl)
        self.settle = float(settle)
        self.wait = float(wait)
        self.poll = float(poll)
        self.on_wait = on_wait
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.held = False
        self.lost = False
        self._acquired = ""
        self._guard = threading.Lock()  # the heartbeat and the flow's thread both write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading

    def read(self) -> dict[str, Any] | None:
        try:
            lock = get_json(self.store, self.key)
        except ObjectNotFound:
            return None
        except ValueError:  # unparsable: a torn or hand-edited object, treated as stale
            return {}
        return lock if isinstance(lock, dict) else {}

    def is_live(self, lock: dict[str, Any] | None, now: float | None = None) -> bool:
        """Held by someone (the rule in :func:`malaria.io.processes.holder_is_live`)."""
        return holder_is_live(lock, self.host, time.time() if now is None else now)

    def _read_with_etag(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lock and the ETag a conditional replace must name (None, None: no lock)."""
        found = read_for_update(self.store, self.key)
        if found is None:
            return None, None
        data, etag = found
        try:
            lock = json.loads(data)
        except ValueError:  # unparsable: treated as stale
            return {}, etag
        return (lock if isinstance(lock, dict) else {}), etag

    def ours(self, lock: dict[str, Any] | None) -> bool:
        return bool(lock and lock.get("owner") == self.token)

    # -- writing

    def _payload(self) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.token, "label": self.label, "host": self.host, "pid": self.pid,
                "acquired": self._acquired or datetime.fromtimestamp(now, UTC).isoformat(),
                "renewed_at": now, "expires_at": now + self.ttl,
                "expires": datetime.fromtimestamp(now + self.ttl, UTC).isoformat()}

    def _wait_for_holder(self, seconds: float) -> None:
        """Sleep before looking at the lock again (a method so that tests can watch it)."""
        time.sleep(seconds)

    def acquire(self) -> None:
        """Hold the lock, waiting at most ``wait`` seconds for another run to let go."""
        deadline = time.monotonic() + self.wait
        told = False
        atomic = self.store.conditional_writes(self.key)
        while True:
            current, etag = self._read_with_etag() if atomic else (self.read(), None)
            if not (self.is_live(current) and not self.ours(current)):
                if atomic:
                    # One conditional write decides between rivals: no settle to wait.
                    try:
                        if current is None:
                            self.store.put_if_absent(self.key, json_bytes(self._payload()))
                        else:
                            self.store.put_if_match(self.key, json_bytes(self._payload()),
                                                    str(etag))
                    except WriteConflict:
                        continue  # a rival wrote first: look again
                else:
                    put_json(self.store, self.key, self._payload())
                    time.sleep(self.settle)
                current = self.read()
                if self.ours(current):
                    self.held, self.lost = True, False
                    self._acquired = (current or {}).get("acquired", "")
                    return
                # A rival claimed it at the same moment and its write landed last: it holds.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                holder = describe(current) if current else "a run that has just claimed it"
                raise IngestLockBusy(
                    f"another ingest run holds the ingest lock ({self.store.uri(self.key)}): "
                    f"{holder}. Waited {self.wait:g} s; this run wrote nothing. Run ingest "
                    "again when that run has finished (a lock whose run died expires "
                    f"{self.ttl:g} s after its last renewal).")
            if not told and current:
                told = True
                if self.on_wait is not None:
                    self.on_wait(current)
            self._wait_for_holder(min(self.poll, remaining))

    def verify(self) -> None:
        """Raise ``IngestLockLost`` unless the lock in the bucket is still ours."""
        current = self.read() if self.held and not self.lost else None
        if not self.ours(current):
            self.lost = True
            holder = describe(current) if current else "nobody holds it now"
            raise IngestLockLost(
                f"this ingest run lost the ingest lock ({self.store.uri(self.key)}): it "
                f"expired and was taken over ({holder}); stopping before writing more")

    def renew(self) -> bool:
        """Push the expiry; False (and ``lost``) when another run holds it now."""
        with self._guard:
            if not self.held:
                return False
            atomic = self.store.conditional_writes(self.key)
            current, etag = self._read_with_etag() if atomic else (self.read(), None)
            if not self.ours(current):
                self.lost = True
                log.warning("lost the ingest lock %s", self.key)
                return False
            if atomic:
                try:  # a takeover between our read and this write is a loss, not overwritten
                    self.store.put_if_match(self.key, json_bytes(self._payload()), str(etag))
                except WriteConflict:
                    self.lost = True
                    log.warning("lost the ingest lock %s", self.key)
                    return False
            else:
                put_json(self.store, self.key, self._payload())
            return True

    def release(self) -> None:
        with self._guard:
            if not self.held:
                return
            self.held = False
            # Never delete a lock another run took over.
            if self.ours(self.read()):
                self.store.delete(self.key)

    # -- heartbeat

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.renew():
                    return
            except Exception:  # a failed renewal is retried at the next beat
                log.warning("ingest lock renewal failed", exc_info=True)

    def __enter__(self) -> IngestLock:
        self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="ingest-lock", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.release()
        except Exception:
            if exc is None:
                raise
            # The block failed already (often on the same dead store): its error is the
            # run's cause and must stay so; a lock not released expires after ``ttl``.
            log.warning("could not release the ingest lock %s after a failure; it expires "
                        "%g s after its last renewal", self.key, self.ttl, exc_info=True)
