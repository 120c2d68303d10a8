"""Train a cell classifier: seeded, time-boxed, resumable, with a warm-up + cosine schedule.

``train`` writes a checkpoint after every epoch into ``checkpoint_dir``
(:mod:`malaria.model.checkpoints`). A caller (the Prefect task) uploads the folder to the
bucket after each epoch through ``on_epoch`` and downloads it before a retry;
``train(..., resume=True)`` then continues from the last completed epoch, with the same
learning-rate curve and early-stopping state, instead of starting over.

The model code is backend-neutral Keras: TensorFlow (what the project installs and serves
with) or JAX (``KERAS_BACKEND=jax``, for GPU machines without TensorFlow). Only the input
pipeline here and the device handling in :mod:`malaria.model.precision` differ.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from malaria.dataset.pipeline import ArraySet, class_weights, make_dataset, sample_weights
from malaria.model.architectures import build_model
from malaria.model.checkpoints import (
    BEST_WEIGHTS,
    LAST_MODEL,
    fresh_state,
    resumable_state,
    save_model,
    save_weights,
    write_state,
)
from malaria.model.config import MONITORS, TrainConfig
from malaria.model.precision import (
    backend,
    distribution_strategy,
    dtype_policy,
    gpus,
    reported_cpu_flags,
    resolve_precision,
)
from malaria.model.schedule import decay_progress, learning_rate_at

Arrays = ArraySet | tuple[np.ndarray, np.ndarray]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: keras.Model
    history: list[dict[str, float]]
    epochs_run: int  # epochs completed in total, earlier interrupted runs included
    seconds: float  # wall time of this call
    images_per_s: float  # training images per second of training steps (validation excluded)
    resumed_from_epoch: int  # 0 for a fresh start
    best_epoch: int = 0  # 1-based epoch whose weights the model holds
    precision_policy: str = "float32"
    stopped: str = "epochs"  # "epochs", "early_stopping" or "time_budget"
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The training summary every caller records (model card, registry, benchmark)."""
        return {"epochs_run": self.epochs_run, "best_epoch": self.best_epoch,
                "planned_epochs": self.extra.get("planned_epochs"), "stopped": self.stopped,
                "seconds": round(self.seconds, 1), "images_per_s": round(self.images_per_s, 1),
                "precision_policy": self.precision_policy,
                "resumed_from_epoch": self.resumed_from_epoch,
                "backend": backend(), "cpu_flags": reported_cpu_flags()}


# ---------------------------------------------------------------------------- callbacks


