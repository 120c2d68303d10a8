"""Train a cell classifier: seeded, time-boxed, resumable, with a warm-up + cosine schedule.

``train`` writes a checkpoint after every epoch into ``checkpoint_dir``:

``last.keras``        the model with its optimizer state (moments, step counter)
``best.weights.h5``   the weights of the best validation epoch so far (``TrainConfig.monitor``)
``state.json``        epochs done, best-so-far, early-stopping counter, history, seconds
                      spent, the planned number of epochs; written last, so it only ever
                      points at complete files

A caller (the Prefect task) uploads the folder to the bucket after each epoch through
``on_epoch`` and downloads it before a retry; ``train(..., resume=True)`` then continues
from the last completed epoch, with the same learning-rate curve and early-stopping state,
instead of starting over.

TensorFlow is the backend the project installs and serves with. The module also trains under
Keras's JAX backend (``KERAS_BACKEND=jax``) for GPU machines where JAX is installed and
TensorFlow is not: the model code is backend-neutral Keras, and only the input pipeline,
multi-GPU strategy and the inference wrapper differ (see :func:`gpus`, :func:`train`,
:func:`predict_probabilities`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from malaria.dataset.records import ArraySet, class_weights, make_dataset, sample_weights
from malaria.model.architectures import build_model, default_input_size

LAST_MODEL = "last.keras"
BEST_WEIGHTS = "best.weights.h5"
STATE = "state.json"
AVERAGE_WEIGHTS = "average.npz"

Arrays = ArraySet | tuple[np.ndarray, np.ndarray]
MONITORS = ("val_loss", "val_auc")


@dataclass
class TrainConfig:
    arch: str = "cellnet"
    input_size: int | None = None  # None: the architecture's default
    epochs: int = 30  # upper bound; a time budget may plan fewer
    max_minutes: float | None = None  # wall-clock budget for this training, resumes included
    batch_size: int = 128
    learning_rate: float = 4e-3  # peak, reached at the end of warm-up
    warmup_epochs: float = 1.0
    min_lr_fraction: float = 0.02  # cosine floor, as a fraction of the peak
    schedule: str = "cosine"  # "cosine" (warm-up, then cosine decay) or "constant"
    weight_decay: float = 1e-4  # AdamW, decoupled
    seed: int = 0
    patience: int | None = 8  # epochs without a better monitored value; None: never stop
    # What "best epoch" means, for restore-best and early stopping: "val_loss" (lowest) or
    # "val_auc" (highest). With label smoothing the loss also rewards calibration, so the two
    # can disagree about which epoch ranks cells best.
    monitor: str = "val_loss"
    # Exponential moving average of the weights (Adam's ``use_ema``); validation, the
    # checkpoints and the returned model then use the averaged weights. None: off.
    ema_momentum: float | None = None
    mixed_precision: str = "auto"  # "auto", "float32", "mixed_bfloat16", "mixed_float16"
    xla: bool | str = "auto"  # "auto": on GPUs only (XLA convolutions lose on CPUs)
    label_smoothing: float = 0.1  # robustness to the known label noise
    # Fraction of each training batch with the highest loss left out of the gradient
    # (loss truncation): the dataset's known mislabelled cells are the ones the model keeps
    # getting confidently "wrong", so they stop pulling the weights. 0: off.
    drop_highest_loss: float = 0.0
    # Mixup (blend each batch with a shuffled copy, labels alike) with Beta(alpha, alpha)
    # fractions; 0: off. TensorFlow's input pipeline only.
    mixup_alpha: float = 0.0
    # Weight averaging over the tail of the decay (stochastic weight averaging): the weights
    # at the end of every epoch in the last ``average_tail`` of the cosine (0.25: its last
    # quarter), BatchNorm statistics included, are averaged, and the average is the model
    # returned instead of the best epoch. 0: off.
    average_tail: float = 0.0
    augment: bool = True
    balance_classes: bool = True  # class weights when the classes are unbalanced
    dropout_after_sigmoid: bool = False  # the source article's mistake, for reproduction

    def __post_init__(self) -> None:
        # Refused here rather than after the first epoch, when the value is first read.
        choices = {"monitor": MONITORS, "schedule": ("cosine", "constant"),
                   "mixed_precision": ("auto", "float32", "mixed_bfloat16", "mixed_float16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.average_tail <= 1.0:
            raise ValueError(f"average_tail must be in [0, 1], got {self.average_tail}")
        if not 0.0 <= self.drop_highest_loss < 0.5:
            raise ValueError(f"drop_highest_loss must be in [0, 0.5), got {self.drop_highest_loss}")

    def resolved_input_size(self) -> int:
        return self.input_size or default_input_size(self.arch)


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


# ----------------------------------------------------------------------------- hardware


def backend() -> str:
    return keras.backend.backend()


def gpus() -> list[Any]:
    """The GPUs the Keras backend in use can train on."""
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        return tf.config.list_physical_devices("GPU")
    if name == "jax":
        import jax

        return [d for d in jax.devices() if d.platform == "gpu"]
    if name == "torch":
        import torch

        return list(range(torch.cuda.device_count()))
    return []


def cpu_has_bf16() -> bool:
    """AVX512_BF16 or AMX: oneDNN then runs bfloat16 convolutions natively."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_has_bf16(device: Any) -> bool:
    """Compute capability 8.0 or later (Ampere, Hopper, ...): bfloat16 tensor cores."""
    capability: Any = getattr(device, "compute_capability", None)  # a JAX device: "9.0"
    if capability is None and backend() == "tensorflow":
        import tensorflow as tf

        capability = tf.config.experimental.get_device_details(device).get(
            "compute_capability")  # (9, 0)
    if capability is None:
        return False
    major = int(str(capability).split(".")[0]) if isinstance(capability, str) else capability[0]
    return int(major) >= 8


