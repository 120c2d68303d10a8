"""Training: the schedule, resume after a crash, a time budget, learning, fast prediction."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from malaria.dataset.records import (
    ArraySet,
    ImageCache,
    folder_reader,
    load_arrays,
    records_from_folder,
)
from malaria.dataset.records import split_by_slide as split
from malaria.model.trainer import (
    LAST_MODEL,
    STATE,
    TrainConfig,
    learning_rate_at,
    predict_probabilities,
    save_for_serving,
    train,
)
from malaria_dev.synthetic import write_labelled_tree

SIZE = 40


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[ArraySet, ArraySet]:
    root = tmp_path_factory.mktemp("train")
    write_labelled_tree(root / "cells", 360, slides=8, seed=11)
    records = records_from_folder(root / "cells")
    slides = split(records, seed=0, val_fraction=0.25, test_fraction=0.0)
    cache = ImageCache(root / "cache")
    read = folder_reader(root / "cells")
    return (load_arrays(slides.of(records, "train"), cache, SIZE, read),
            load_arrays(slides.of(records, "val"), cache, SIZE, read))


def _config(**overrides: object) -> TrainConfig:
    base: dict[str, object] = dict(arch="cellnet-tiny", input_size=SIZE, epochs=3, batch_size=16,
                                   learning_rate=3e-3, mixed_precision="float32", augment=False,
                                   patience=None)
    base.update(overrides)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_schedule_warms_up_then_decays() -> None:
    config = TrainConfig(learning_rate=1.0, min_lr_fraction=0.1)
    lrs = [learning_rate_at(step, 100, 10, config) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert learning_rate_at(500, 100, 10, config) == pytest.approx(0.1)


def test_a_replanned_decay_goes_on_from_where_it_was() -> None:
    """Epochs speed up half-way and the time budget plans twice as many: the rate goes on
    from its current value, down to the floor at the new end, and never steps back up."""
    from malaria.model.trainer import decay_progress

    config = TrainConfig(learning_rate=1.0, min_lr_fraction=0.1)
    before = [learning_rate_at(step, 100, 10, config) for step in range(50)]
    anchor = (50, decay_progress(50, 100, 10))
    after = [learning_rate_at(step, 200, 10, config, anchor) for step in range(50, 200)]
    assert after[0] == pytest.approx(learning_rate_at(50, 100, 10, config))
    assert all(a >= b for a, b in itertools.pairwise(before[9:] + after))
    assert after[-1] == pytest.approx(0.1, abs=1e-3)
    # Without the anchor the longer plan would have put the rate back up.
    assert learning_rate_at(50, 200, 10, config) > before[-1]


def test_the_trainer_anchors_the_decay_when_the_budget_replans(tmp_path: Path) -> None:
    from malaria.model.trainer import _fresh_state, _Trainer

    config = _config(epochs=200, max_minutes=1.0)
    state = _fresh_state(config)
    state.update(epoch=3, planned_epochs=10)
    trainer = _Trainer(config, state, steps_per_epoch=10, checkpoint_dir=tmp_path,
                       on_epoch=None, started=time.perf_counter())
    trainer.step = 30
    rate_before = learning_rate_at(30, 100, trainer.warmup_steps, config)
    trainer.epoch_seconds = [5.0, 1.0, 1.0]  # about 57 more epochs fit in the minute
    trainer._replan()
    assert state["planned_epochs"] > 50
    assert state["decay_anchor"][0] == 30
    total = state["planned_epochs"] * 10
    assert learning_rate_at(30, total, trainer.warmup_steps, config,
                            tuple(state["decay_anchor"])) == pytest.approx(rate_before)


class Interrupted(RuntimeError):
    pass


def test_resume_after_an_interrupted_fit(synthetic: tuple[ArraySet, ArraySet],
                                         tmp_path: Path) -> None:
    train_set, val_set = synthetic
    config = _config(epochs=3)
    seen: list[int] = []

    def crash_at_two(epoch: int, metrics: dict) -> None:
        seen.append(epoch)
        if epoch == 2:
            raise Interrupted("worker killed")

    with pytest.raises(Interrupted):
        train(config, train_set, val_set, checkpoint_dir=tmp_path, on_epoch=crash_at_two)
    assert json.loads((tmp_path / STATE).read_text())["epoch"] == 2
    steps_done = 2 * int(np.ceil(len(train_set) / 16))

    result = train(config, train_set, val_set, checkpoint_dir=tmp_path,
                   on_epoch=lambda epoch, metrics: seen.append(epoch))
    assert seen == [1, 2, 3]  # epoch 3 ran once, after the resume; 1 and 2 did not rerun
    assert result.resumed_from_epoch == 2 and result.epochs_run == 3
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    # The optimizer state came back too: its step counter continued from epoch 2.
    last = keras.models.load_model(tmp_path / LAST_MODEL)
    assert int(last.optimizer.iterations) == steps_done + steps_done // 2
    # A finished run resumes to nothing more to do.
    again = train(config, train_set, val_set, checkpoint_dir=tmp_path)
    assert again.epochs_run == 3 and again.resumed_from_epoch == 3


def test_tiny_model_learns_synthetic_cells(synthetic: tuple[ArraySet, ArraySet],
                                           tmp_path: Path) -> None:
    train_set, val_set = synthetic
    keras.utils.set_random_seed(0)
    result = train(_config(epochs=8), train_set, val_set, checkpoint_dir=tmp_path, resume=False)
    probs = predict_probabilities(result.model, val_set.images)
    accuracy = float(np.mean((probs > 0.5) == (val_set.labels > 0.5)))
    assert accuracy > 0.75, result.history
    assert result.images_per_s > 0 and result.best_epoch >= 1
    # The model holds the best validation epoch's weights.
    best = min(result.history, key=lambda h: h["val_loss"])
    assert result.best_epoch == best["epoch"]

    # prediction through tf.function matches a direct call; TTA averages 8 views.
    direct = np.asarray(result.model(val_set.images[:5], training=False)).ravel()
    np.testing.assert_allclose(probs[:5], direct, rtol=1e-4, atol=1e-6)
    tta = predict_probabilities(result.model, val_set.images[:5], batch_size=2, tta=True)
    assert tta.shape == (5,) and np.all((tta >= 0) & (tta <= 1))

    size = save_for_serving(result.model, tmp_path / "serving.keras")
    loaded = keras.models.load_model(tmp_path / "serving.keras")
    np.testing.assert_allclose(predict_probabilities(loaded, val_set.images[:5]), probs[:5],
                               rtol=1e-4, atol=1e-6)
    assert size < (tmp_path / "last.keras").stat().st_size


def test_time_budget_stops_training(synthetic: tuple[ArraySet, ArraySet],
                                    tmp_path: Path) -> None:
    train_set, val_set = synthetic
    result = train(_config(epochs=50, max_minutes=0.001), train_set, val_set,
                   checkpoint_dir=tmp_path)
    assert result.epochs_run == 1 and result.stopped == "time_budget"


def test_wrong_input_size_is_refused(synthetic: tuple[ArraySet, ArraySet],
                                     tmp_path: Path) -> None:
    train_set, val_set = synthetic
    with pytest.raises(ValueError, match="expects"):
        train(_config(input_size=48), train_set, val_set, checkpoint_dir=tmp_path)


def test_restore_best_by_validation_auc_with_weight_averaging(
        synthetic: tuple[ArraySet, ArraySet], tmp_path: Path) -> None:
    train_set, val_set = synthetic
    config = _config(epochs=4, monitor="val_auc", ema_momentum=0.9)
    result = train(config, train_set, val_set, checkpoint_dir=tmp_path, resume=False)
    best = max(result.history, key=lambda h: h["val_auc"])
    assert result.best_epoch == best["epoch"]
    # The returned model holds that epoch's (averaged) weights: its validation AUC is the
    # one recorded for the epoch.
    probs = predict_probabilities(result.model, val_set.images)
    auc = keras.metrics.AUC()
    auc.update_state(val_set.labels, probs)
    assert abs(float(auc.result()) - best["val_auc"]) < 1e-3


def test_other_backends_fit_on_the_arrays_with_sample_weights(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import malaria.model.trainer as training

    monkeypatch.setattr(training, "backend", lambda: "jax")
    x = np.zeros((4, SIZE, SIZE, 3), np.uint8)
    y = np.array([1, 0, 0, 0], np.float32)

    inputs = training._fit_inputs(x, y, x[:2], y[:2], batch=2, seed=0,
                                  weights={0: 0.5, 1: 2.0})

    assert inputs["x"] is x and inputs["y"] is y and inputs["shuffle"] is True
    np.testing.assert_array_equal(inputs["sample_weight"], [2.0, 0.5, 0.5, 0.5])
    assert inputs["validation_batch_size"] == 256
    assert training.distribution_strategy().num_replicas_in_sync == 1


def test_xla_is_allowed_for_the_geometric_augmentation_under_jax() -> None:
    from malaria.model.architectures import build_model
    from malaria.model.trainer import _allow_xla_augmentation

    model = build_model("cellnet-tiny", SIZE, augment=True)
    geometric = [layer for layer in model._flatten_layers()
                 if isinstance(layer, keras.layers.RandomRotation | keras.layers.RandomZoom
                               | keras.layers.RandomTranslation)]
    assert geometric

    _allow_xla_augmentation(model)

    assert all(layer.supports_jit for layer in geometric)


def test_extra_callbacks_see_every_epoch(synthetic: tuple[ArraySet, ArraySet],
                                         tmp_path: Path) -> None:
    seen: list[int] = []

    class Recorder(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seen.append(epoch + 1)

    train(_config(epochs=2), *synthetic, checkpoint_dir=tmp_path, resume=False,
          callbacks=[Recorder()])

    assert seen == [1, 2]


@pytest.mark.parametrize(("capability", "expected"), [
    ("9.0", True), ("8.0", True), ("7.5", False), ((8, 6), True), ((7, 0), False), (None, False)])
def test_bfloat16_tensor_cores_from_compute_capability(
        capability: object, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import tensorflow as tf

    from malaria.model.trainer import gpu_has_bf16

    # A JAX device carries "9.0"; TensorFlow answers (9, 0) through get_device_details.
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda device: {"compute_capability": capability})
    device = (SimpleNamespace(compute_capability=capability) if isinstance(capability, str)
              else SimpleNamespace())

    assert gpu_has_bf16(device) is expected


@pytest.mark.parametrize("field", ["monitor", "schedule", "mixed_precision"])
def test_an_unknown_setting_is_refused_before_training(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: "bogus"})  # type: ignore[arg-type]


def test_truncated_loss_leaves_out_the_worst_cells_of_a_batch() -> None:
    """With nothing to drop it is Keras's binary cross-entropy (label smoothing included);
    with a quarter to drop, the one cell of four with the highest loss adds nothing."""
    import keras

    from malaria.model.trainer import TrainConfig, TruncatedBinaryCrossentropy

    labels = np.array([1, 0, 1, 0], np.float32)  # (n,), as the input pipeline gives them
    probabilities = np.array([[0.9], [0.2], [0.05], [0.6]], np.float32)
    plain = keras.losses.BinaryCrossentropy(label_smoothing=0.1)(labels[:, None], probabilities)
    assert float(TruncatedBinaryCrossentropy(0.1)(labels, probabilities)) == pytest.approx(
        float(plain), rel=1e-6)
    each = keras.losses.binary_crossentropy(labels[:, None], probabilities,
                                            label_smoothing=0.1).numpy()
    truncated = TruncatedBinaryCrossentropy(0.1, drop_fraction=0.25)(labels, probabilities)
    assert float(truncated) == pytest.approx((each.sum() - each.max()) / 4, rel=1e-5)
    restored = TruncatedBinaryCrossentropy.from_config(
        TruncatedBinaryCrossentropy(0.1, drop_fraction=0.25).get_config())
    assert (restored.label_smoothing, restored.drop_fraction) == (0.1, 0.25)
    with pytest.raises(ValueError, match="drop_highest_loss"):
        TrainConfig(drop_highest_loss=0.5)


def test_tail_averaging_returns_the_mean_of_the_tail_epochs(
        synthetic: tuple[ArraySet, ArraySet], tmp_path: Path) -> None:
    """With the whole decay as its tail, every epoch's end-of-epoch weights (BatchNorm
    statistics included) are averaged, and a run resumed after a crash keeps the average."""
    train_set, val_set = synthetic
    config = _config(epochs=3, average_tail=1.0)
    snapshots: list[list[np.ndarray]] = []

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            snapshots.append([np.array(w) for w in self.model.get_weights()])

    class CrashAtTwo(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if epoch + 1 == 2:  # after the checkpoint and the snapshot of epoch 2
                raise Interrupted("worker killed")

    with pytest.raises(Interrupted):
        train(config, train_set, val_set, checkpoint_dir=tmp_path,
              callbacks=[Snapshot(), CrashAtTwo()])
    result = train(config, train_set, val_set, checkpoint_dir=tmp_path, callbacks=[Snapshot()])
    assert len(snapshots) == 3 and result.extra["averaged_epochs"] == 3
    for got, *epochs in zip(result.model.get_weights(), *snapshots, strict=True):
        np.testing.assert_allclose(got, np.mean(epochs, axis=0), rtol=1e-5, atol=1e-6)
