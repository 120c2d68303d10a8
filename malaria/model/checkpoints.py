"""The files a training run leaves behind: its per-epoch checkpoint folder, its mirror in the
bucket, and the serving model.

A checkpoint folder holds:

``last.keras``        the model with its optimizer state (moments, step counter)
``best.weights.h5``   the weights of the best validation epoch so far (``TrainConfig.monitor``)
``state.json``        epochs done, best-so-far, early-stopping counter, history, seconds
                      spent, the planned number of epochs; written last, so it only ever
                      points at complete files

In the bucket (:func:`upload_checkpoint`, :func:`download_checkpoint`) each upload goes to a
set folder of its own, ``checkpoints/<run key>/sets/<set id>/``, and then a pointer,
``checkpoints/<run key>/LATEST.json``, names that set with its epoch and each file's size and
SHA-256; older sets are deleted after the pointer. A crash mid-upload leaves a set that no
pointer names: a resume ignores it (with a warning, and deletes it) and takes the set the
pointer names, the previous complete one, or starts over when there is none or its files do
not match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras

from malaria.core import layout
from malaria.io.atomic import save_atomic, write_atomic
from malaria.io.localpath import UnsafePath, confined
from malaria.io.store import ObjectNotFound, StorageError, get_json, put_json
from malaria.model.config import RetrainConfig, TrainConfig

if TYPE_CHECKING:
    from malaria.io.store import Store

log = logging.getLogger(__name__)

LAST_MODEL = "last.keras"
BEST_WEIGHTS = "best.weights.h5"
STATE = "state.json"
# What must match for a checkpoint to be resumed rather than started over.
SAME_RUN_KEYS = ("arch", "input_size", "batch_size", "seed", "augment")


def save_model(model: keras.Model, path: Path) -> None:
    save_atomic(Path(path), model.save)


def save_weights(model: keras.Model, path: Path) -> None:
    save_atomic(Path(path), model.save_weights)


def write_state(folder: Path, state: dict[str, Any]) -> None:
    write_atomic(Path(folder) / STATE, json.dumps(state, indent=1))


def fresh_state(config: TrainConfig) -> dict[str, Any]:
    return {"epoch": 0, "best_val_loss": math.inf, "best_score": -math.inf, "best_epoch": 0,
            "wait": 0, "history": [],
            "seconds": 0.0, "planned_epochs": config.epochs, "config": asdict(config)}


def resumable_state(folder: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The saved state of the same run in ``folder``, if it has a complete checkpoint."""
    state_path = Path(folder) / STATE
    if not (state_path.exists() and (Path(folder) / LAST_MODEL).exists()):
        return None
    saved = json.loads(state_path.read_text())
    wanted = asdict(config)
    if all(saved.get("config", {}).get(k) == wanted.get(k) for k in SAME_RUN_KEYS):
        return saved
    return None


def save_for_serving(model: keras.Model, path: Path) -> int:
    """Save ``model`` without its optimizer state (a third of the checkpoint's size for
    Adam) as a ``.keras`` file; returns its size in bytes."""
    path = Path(path)
    # from_config, not clone_model: Keras 3.15's clone_model carries the compiled
    # optimizer over, and its moments would be saved with the weights.
    serving = keras.Model.from_config(model.get_config())
    serving.set_weights(model.get_weights())
    save_model(serving, path)
    return path.stat().st_size


# ------------------------------------------------------------------ mirror in the bucket