_POLICY_CACHE: dict[tuple[str, int, int], str] = {}


def _probe_step(config: TrainConfig, policy: str) -> Callable[[], float]:
    """A function that times one training step of this architecture under ``policy``."""
    size = config.resolved_input_size()
    with dtype_policy(policy):
        model = build_model(config.arch, size, augment=config.augment, seed=config.seed)
    model.compile(keras.optimizers.AdamW(1e-3), keras.losses.BinaryCrossentropy())
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 2, (config.batch_size, 1)).astype(np.float32)
    for _ in range(2):  # tracing and oneDNN primitive creation
        model.train_on_batch(x, y)

    def step() -> float:
        start = time.perf_counter()
        model.train_on_batch(x, y)
        return time.perf_counter() - start

    return step


def resolve_precision(config: TrainConfig, *, probe_steps: int = 6) -> str:
    """The global dtype policy to train with.

    ``auto``: on a GPU, ``mixed_bfloat16`` where its tensor cores take bfloat16 (compute
    capability 8.0 and up: same speed as float16, float32's range, so no loss scaling) and
    ``mixed_float16`` on older ones; on a CPU with native bfloat16
    (AVX512_BF16/AMX) ``mixed_bfloat16`` only if a few timed training steps of this very
    architecture and input size run faster than float32 (oneDNN's bf16 kernels do not win
    for every layer shape); ``float32`` otherwise.
    """
    if config.mixed_precision != "auto":
        return config.mixed_precision
    found = gpus()
    if found:
        return "mixed_bfloat16" if all(gpu_has_bf16(g) for g in found) else "mixed_float16"
    if not cpu_has_bf16():
        return "float32"
    key = (config.arch, config.resolved_input_size(), config.batch_size)
    if key not in _POLICY_CACHE:
        fp32 = _probe_step(config, "float32")
        bf16 = _probe_step(config, "mixed_bfloat16")
        # Interleaved, fastest of each: on a shared machine other load comes and goes, and
        # the minimum is the least disturbed estimate of a step's cost.
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(probe_steps):
            times["fp32"].append(fp32())
            times["bf16"].append(bf16())
        faster = min(times["bf16"]) * 1.1 < min(times["fp32"])
        _POLICY_CACHE[key] = "mixed_bfloat16" if faster else "float32"
    return _POLICY_CACHE[key]