class _Trainer(keras.callbacks.Callback):
    """Learning rate per step, checkpoint per epoch, early stopping, time budget."""

    def __init__(self, config: TrainConfig, state: dict[str, Any], steps_per_epoch: int,
                 checkpoint_dir: Path, on_epoch: Callable[[int, dict], None] | None,
                 started: float) -> None:
        super().__init__()
        self.config = config
        self.state = state
        self.steps_per_epoch = steps_per_epoch
        self.warmup_steps = round(config.warmup_epochs * steps_per_epoch)
        self.checkpoint_dir = checkpoint_dir
        self.on_epoch = on_epoch
        self.started = started  # time.perf_counter() when this call began
        self.step = 0
        self.epoch_start = 0.0
        self.last_batch_end = 0.0
        self.train_seconds = 0.0
        self.train_images = 0
        self.epoch_seconds: list[float] = []
        # Each epoch's time without its first batch (scaled up to all batches): the first
        # batch of a call pays for tracing or XLA compilation (about 30 s on JAX on a GPU),
        # which must not make a time budget plan one epoch.
        self.steady_seconds: list[float] = []
        self.first_batch_end = 0.0
        self.batch_seconds = 0.0  # the last batch's
        self.batches = 0  # batches run in the current epoch
        # From an epoch's last batch to the next epoch's start: validation, checkpoints and
        # the other callbacks, which a hard stop inside an epoch must leave time for.
        self.tail_seconds: list[float] = []
        self.cut_short = False  # this call's last epoch was stopped by the budget
        self.stopped = "epochs"

    @property
    def budget_seconds(self) -> float | None:
        minutes = self.config.max_minutes
        return None if minutes is None else minutes * 60.0

    def elapsed(self) -> float:
        return self.state["seconds"] + time.perf_counter() - self.started

    def _anchor(self) -> tuple[int, float] | None:
        anchor = self.state.get("decay_anchor")
        return (int(anchor[0]), float(anchor[1])) if anchor else None

    def _planned_steps(self) -> int:
        return self.state["planned_epochs"] * self.steps_per_epoch

    def _decay_progress(self) -> float:
        """How far the cosine decay is now, under the current plan and anchor."""
        return decay_progress(self.step, self._planned_steps(), self.warmup_steps,
                              self._anchor())

    def _set_lr(self) -> None:
        lr = learning_rate_at(self.step, self._planned_steps(), self.warmup_steps, self.config,
                              self._anchor())
        # JAX's fit loop carries the variables in a state tuple between steps; sync them
        # back first, or the next step would run with the old rate.
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
        self.model.optimizer.learning_rate.assign(lr)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.step = int(self.state["epoch"]) * self.steps_per_epoch

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_start = time.perf_counter()
        if self.epoch_seconds:  # an earlier epoch of this call ended at last_batch_end
            self.tail_seconds.append(self.epoch_start - self.last_batch_end)
        self.last_batch_end = self.epoch_start
        self.batches = 0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._set_lr()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step += 1
        self.batches += 1
        now = time.perf_counter()
        self.batch_seconds, self.last_batch_end = now - self.last_batch_end, now
        if batch == 0:
            self.first_batch_end = self.last_batch_end
        if self._out_of_time():
            self.cut_short = True
            self.model.stop_training = True

    def _out_of_time(self) -> bool:
        """The hard stop inside an epoch: the planner plans whole epochs from their past
        speed, but a shared machine can slow down in the last one (a measured fold ran 9 s
        over 900). Stop when one more batch, validation and the checkpoint would pass the
        budget. Never in a run's first epoch: a budget too small for one epoch trains one
        whole epoch, as before."""
        budget = self.budget_seconds
        if budget is None or self.state["epoch"] < 1:
            return False
        tail = max(self.tail_seconds, default=0.0)
        return self.elapsed() + self.batch_seconds + tail >= budget

    def _replan(self) -> None:
        """Fit the planned number of epochs (and so the cosine curve) into the budget."""
        budget = self.budget_seconds
        if budget is None or not self.epoch_seconds:
            return
        # The first epoch of a call pays for tracing; later ones are the steady state.
        # The slower of the mean and the last epoch: on a shared machine an epoch can
        # suddenly take twice as long, and overrunning the budget is worse than one epoch
        # fewer.
        recent = self.epoch_seconds[1:] or self.steady_seconds[:1] or self.epoch_seconds
        per_epoch = max(float(np.mean(recent)), recent[-1])
        remaining = budget - self.elapsed()
        fits = self.state["epoch"] + max(0, int(remaining // per_epoch))
        planned = max(self.state["epoch"], min(self.config.epochs, fits))
        if planned != self.state["planned_epochs"] and self.step > self.warmup_steps:
            # The decay goes on from where it is, over the new number of steps.
            self.state["decay_anchor"] = [self.step, self._decay_progress()]
        self.state["planned_epochs"] = planned

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        train_time = self.last_batch_end - self.epoch_start
        self.train_seconds += train_time
        # A cut epoch trained on its first batches only (the last batch may be short).
        images = min(self.state["train_images_per_epoch"], round(
            self.state["train_images_per_epoch"] * self.batches / self.steps_per_epoch))
        self.train_images += images
        self.epoch_seconds.append(now - self.epoch_start)
        if self.steps_per_epoch > 1 and self.first_batch_end > self.epoch_start:
            batches = (self.last_batch_end - self.first_batch_end) * (
                self.steps_per_epoch / (self.steps_per_epoch - 1))
            self.steady_seconds.append(batches + now - self.last_batch_end)
        else:
            self.steady_seconds.append(now - self.epoch_start)
        logs = dict(logs or {})
        record = {k: float(v) for k, v in logs.items() if np.isscalar(v)}
        record.update(epoch=epoch + 1, learning_rate=float(
            np.asarray(self.model.optimizer.learning_rate)), epoch_seconds=now - self.epoch_start,
            images_per_s=images / max(train_time, 1e-9), batches=float(self.batches))
        state = self.state
        state["epoch"] = epoch + 1
        state["history"].append(record)
        score = _monitored_score(record, self.config.monitor)
        best = state.get("best_score", -state.get("best_val_loss", math.inf))
        if score > best + 1e-6:
            state.update(best_score=score, best_epoch=epoch + 1, wait=0)
            if "val_loss" in record:
                state["best_val_loss"] = record["val_loss"]
            save_weights(self.model, self.checkpoint_dir / BEST_WEIGHTS)
        else:
            state["wait"] += 1
        self._replan()
        save_model(self.model, self.checkpoint_dir / LAST_MODEL)
        state["seconds"] = self.elapsed()
        self.started = time.perf_counter()
        write_state(self.checkpoint_dir, state)
        patience = self.config.patience
        if self.cut_short:
            self.stopped = "time_budget"
            self.model.stop_training = True
        elif patience is not None and state["wait"] >= patience:
            self.stopped = "early_stopping"
            self.model.stop_training = True
        elif state["epoch"] >= state["planned_epochs"]:
            if state["planned_epochs"] < self.config.epochs:
                self.stopped = "time_budget"
            self.model.stop_training = True
        if self.on_epoch is not None:
            self.on_epoch(epoch + 1, record)


def _monitored_score(record: dict[str, float], monitor: str) -> float:
    """Higher is better: minus the loss, or the AUC (training metrics without a val set)."""
    if monitor == "val_loss":
        return -record.get("val_loss", record.get("loss", math.inf))
    if monitor == "val_auc":
        return record.get("val_auc", record.get("auc", -math.inf))
    raise ValueError(f"monitor must be one of {MONITORS}, got {monitor!r}")


# ---------------------------------------------------------------------------------- train


def _as_arrays(data: Arrays) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, ArraySet):
        return data.images, data.labels
    images, labels = data
    return images, np.asarray(labels, dtype=np.float32)


def _jit(config: TrainConfig) -> bool:
    if config.xla != "auto":
        return bool(config.xla)
    # JAX runs nothing eagerly worth having; TensorFlow's XLA convolutions lose on CPUs.
    return backend() == "jax" or (backend() == "tensorflow" and bool(gpus()))


def _allow_xla_augmentation(model: keras.Model) -> None:
    """Keras marks its rotation, zoom and translation layers as not XLA-safe because
    TensorFlow's projective-transform kernel is not; under JAX they are built from
    ``map_coordinates``, which compiles, and an uncompiled JAX model trains tens of times
    slower. Only ever called for the JAX backend."""
    geometric = (keras.layers.RandomRotation, keras.layers.RandomZoom,
                 keras.layers.RandomTranslation)
    for layer in model._flatten_layers():
        if isinstance(layer, geometric):
            layer.supports_jit = True


def _fit_inputs(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                y_val: np.ndarray, *, batch: int, seed: int,
                weights: dict[int, float] | None) -> dict[str, Any]:
    """``model.fit`` arguments for the data: a tf.data pipeline under TensorFlow, the arrays
    themselves (Keras batches and shuffles them) under other backends."""
    if backend() == "tensorflow":
        return {"x": make_dataset(x_train, y_train, batch_size=batch, shuffle=True, seed=seed,
                                  weights=weights),
                "validation_data": make_dataset(x_val, y_val, batch_size=max(batch, 256),
                                                shuffle=False),
                "shuffle": False}
    sample_weight = sample_weights(y_train, weights) if weights else None
    return {"x": x_train, "y": y_train, "sample_weight": sample_weight, "batch_size": batch,
            "shuffle": True, "validation_data": (x_val, y_val),
            "validation_batch_size": max(batch, 256)}


def _compile(model: keras.Model, config: TrainConfig, jit: bool) -> None:
    if jit and backend() == "jax":
        _allow_xla_augmentation(model)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=config.learning_rate,
                                         weight_decay=config.weight_decay),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=config.label_smoothing),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
        jit_compile=jit,
    )



