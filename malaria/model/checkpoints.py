"""The files a training run leaves behind: its per-epoch checkpoint folder, its mirror in the
bucket, and the serving model.

A checkpoint folder holds:

``last.keras``        the model with its optimizer state (moments, step counter)
``best.weights.h5``   the weights of the best validation epoch so far (``TrainConfig.monitor``)
``state.json``        epochs done, best-so-far, early-stopping counter, history, seconds
                      spent, the planned number of epochs; written last, so it only ever
                      points at complete files
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras

from malaria.core import layout
from malaria.io.atomic import save_atomic, write_atomic
from malaria.io.localpath import UnsafePath, confined
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