class dtype_policy:
    """Set the global Keras dtype policy while building, then put the old one back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.previous: Any = None

    def __enter__(self) -> None:
        self.previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.name)

    def __exit__(self, *exc: object) -> None:
        keras.mixed_precision.set_global_policy(self.previous)


class _OneDevice:
    """The part of ``tf.distribute.Strategy`` that ``train`` uses, for other backends."""

    num_replicas_in_sync = 1

    def scope(self) -> AbstractContextManager[None]:
        return nullcontext()


def distribution_strategy() -> Any:
    """MirroredStrategy across several visible GPUs; the default strategy otherwise.
    Other Keras backends train on one device."""
    if backend() != "tensorflow":
        return _OneDevice()
    import tensorflow as tf

    if len(gpus()) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


# ------------------------------------------------------------------------------ schedule


def learning_rate_at(step: int, total_steps: int, warmup_steps: int, config: TrainConfig,
                     anchor: tuple[int, float] | None = None) -> float:
    """Linear warm-up to the peak, then cosine decay to ``min_lr_fraction`` of it.

    Warm-up keeps the first steps of Adam (with BN statistics still settling) from
    overshooting; cosine decay lets a short, time-boxed run finish at a low learning rate,
    where most of the final accuracy is gained.

    ``anchor = (step0, progress0)``: the decay had reached ``progress0`` (0 to 1) at
    ``step0`` under an earlier plan, and goes on from there to 1 at ``total_steps``. A time
    budget re-plans ``total_steps`` as epochs speed up or slow down; going on from where the
    decay is keeps the rate from ever stepping back up (or jumping down) at a re-plan.
    """
    peak = config.learning_rate
    if config.schedule == "constant":
        return peak
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = decay_progress(step, total_steps, warmup_steps, anchor)
    floor = config.min_lr_fraction
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def decay_progress(step: int, total_steps: int, warmup_steps: int,
                   anchor: tuple[int, float] | None = None) -> float:
    """How far (0 to 1) the cosine decay of :func:`learning_rate_at` is at ``step``."""
    if step <= warmup_steps:
        return 0.0
    start, done = anchor if anchor is not None else (warmup_steps, 0.0)
    return min(1.0, done + (1.0 - done) * max(0, step - start) / max(1, total_steps - start))


# ---------------------------------------------------------------------------- callbacks


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_model(model: keras.Model, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    model.save(tmp)
    os.replace(tmp, path)


def _save_weights(model: keras.Model, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.stem.split('.')[0]}.weights.h5")
    model.save_weights(tmp)
    os.replace(tmp, path)


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
        self.stopped = "epochs"
        self._average: list[np.ndarray] | None = None  # tail average so far (average_tail)

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
        self.last_batch_end = self.epoch_start

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._set_lr()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step += 1
        self.last_batch_end = time.perf_counter()

    def _replan(self) -> None:
        """Fit the planned number of epochs (and so the cosine curve) into the budget."""
        budget = self.budget_seconds
        if budget is None or not self.epoch_seconds:
            return
        # The first epoch of a call pays for tracing; later ones are the steady state.
        # The slower of the mean and the last epoch: on a shared machine an epoch can
        # suddenly take twice as long, and overrunning the budget is worse than one epoch
        # fewer.
        recent = self.epoch_seconds[1:] or self.epoch_seconds
        per_epoch = max(float(np.mean(recent)), recent[-1])
        remaining = budget - self.elapsed()
        fits = self.state["epoch"] + max(0, int(remaining // per_epoch))
        planned = max(self.state["epoch"], min(self.config.epochs, fits))
        if planned != self.state["planned_epochs"] and self.step > self.warmup_steps:
            # The decay goes on from where it is, over the new number of steps.
            self.state["decay_anchor"] = [self.step, self._decay_progress()]
        self.state["planned_epochs"] = planned

    def _average_tail(self) -> None:
        """Fold this epoch's weights into the running average once the decay is in its
        tail; the average is written beside the checkpoint so that a resumed run keeps it."""
        if self.config.average_tail <= 0:
            return
        if self._decay_progress() < 1.0 - self.config.average_tail - 1e-9:
            return
        path = self.checkpoint_dir / AVERAGE_WEIGHTS
        count = int(self.state.get("averaged_epochs", 0))
        weights = [np.asarray(w, dtype=np.float64) for w in self.model.get_weights()]
        if count and self._average is None and path.exists():  # resumed: read it back
            with np.load(path) as saved:
                self._average = [saved[f"w{i}"] for i in range(len(weights))]
        if count and self._average is not None:
            weights = [a + (w - a) / (count + 1)
                       for a, w in zip(self._average, weights, strict=True)]
        self._average = weights
        tmp = path.with_name(".tmp-" + path.name)
        with open(tmp, "wb") as handle:
            np.savez(handle, **{f"w{i}": w for i, w in enumerate(weights)})
        os.replace(tmp, path)
        self.state["averaged_epochs"] = count + 1

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        train_time = self.last_batch_end - self.epoch_start
        self.train_seconds += train_time
        self.train_images += self.state["train_images_per_epoch"]
        self.epoch_seconds.append(now - self.epoch_start)
        logs = dict(logs or {})
        record = {k: float(v) for k, v in logs.items() if np.isscalar(v)}
        record.update(epoch=epoch + 1, learning_rate=float(
            np.asarray(self.model.optimizer.learning_rate)), epoch_seconds=now - self.epoch_start,
            images_per_s=self.state["train_images_per_epoch"] / max(train_time, 1e-9))
        state = self.state
        state["epoch"] = epoch + 1
        state["history"].append(record)
        score = _monitored_score(record, self.config.monitor)
        best = state.get("best_score", -state.get("best_val_loss", math.inf))
        if score > best + 1e-6:
            state.update(best_score=score, best_epoch=epoch + 1, wait=0)
            if "val_loss" in record:
                state["best_val_loss"] = record["val_loss"]
            _save_weights(self.model, self.checkpoint_dir / BEST_WEIGHTS)
        else:
            state["wait"] += 1
        self._average_tail()
        self._replan()
        _save_model(self.model, self.checkpoint_dir / LAST_MODEL)
        state["seconds"] = self.elapsed()
        self.started = time.perf_counter()
        _atomic_write_text(self.checkpoint_dir / STATE, json.dumps(state, indent=1))
        patience = self.config.patience
        if patience is not None and state["wait"] >= patience:
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
    raise ValueError(f"monitor must be 'val_loss' or 'val_auc', got {monitor!r}")


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
                weights: dict[int, float] | None, mixup_alpha: float = 0.0) -> dict[str, Any]:
    """``model.fit`` arguments for the data: a tf.data pipeline under TensorFlow, the arrays
    themselves (Keras batches and shuffles them) under other backends."""
    if backend() == "tensorflow":
        return {"x": make_dataset(x_train, y_train, batch_size=batch, shuffle=True, seed=seed,
                                  weights=weights, mixup_alpha=mixup_alpha),
                "validation_data": make_dataset(x_val, y_val, batch_size=max(batch, 256),
                                                shuffle=False),
                "shuffle": False}
    if mixup_alpha > 0:
        raise ValueError("mixup needs TensorFlow's input pipeline (KERAS_BACKEND=tensorflow)")
    sample_weight = sample_weights(y_train, weights) if weights else None
    return {"x": x_train, "y": y_train, "sample_weight": sample_weight, "batch_size": batch,
            "shuffle": True, "validation_data": (x_val, y_val),
            "validation_batch_size": max(batch, 256)}


def _compile(model: keras.Model, config: TrainConfig, jit: bool) -> None:
    if jit and backend() == "jax":
        _allow_xla_augmentation(model)
    ema = config.ema_momentum is not None
    optimizer = keras.optimizers.AdamW(learning_rate=config.learning_rate,
                                       weight_decay=config.weight_decay, use_ema=ema,
                                       ema_momentum=config.ema_momentum if ema else 0.99)
    model.compile(
        optimizer=optimizer,
        loss=TruncatedBinaryCrossentropy(label_smoothing=config.label_smoothing,
                                         drop_fraction=config.drop_highest_loss),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
        jit_compile=jit,
    )


@keras.saving.register_keras_serializable(package="malaria")
class TruncatedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy (with label smoothing) that leaves out of each batch the
    ``drop_fraction`` of samples with the highest loss.

    With ``drop_fraction=0`` it is ``keras.losses.BinaryCrossentropy``. The left-out samples
    get a loss of 0 (so no gradient); the batch mean still divides by the whole batch, a
    constant factor the learning rate absorbs. Written with ``keras.ops`` only, so it runs
    under every backend, and the cut is found by sorting, so a short last batch works too.
    """

    def __init__(self, label_smoothing: float = 0.0, drop_fraction: float = 0.0,
                 name: str = "truncated_binary_crossentropy", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)
        self.drop_fraction = float(drop_fraction)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        ops = keras.ops
        # One probability per cell; labels may come as (n,) or (n, 1).
        y_true, y_pred = ops.reshape(y_true, (-1, 1)), ops.reshape(y_pred, (-1, 1))
        losses = keras.losses.binary_crossentropy(y_true, y_pred,
                                                  label_smoothing=self.label_smoothing)
        if self.drop_fraction <= 0.0:
            return losses
        n = ops.shape(losses)[0]
        keep = ops.cast(ops.ceil(ops.cast(n, "float32") * (1.0 - self.drop_fraction)),
                        "int32")
        # The keep-th smallest loss is the cut: everything above it is left out.
        cut = ops.take(ops.sort(losses), keep - 1)
        return ops.where(losses <= cut, losses, ops.zeros_like(losses))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing,
                "drop_fraction": self.drop_fraction}