def checkpoint_id(config: RetrainConfig, manifest_sha256: str) -> str:
    """The same data and settings give the same id, so a killed run resumes."""
    identity = json.dumps({"config": asdict(config), "data": manifest_sha256}, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def checkpoint_prefix(config: RetrainConfig, manifest_sha256: str) -> str:
    return layout.checkpoint_prefix(checkpoint_id(config, manifest_sha256))


def upload_folder(store: Store, folder: Path, prefix: str) -> int:
    count = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith(".tmp"):
            store.put_file(prefix + path.relative_to(folder).as_posix(), path)
            count += 1
    return count


def download_folder(store: Store, prefix: str, folder: Path) -> int:
    """Every object under ``prefix`` into ``folder`` at its relative key; returns the count.

    A key that would land outside ``folder`` (``<prefix>//abs/path``, ``..`` segments: a
    hostile or mangled bucket), or whose path clashes with another key's folder, is skipped
    with a warning: a checkpoint set never has one, and the rest of the set is still good.
    """
    count = 0
    for info in store.list(prefix):
        try:
            if not info.key.startswith(prefix):
                raise UnsafePath(f"key {info.key!r} is not under {prefix!r}")
            target = confined(Path(folder), info.key[len(prefix):])
            target.parent.mkdir(parents=True, exist_ok=True)
            store.download_file(info.key, target)
        except UnsafePath as error:
            log.warning("download of %s skipped: %s", info.key, error)
            continue
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as error:
            # "a" and "a/b" both listed: S3 allows it, a folder cannot hold both.
            log.warning("download of %s skipped: a file and a folder share its path (%s)",
                        info.key, error)
            continue
        count += 1
    return count


# ------------------------------------------------------------- checkpoint sets + pointer

POINTER_FORMAT = 1
_SET_ID = re.compile(r"[0-9a-f]{16}")  # what upload_checkpoint names a set: a key segment


class TornCheckpoint(StorageError):
    """The set a pointer names is missing files or its files do not match the pointer."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _set_files(folder: Path) -> list[dict[str, Any]]:
    return [{"name": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size,
             "sha256": _sha256_file(path)}
            for path in sorted(Path(folder).rglob("*"))
            if path.is_file() and not path.name.startswith(".tmp")]


def _saved_epoch(folder: Path) -> int | None:
    try:
        return int(json.loads((Path(folder) / STATE).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def upload_checkpoint(store: Store, folder: Path, prefix: str) -> int:
    """Mirror the checkpoint in ``folder`` to the bucket: its files into a new set folder,
    then the pointer naming them, then delete every older set. Returns the files uploaded.

    The set id is a hash of the files' names and contents, so re-uploading the same set
    writes the same keys."""
    folder = Path(folder)
    files = _set_files(folder)
    set_id = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    set_prefix = layout.checkpoint_set_prefix(prefix, set_id)
    for entry in files:
        store.put_file(set_prefix + entry["name"], folder / entry["name"])
    pointer_key = layout.checkpoint_pointer_key(prefix)
    # Last: only now may a resume use this set.
    put_json(store, pointer_key, {"format": POINTER_FORMAT, "set": set_id,
                                  "epoch": _saved_epoch(folder), "files": files})
    _prune(store, prefix, set_prefix)
    return len(files)


def _prune(store: Store, prefix: str, set_prefix: str) -> int:
    """Delete what the pointer does not name: older sets, torn ones from killed runs."""
    pointer_key = layout.checkpoint_pointer_key(prefix)
    stale = [info.key for info in store.list(prefix)
             if info.key != pointer_key and not info.key.startswith(set_prefix)]
    for key in stale:
        store.delete(key)
    return len(stale)


def _pointer(store: Store, prefix: str) -> dict[str, Any] | None:
    try:
        pointer = get_json(store, layout.checkpoint_pointer_key(prefix))
    except ObjectNotFound:
        return None
    except ValueError as error:  # json.JSONDecodeError: a damaged pointer names no set
        raise TornCheckpoint(f"pointer is not JSON ({error})") from error
    if not isinstance(pointer, dict):
        raise TornCheckpoint("pointer is not a JSON object")
    files = pointer.get("files")
    if (not isinstance(pointer.get("set"), str) or not _SET_ID.fullmatch(pointer["set"])
            or not isinstance(files, list)
            or not all(isinstance(f, dict) and {"name", "bytes", "sha256"} <= set(f)
                       for f in files)):
        raise TornCheckpoint("pointer does not name a set of files")
    return pointer


def _fetch_set(store: Store, set_prefix: str, files: list[dict[str, Any]],
               staging: Path) -> None:
    for entry in files:
        # Names come from the bucket: each must stay inside the staging folder.
        target = confined(staging, entry["name"])
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.download_file(set_prefix + entry["name"], target)
        except ObjectNotFound as error:
            raise TornCheckpoint(f"{entry['name']} is missing") from error
        if (target.stat().st_size != entry["bytes"]
                or _sha256_file(target) != entry["sha256"]):
            raise TornCheckpoint(f"{entry['name']} does not match the pointer")


def download_checkpoint(store: Store, prefix: str, folder: Path) -> int:
    """The last complete checkpoint set under ``prefix`` into ``folder``; returns its file
    count, 0 when there is none to resume from.

    Only the set the pointer names is used, and only when every file matches the pointer's
    size and SHA-256; anything else (a set from a crash mid-upload, a damaged pointer or
    file, a checkpoint written before pointers existed) is ignored with a warning, and
    ``folder`` is left as it was, so training starts over rather than from torn files."""
    folder = Path(folder)
    try:
        pointer = _pointer(store, prefix)
        if pointer is None:
            stray = sum(1 for _ in store.list(prefix))
            if stray:
                log.warning("%d checkpoint objects under %s but no %s: an unfinished upload "
                            "(or an older format), ignored; training starts over", stray,
                            prefix, layout.CHECKPOINT_POINTER_FILE)
            return 0
        set_prefix = layout.checkpoint_set_prefix(prefix, pointer["set"])
        staging = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=folder.parent))
        try:
            _fetch_set(store, set_prefix, pointer["files"], staging)
            # The set is good: anything else is an upload cut short (or a prune a killed run
            # never finished), and a resume that trains no further epoch would keep it.
            pruned = _prune(store, prefix, set_prefix)
            if pruned:
                log.warning("%d checkpoint objects under %s were not in the last complete set "
                            "(an upload cut short): ignored and deleted; resuming from epoch "
                            "%s", pruned, prefix, pointer.get("epoch"))
            for entry in pointer["files"]:
                target = confined(folder, entry["name"])
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(staging / entry["name"], target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except (TornCheckpoint, UnsafePath) as error:
        log.warning("checkpoint under %s is not usable (%s); training starts over", prefix,
                    error)
        return 0
    return len(pointer["files"])