def _resumed_model(checkpoint_dir: Path, jit: bool) -> keras.Model | None:
    """The last checkpoint's model, or None when it cannot be loaded (written by an older
    version of the trainer, or damaged): training then starts afresh instead of failing
    every retry."""
    from keras.src.saving.serialization_lib import SafeModeScope

    try:
        # The checkpoint came back from the bucket: load it as strictly as a served model
        # (an ambient enable_unsafe_deserialization() must not apply).
        with SafeModeScope(True):
            model = keras.models.load_model(checkpoint_dir / LAST_MODEL, safe_mode=True)
    except Exception as error:  # Keras raises TypeError/ValueError/OSError, version-dependent
        log.warning("checkpoint in %s cannot be loaded (%s); training from the start",
                    checkpoint_dir, str(error).splitlines()[0] if str(error) else error)
        return None
    if jit and backend() == "jax":
        _allow_xla_augmentation(model)
        model.jit_compile = True  # load_model compiled it before XLA was allowed
    return model


def train(config: TrainConfig, train_arrays: Arrays, val_arrays: Arrays, *,
          checkpoint_dir: Path, on_epoch: Callable[[int, dict], None] | None = None,
          resume: bool = True,
          callbacks: Sequence[keras.callbacks.Callback] = ()) -> TrainResult:
    """Train ``config.arch`` on uint8 images, checkpointing every epoch into ``checkpoint_dir``.

    Stops at ``config.epochs``, when the validation loss has not improved for ``patience``
    epochs, or when the next epoch would overrun ``max_minutes`` (and inside an epoch, after
    the first, when the machine slowed down so that it would); the returned model holds
    the weights of the best validation epoch. ``on_epoch(epoch, metrics)`` runs after each
    epoch's checkpoint is complete (1-based epoch). With ``resume=True`` and a checkpoint of
    the same run in ``checkpoint_dir``, training continues after its last epoch.
    ``callbacks`` run after the trainer's own, once each epoch's checkpoint is written.
    """
    started = time.perf_counter()
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train = _as_arrays(train_arrays)
    x_val, y_val = _as_arrays(val_arrays)
    size = config.resolved_input_size()
    if x_train.shape[1:] != (size, size, 3):
        raise ValueError(f"train images are {x_train.shape[1:]}, {config.arch} expects "
                         f"({size}, {size}, 3)")

    saved = resumable_state(checkpoint_dir, config) if resume else None
    policy = resolve_precision(config)
    jit = _jit(config)
    strategy = distribution_strategy()
    with strategy.scope():
        model = _resumed_model(checkpoint_dir, jit) if saved is not None else None
        if model is None:
            saved = None
        state = saved if saved is not None else fresh_state(config)
        resumed_from = int(saved["epoch"]) if saved is not None else 0
        keras.utils.set_random_seed(config.seed + resumed_from)
        if model is None:
            with dtype_policy(policy):
                model = build_model(config.arch, size, augment=config.augment,
                                    dropout_after_sigmoid=config.dropout_after_sigmoid,
                                    seed=config.seed)
            _compile(model, config, jit)

    batch = config.batch_size * strategy.num_replicas_in_sync
    weights = class_weights(y_train) if config.balance_classes else None
    fit_inputs = _fit_inputs(x_train, y_train, x_val, y_val, batch=batch,
                             seed=config.seed + resumed_from, weights=weights)
    steps = math.ceil(len(y_train) / batch)
    state["train_images_per_epoch"] = len(y_train)
    # Time already spent in this call (building, probing precision) counts against the budget.
    trainer = _Trainer(config, state, steps, checkpoint_dir, on_epoch, started)

    all_callbacks: list[keras.callbacks.Callback] = [trainer, *callbacks]
    if state["epoch"] < min(state["planned_epochs"], config.epochs):
        model.fit(**fit_inputs, epochs=config.epochs, initial_epoch=state["epoch"],
                  callbacks=all_callbacks, verbose=0)
    else:
        trainer.stopped = "epochs"

    best = checkpoint_dir / BEST_WEIGHTS
    if best.exists() and state["best_epoch"]:
        model.load_weights(best)
    seconds = time.perf_counter() - started
    return TrainResult(
        model=model,
        history=list(state["history"]),
        epochs_run=int(state["epoch"]),
        seconds=seconds,
        images_per_s=trainer.train_images / trainer.train_seconds if trainer.train_seconds else 0.0,
        resumed_from_epoch=resumed_from,
        best_epoch=int(state["best_epoch"]),
        precision_policy=policy,
        stopped=trainer.stopped,
        extra={"planned_epochs": state["planned_epochs"], "class_weights": weights,
               "total_seconds": state["seconds"]},
    )
