"""The model registry in the bucket: versions, their records, and which one serves.

The gate that decides a promotion is :mod:`malaria.registry.gate`; a version's provenance
(name, packages, code revision, hashes) is :mod:`malaria.registry.provenance`.

```
models/<version>/<model file>     e.g. model.keras
models/<version>/<plot>.png       learning curves, ROC, confusion matrix, worst mistakes
models/<version>/metrics.json     the version's record; written LAST: a version exists once
                                  this object exists, so a crash mid-upload leaves no half
                                  version that could be listed or promoted
models/<version>/gate.json        the promotion decision taken for it (optional)
models/<version>/lineage.csv      every cell it saw (key, ETag, class, slide, split), written
                                  before metrics.json (:mod:`malaria.registry.lineage`)
models/champion.json              the serving version, with the history of every change
```

``champion.json`` holds ``version``, ``at``, ``reason``, ``decision`` of the current
champion and ``history``: every promotion and rollback in order, append-only. Rollback
replays that history as a stack (a promotion pushes, a rollback pops), so rolling back twice
goes two champions back rather than bouncing between the last two.

All writes are whole objects (see :mod:`malaria.io.store`). ``champion.json`` is changed
by compare-and-swap: read it with its ETag, build the new document, write it only if the
ETag is unchanged (``If-Match``; ``If-None-Match: *`` for the first), and on a conflict read
again and redo the change. Two promotions at once (the train flow and ``malaria models
promote``) therefore both land in the history, in some order; every writer of
``champion.json`` goes through ``_update_champion``, so that is the single-writer guard.
Each history entry has an ``id``: a write whose answer was lost and whose retry found the
object changed is recognised as done, not applied twice. On a server that ignores
conditional writes the same code checks, then writes: a small window remains there, and
promotions should run one at a time (``champion_writes_are_atomic`` says which).

No TensorFlow import here: the registry runs in flows and CLI commands that never load a
model, and package versions come from installed metadata instead.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from malaria.core.layout import CHAMPION_KEY, MODELS, lineage_key, model_file_key
from malaria.io.atomic import atomic_path
from malaria.io.store import (
    ObjectNotFound,
    Store,
    WriteConflict,
    get_json,
    json_bytes,
    put_json,
    read_for_update,
)
from malaria.registry.gate import GateDecision
from malaria.registry.lineage import LineageRow, read_lineage, write_lineage
from malaria.registry.provenance import (
    code_revision,
    code_version,
    environment_packages,
    package_versions,
    sha256_file,
)

METRICS_FILE = "metrics.json"
GATE_FILE = "gate.json"
LINEAGE_FILE = lineage_key("v").rsplit("/", 1)[-1]  # the layout names it once

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RESERVED = {METRICS_FILE, GATE_FILE, LINEAGE_FILE}
# Compare-and-swap on champion.json: tries before giving up, and the back-off between them
# (jittered, so two writers that collided do not collide again).
CHAMPION_CAS_ATTEMPTS = 20
CHAMPION_CAS_BACKOFF_S = 0.05


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed; the message says why."""


