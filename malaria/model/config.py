"""What a training run is asked to do: the trainer's settings (:class:`TrainConfig`) and a
whole retraining run's (:class:`RetrainConfig`: data split, threshold rule, gate floors).

Every default comes from :mod:`malaria.core.defaults`, so ``malaria train``, the train flow,
its deployments and ``benchmarks.accuracy`` train the same recipe unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from malaria.core import defaults
from malaria.evaluation.threshold import ThresholdRule
from malaria.model.architectures import default_input_size
from malaria.model.precision import PRECISIONS

MONITORS = ("val_loss", "val_auc")
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    arch: str = defaults.DEFAULT_ARCH
    input_size: int | None = None  # None: the architecture's default
    epochs: int = defaults.TRAIN_EPOCHS  # upper bound; a time budget may plan fewer
    max_minutes: float | None = defaults.TRAIN_MAX_MINUTES  # wall clock, resumes included
    batch_size: int = defaults.TRAIN_BATCH_SIZE
    learning_rate: float = defaults.TRAIN_LEARNING_RATE  # peak, reached after warm-up
    warmup_epochs: float = defaults.TRAIN_WARMUP_EPOCHS
    min_lr_fraction: float = defaults.TRAIN_MIN_LR_FRACTION
    schedule: str = "cosine"  # "cosine" (warm-up, then cosine decay) or "constant"
    weight_decay: float = defaults.TRAIN_WEIGHT_DECAY
    seed: int = defaults.TRAIN_SEED
    patience: int | None = defaults.TRAIN_PATIENCE  # None: never stop early
    # What "best epoch" means, for restore-best and early stopping: "val_loss" (lowest) or
    # "val_auc" (highest). With label smoothing the loss also rewards calibration, so the two
    # can disagree about which epoch ranks cells best.
    monitor: str = "val_loss"
    mixed_precision: str = defaults.TRAIN_PRECISION  # see malaria.model.precision
    xla: bool | str = "auto"  # "auto": on GPUs only (XLA convolutions lose on CPUs)
    label_smoothing: float = defaults.TRAIN_LABEL_SMOOTHING
    augment: bool = True
    balance_classes: bool = True  # class weights when the classes are unbalanced
    dropout_after_sigmoid: bool = False  # the source article's mistake, for reproduction

    def __post_init__(self) -> None:
        # Refused here rather than after the first epoch, when the value is first read.
        choices = {"monitor": MONITORS, "schedule": SCHEDULES, "mixed_precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def resolved_input_size(self) -> int:
        return self.input_size or default_input_size(self.arch)


@dataclass
class RetrainConfig:
    """One retraining run: the trainer's main settings, how the data is split, how the
    threshold is chosen, and the promotion gate."""

    arch: str = defaults.DEFAULT_ARCH
    input_size: int | None = None
    epochs: int = defaults.TRAIN_EPOCHS
    max_minutes: float | None = defaults.TRAIN_MAX_MINUTES
    # Tuned on the developers' validation slides (benchmarks/README.md, accuracy section).
    batch_size: int = defaults.TRAIN_BATCH_SIZE
    learning_rate: float = defaults.TRAIN_LEARNING_RATE
    label_smoothing: float = defaults.TRAIN_LABEL_SMOOTHING
    seed: int = defaults.TRAIN_SEED
    val_fraction: float = defaults.VAL_FRACTION
    test_fraction: float = defaults.TEST_FRACTION
    threshold_rule: ThresholdRule = defaults.THRESHOLD_RULE  # type: ignore[assignment]
    tta: bool | int = defaults.TEST_TIME_AUGMENTATION  # views per cell (core.views)
    # Gate: not worse than the champion minus the tolerance, and above absolute floors.
    tolerance: float = defaults.GATE_TOLERANCE
    min_auc: float = defaults.GATE_MIN_AUC
    min_accuracy: float = defaults.GATE_MIN_ACCURACY
    # Any other TrainConfig field (experiments, e.g. the benchmark's --override).
    extra_train_options: dict[str, Any] = field(default_factory=dict)

    def resolved_input_size(self) -> int:
        return self.input_size or default_input_size(self.arch)

    def train_config(self) -> TrainConfig:
        return TrainConfig(arch=self.arch, input_size=self.input_size, epochs=self.epochs,
                           max_minutes=self.max_minutes, batch_size=self.batch_size,
                           learning_rate=self.learning_rate, seed=self.seed,
                           label_smoothing=self.label_smoothing, **self.extra_train_options)