def _fresh_state(config: TrainConfig) -> dict[str, Any]:
    return {"epoch": 0, "best_val_loss": math.inf, "best_score": -math.inf, "best_epoch": 0,
            "wait": 0, "history": [],
            "seconds": 0.0, "planned_epochs": config.epochs, "config": asdict(config)}


def _same_run(saved: dict[str, Any], config: TrainConfig) -> bool:
    keys = ("arch", "input_size", "batch_size", "seed", "augment")
    return all(saved.get("config", {}).get(k) == asdict(config).get(k) for k in keys)


def train(config: TrainConfig, train_arrays: Arrays, val_arrays: Arrays, *,
          checkpoint_dir: Path, on_epoch: Callable[[int, dict], None] | None = None,
          resume: bool = True,
          callbacks: Sequence[keras.callbacks.Callback] = ()) -> TrainResult:
    """Train ``config.arch`` on uint8 images, checkpointing every epoch into ``checkpoint_dir``.

    Stops at ``config.epochs``, when the validation loss has not improved for ``patience``
    epochs, or when the next epoch would overrun ``max_minutes``; the returned model holds
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

    state = _fresh_state(config)
    state_path = checkpoint_dir / STATE
    resumed_from = 0
    if resume and state_path.exists() and (checkpoint_dir / LAST_MODEL).exists():
        saved = json.loads(state_path.read_text())
        if _same_run(saved, config):
            state = saved
            resumed_from = int(saved["epoch"])

    keras.utils.set_random_seed(config.seed + resumed_from)
    policy = resolve_precision(config)
    jit = _jit(config)
    strategy = distribution_strategy()
    with strategy.scope():
        if resumed_from:
            model = keras.models.load_model(checkpoint_dir / LAST_MODEL)
            if jit and backend() == "jax":
                _allow_xla_augmentation(model)
                model.jit_compile = True  # load_model compiled it before XLA was allowed
        else:
            with dtype_policy(policy):
                model = build_model(config.arch, size, augment=config.augment,
                                    dropout_after_sigmoid=config.dropout_after_sigmoid,
                                    seed=config.seed)
            _compile(model, config, jit)

    batch = config.batch_size * strategy.num_replicas_in_sync
    weights = class_weights(y_train) if config.balance_classes else None
    fit_inputs = _fit_inputs(x_train, y_train, x_val, y_val, batch=batch,
                             seed=config.seed + resumed_from, weights=weights,
                             mixup_alpha=config.mixup_alpha)
    steps = math.ceil(len(y_train) / batch)
    state["train_images_per_epoch"] = len(y_train)
    # Time already spent in this call (building, probing precision) counts against the budget.
    trainer = _Trainer(config, state, steps, checkpoint_dir, on_epoch, started)

    all_callbacks: list[keras.callbacks.Callback] = [trainer, *callbacks]
    if config.ema_momentum is not None:
        # Before the trainer: the averaged weights are in the model while it validates,
        # picks the best epoch and checkpoints; the raw ones are back for the next epoch.
        all_callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if state["epoch"] < min(state["planned_epochs"], config.epochs):
        model.fit(**fit_inputs, epochs=config.epochs, initial_epoch=state["epoch"],
                  callbacks=all_callbacks, verbose=0)
    else:
        trainer.stopped = "epochs"

    best = checkpoint_dir / BEST_WEIGHTS
    average = checkpoint_dir / AVERAGE_WEIGHTS
    if config.average_tail > 0 and state.get("averaged_epochs") and average.exists():
        with np.load(average) as saved:
            current = model.get_weights()
            model.set_weights([saved[f"w{i}"].astype(w.dtype) for i, w in enumerate(current)])
    elif best.exists() and state["best_epoch"]:
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
               "total_seconds": state["seconds"],
               "averaged_epochs": int(state.get("averaged_epochs", 0))},
    )


def save_for_serving(model: keras.Model, path: Path) -> int:
    """Save ``model`` without its optimizer state (a third of the checkpoint's size for
    Adam) as a ``.keras`` file; returns its size in bytes."""
    path = Path(path)
    # from_config, not clone_model: Keras 3.15's clone_model carries the compiled
    # optimizer over, and its moments would be saved with the weights.
    serving = keras.Model.from_config(model.get_config())
    serving.set_weights(model.get_weights())
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_model(serving, path)
    return path.stat().st_size


# ------------------------------------------------------------------------------- predict

_DIHEDRAL: tuple[Callable[[np.ndarray], np.ndarray], ...] = (
    lambda x: x,
    lambda x: x[:, :, ::-1],
    lambda x: x[:, ::-1, :],
    lambda x: np.rot90(x, 1, axes=(1, 2)),
    lambda x: np.rot90(x, 2, axes=(1, 2)),
    lambda x: np.rot90(x, 3, axes=(1, 2)),
    lambda x: np.swapaxes(x, 1, 2),
    lambda x: np.rot90(x, 1, axes=(1, 2))[:, :, ::-1],
)


def _predict_function(model: keras.Model) -> Callable[[np.ndarray], Any]:
    """A ``tf.function`` around the model, traced once for any batch size and kept on the
    model: ``model.predict`` builds a tf.data pipeline and callbacks per call, which
    dominates for the small batches of scoring. Other backends: ``predict_on_batch``
    (compiled once per batch shape)."""
    if backend() != "tensorflow":
        return model.predict_on_batch
    import tensorflow as tf

    fn = getattr(model, "_malaria_predict_fn", None)
    if fn is None:
        size = int(model.inputs[0].shape[1])
        spec = tf.TensorSpec([None, size, size, 3], tf.uint8)

        def call(images: tf.Tensor) -> tf.Tensor:
            return model(images, training=False)

        # autograph=False: the model call has no Python control flow to convert.
        traced = tf.function(call, input_signature=[spec], autograph=False)
        fn = model._malaria_predict_fn = lambda batch: traced(tf.constant(batch))
    return fn


def predict_probabilities(model: keras.Model, images_uint8: np.ndarray, batch_size: int = 256,
                          *, tta: bool | int = False) -> np.ndarray:
    """P(parasitized) per image, shape (N,), float32.

    ``tta``: test-time augmentation, averaging the probabilities over the symmetries of the
    square (``True`` = all 8: identity, flips, rotations by 90 degrees, transposes; an int
    takes the first n of them). A cell has no orientation, so each view is as valid as the
    original, and averaging removes some of the model's orientation noise.
    """
    images_uint8 = np.asarray(images_uint8, dtype=np.uint8)
    if images_uint8.ndim == 3:
        images_uint8 = images_uint8[None]
    views = 8 if tta is True else (1 if tta is False else max(1, min(8, int(tta))))
    fn = _predict_function(model)
    out = np.empty(len(images_uint8), dtype=np.float32)
    for start in range(0, len(images_uint8), batch_size):
        batch = images_uint8[start:start + batch_size]
        total = np.zeros(len(batch), dtype=np.float64)
        for view in _DIHEDRAL[:views]:
            probs = fn(np.ascontiguousarray(view(batch)))
            total += np.asarray(probs, dtype=np.float64).reshape(-1)
        out[start:start + batch_size] = total / views
    return out