class UnknownVersion(RegistryError, KeyError):
    """No registered version (no metrics.json) under that name."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "unknown version"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_version(version: str) -> str:
    # A version becomes a folder name in every store: no slashes, nothing a shell would mangle.
    if not isinstance(version, str) or not _VERSION.match(version):
        raise RegistryError(f"invalid version name {version!r} (letters, digits, '._-')")
    return version


# --------------------------------------------------------------------------------- registry


class ModelRegistry:
    """Versions under ``models/<version>/`` and the serving pointer ``models/champion.json``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- keys

    @staticmethod
    def metrics_key(version: str) -> str:
        return model_file_key(_check_version(version), METRICS_FILE)

    @staticmethod
    def file_key(version: str, name: str) -> str:
        return model_file_key(_check_version(version), name)

    # -- writing

    def register(
        self,
        version: str,
        model_path: Path,
        metrics: Mapping[str, Any],
        plots: Mapping[str, bytes],
        *,
        lineage: Sequence[LineageRow] | None = None,
        flow_run_id: str | None = None,
    ) -> str:
        """Upload the model file and plots, then ``metrics.json`` last; return its key.

        ``metrics`` is the caller's record: test metrics, threshold, architecture, input
        size, slide lists (train/val/test), the data manifest hash, and so on. The registry
        adds ``version``, ``model`` (file, bytes, sha256), ``plots`` (their file names) and,
        unless the caller gave them, ``created_at``, ``packages`` and ``code_revision``.
        Plot names get ``.png`` when they lack it. A registered version is never overwritten:
        a model's record must not change under the decisions taken on it.

        ``lineage`` (every cell the model saw) is written as ``lineage.csv``, and the record
        gets ``lineage`` (its key, sha256, row count and counts per class and split).
        Every record gets ``provenance``: ``flow_run_id`` (the task layer reads it from
        Prefect; None outside a flow run), ``code`` (:func:`code_version`) and ``packages``
        (:func:`environment_packages`), unless the caller gave it.
        """
        _check_version(version)
        model_path = Path(model_path)
        if not model_path.is_file():
            raise RegistryError(f"model file {model_path} does not exist or is not a file")
        if self.store.exists(self.metrics_key(version)):
            raise RegistryError(f"version {version} is already registered")

        plot_files: dict[str, bytes] = {}
        for name, data in plots.items():
            file_name = name if name.lower().endswith(".png") else f"{name}.png"
            if not _FILE_NAME.match(file_name) or file_name in _RESERVED:
                raise RegistryError(f"invalid plot name {name!r}")
            plot_files[file_name] = data
        model_name = model_path.name
        if not _FILE_NAME.match(model_name) or model_name in _RESERVED or model_name in plot_files:
            raise RegistryError(f"invalid or clashing model file name {model_name!r}")

        self.store.put_file(self.file_key(version, model_name), model_path)
        lineage_summary = (write_lineage(self.store, version, lineage)
                           if lineage is not None else None)
        for file_name, data in sorted(plot_files.items()):
            self.store.put_bytes(self.file_key(version, file_name), data,
                                 content_type="image/png")

        record: dict[str, Any] = dict(metrics)
        record.setdefault("created_at", _now())
        record.setdefault("packages", package_versions())
        record.setdefault("code_revision", code_revision())
        record.setdefault("provenance", {"flow_run_id": flow_run_id, "code": code_version(),
                                         "packages": environment_packages()})
        if lineage_summary is not None:
            record["lineage"] = lineage_summary
        record["version"] = version
        record["model"] = {
            "file": model_name,
            "bytes": model_path.stat().st_size,
            "sha256": sha256_file(model_path),
        }
        record["plots"] = sorted(plot_files)
        key = self.metrics_key(version)
        put_json(self.store, key, record)  # the pointer: the version exists from here on
        return key

    def registered_as(self, metrics: Mapping[str, Any]) -> str | None:
        """A version trained from the same data and settings as ``metrics`` (the same
        checkpoint lineage: config and data manifest hash) that no gate has decided on yet,
        newest first, or None.

        Registering is not idempotent by itself (each try names a new version): a retried
        register step, or a run re-run after a crash between register and gate, asks this
        first and finishes that version instead of registering the model twice. A version
        with a final decision belongs to a finished run: a later run registers its own. Not
        final: a decision to promote that never reached ``champion.json`` (a crash between
        the two writes), and one still awaiting a person's approval."""
        from malaria.registry.retention import lineage_checkpoint  # it imports no registry

        lineage = lineage_checkpoint(metrics)
        if lineage is None:
            return None
        served: set[str] | None = None  # read once, and only if a decision needs it
        for version in reversed(self.versions()):
            try:
                if lineage_checkpoint(self.get(version)) != lineage:
                    continue
                decision = self.get_decision(version)
            except UnknownVersion:  # deleted by retention meanwhile
                continue
            if decision is None:
                return version
            approval = decision.get("approval")
            if isinstance(approval, Mapping) and approval.get("status") == "pending":
                return version
            if decision.get("promote"):
                if served is None:
                    champion = self.champion() or {}
                    served = {str(event.get("version"))
                              for event in champion.get("history", [])}
                if version not in served:
                    return version
        return None

    def record_decision(self, version: str, decision: GateDecision | Mapping[str, Any]) -> None:
        """Keep the gate's verdict beside the version, promoted or not (``gate.json``)."""
        self._require(version)
        payload = decision.to_dict() if isinstance(decision, GateDecision) else dict(decision)
        payload.setdefault("at", _now())
        put_json(self.store, self.file_key(version, GATE_FILE), payload)

    def promote(
        self,
        version: str,
        *,
        reason: str,
        decision: GateDecision | Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Make ``version`` the champion; return the new ``champion.json``.

        Promoting the version that already serves changes nothing (re-running a flow must not
        add history). An unregistered version is refused with :class:`UnknownVersion`.
        """
        self._require(version)
        decision_dict = (
            decision.to_dict() if isinstance(decision, GateDecision)
            else dict(decision) if decision is not None else None
        )

        def promoted(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is not None and current.get("version") == version:
                return None
            event: dict[str, Any] = {
                "action": "promote",
                "version": version,
                "at": _now(),
                "reason": reason,
                "previous": current.get("version") if current else None,
            }
            if decision_dict is not None:
                event["decision"] = decision_dict
            return event

        return self._update_champion(promoted)

    def rollback(self, *, reason: str | None = None) -> str:
        """Serve the champion before the current one again; return its version.

        Raises :class:`RegistryError` when there is no earlier champion to return to.
        """

        def rolled_back(current: dict[str, Any] | None) -> dict[str, Any]:
            if current is None:
                raise RegistryError("no champion yet, nothing to roll back")
            stack = _serving_stack(current.get("history", []))
            if len(stack) < 2:
                raise RegistryError(
                    f"no previous champion to roll back to (only {current.get('version')} "
                    "served)"
                )
            leaving, target = stack[-1], stack[-2]
            self._require(target)
            return {
                "action": "rollback",
                "version": target,
                "at": _now(),
                "reason": reason or f"rollback from {leaving}",
                "previous": leaving,
            }

        return str(self._update_champion(rolled_back)["version"])

    def champion_writes_are_atomic(self) -> bool:
        """Whether the store decides champion.json's compare-and-swap itself (conditional
        writes); if not, run promotions and rollbacks one at a time."""
        return self.store.conditional_writes(CHAMPION_KEY)

    def _update_champion(
        self, change: Callable[[dict[str, Any] | None], dict[str, Any] | None],
    ) -> dict[str, Any]:
        """Append ``change(current)`` (an event; None: nothing to do) to champion.json by
        compare-and-swap; on a conflict, read again and ask ``change`` again. Returns the
        champion.json now in force."""
        event_id = uuid.uuid4().hex
        for attempt in range(CHAMPION_CAS_ATTEMPTS):
            found = read_for_update(self.store, CHAMPION_KEY)
            current: dict[str, Any] | None = json.loads(found[0]) if found else None
            history = current.get("history", []) if current else []
            if any(entry.get("id") == event_id for entry in history):
                return current  # type: ignore[return-value]  # our write landed already
            event = change(current)
            if event is None:
                return current  # type: ignore[return-value]  # nothing to change
            event = {**event, "id": event_id}
            payload = {
                "version": event["version"],
                "at": event["at"],
                "reason": event["reason"],
                "decision": event.get("decision"),
                "history": [*history, event],
            }
            data = json_bytes(payload)
            try:
                if found is None:
                    self.store.put_if_absent(CHAMPION_KEY, data,
                                             content_type="application/json")
                else:
                    self.store.put_if_match(CHAMPION_KEY, data, found[1],
                                            content_type="application/json")
            except WriteConflict:  # another promotion or rollback won: redo on top of it
                time.sleep(random.uniform(0, CHAMPION_CAS_BACKOFF_S * (attempt + 1)))
                continue
            return payload
        raise RegistryError(f"{CHAMPION_KEY} kept changing: gave up after "
                            f"{CHAMPION_CAS_ATTEMPTS} tries")

    # -- reading

    def _require(self, version: str) -> None:
        if not self.store.exists(self.metrics_key(version)):
            raise UnknownVersion(
                f"model version {version!r} is not registered (no {self.metrics_key(version)})"
            )

    def get(self, version: str) -> dict[str, Any]:
        """The version's ``metrics.json``; :class:`UnknownVersion` when it is not registered."""
        try:
            record: dict[str, Any] = get_json(self.store, self.metrics_key(version))
        except ObjectNotFound as error:
            raise UnknownVersion(f"model version {version!r} is not registered") from error
        return record

    def get_decision(self, version: str) -> dict[str, Any] | None:
        try:
            decision: dict[str, Any] = get_json(self.store, self.file_key(version, GATE_FILE))
        except ObjectNotFound:
            return None
        return decision

    def get_lineage(self, version: str) -> list[LineageRow]:
        """Every cell ``version`` saw, as its ``lineage.csv`` lists them, checked against
        the SHA-256 in its record (:class:`~malaria.registry.lineage.LineageError` when it
        has none, or the file is missing or altered)."""
        return read_lineage(self.store, version, self.get(version))

    def versions(self) -> list[str]:
        """Registered versions (those with a metrics.json), oldest first."""
        found = []
        for info in self.store.list(MODELS):
            parts = info.key[len(MODELS):].split("/")
            if len(parts) == 2 and parts[1] == METRICS_FILE:
                found.append(parts[0])
        return sorted(found)

    def list_versions(self) -> list[dict[str, Any]]:
        """Every registered version's ``metrics.json``, oldest first, each with ``champion``
        set to whether it serves now."""
        serving = (self.champion() or {}).get("version")
        records = []
        for version in self.versions():
            record = self.get(version)
            record["champion"] = version == serving
            records.append(record)
        return records

    def champion(self) -> dict[str, Any] | None:
        """``champion.json`` (``version``, ``at``, ``reason``, ``decision``, ``history``)."""
        try:
            payload: dict[str, Any] = get_json(self.store, CHAMPION_KEY)
        except ObjectNotFound:
            return None
        return payload

    def champion_version(self) -> str | None:
        current = self.champion()
        return str(current["version"]) if current else None

    def download_model(self, version: str, dest: Path) -> Path:
        """Fetch the model file to ``dest`` (a file path, or an existing folder to put it in).

        The download lands in a temporary file, is checked against the recorded SHA-256, and
        is then renamed into place, so a reader never loads a partial or corrupted model.
        """
        from malaria.io.localpath import UnsafePath, confined

        record = self.get(version)
        model = record.get("model")
        model = model if isinstance(model, dict) else {}
        name = model.get("file")
        # metrics.json is bucket data: its file name must be what register() writes (one
        # plain name), and the path must stay inside ``dest`` (the checksum beside it in the
        # same bucket proves nothing against a bucket writer).
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name in _RESERVED:
            raise RegistryError(f"model file name {name!r} in the record of {version} is "
                                "not a plain file name: refused")
        dest = Path(dest)
        try:
            target = confined(dest, name, what="model file name") if dest.is_dir() else dest
        except UnsafePath as error:
            raise RegistryError(f"model file name of {version}: {error}") from error
        with atomic_path(target) as tmp:
            self.store.download_file(self.file_key(version, name), tmp)
            digest = sha256_file(tmp)
            if digest != model.get("sha256"):
                raise RegistryError(
                    f"model of {version} is corrupted: sha256 {digest} != {model.get('sha256')}"
                )
        return target


def _serving_stack(history: Iterable[Mapping[str, Any]]) -> list[str]:
    """Replay promotions (push) and rollbacks (pop) into the stack of serving versions."""
    stack: list[str] = []
    for event in history:
        if event.get("action") == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(str(event["version"]))
    return stack
