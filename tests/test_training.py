"""Training: the schedule, resume after a crash, a time budget, learning, fast prediction."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from malaria.dataset.cache import ImageCache
from malaria.dataset.pipeline import ArraySet, load_arrays
from malaria.dataset.records import folder_reader, records_from_folder
from malaria.dataset.split import split_by_slide as split
from malaria.model.checkpoints import LAST_MODEL, STATE, save_for_serving
from malaria.model.config import TrainConfig
from malaria.model.predict import predict_probabilities
from malaria.model.schedule import learning_rate_at
from malaria.model.trainer import train
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
    from malaria.model.schedule import decay_progress

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
    from malaria.model.checkpoints import fresh_state
    from malaria.model.trainer import _Trainer

    config = _config(epochs=200, max_minutes=1.0)
    state = fresh_state(config)
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



# ------------------------------------------------- the bucket mirror: sets and a pointer


class _TornUpload(Exception):
    """Stands for the process dying mid-upload."""


class _DiesAfterPuts:
    """A store whose process 'dies' (raises) before its ``n``-th ``put_file`` from now."""

    def __init__(self, store: Any, n: int) -> None:
        self._store, self._left = store, n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def put_file(self, key: str, path: Path, **kwargs: Any) -> None:
        self._left -= 1
        if self._left <= 0:
            raise _TornUpload(key)
        self._store.put_file(key, path, **kwargs)


def _checkpoint_keys(store: Any, prefix: str) -> list[str]:
    return sorted(i.key for i in store.list(prefix))


def test_a_torn_checkpoint_upload_resumes_from_the_previous_complete_set(
        synthetic: tuple[ArraySet, ArraySet], tmp_path: Path, s3_store: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """Epochs 1 and 2 are mirrored; the worker dies after one file of epoch 3's set. The next
    run ignores that set (with a warning) and resumes from epoch 2, not from torn files."""
    import logging

    from malaria.core import layout
    from malaria.model.checkpoints import download_checkpoint, upload_checkpoint

    train_set, val_set = synthetic
    config = _config(epochs=3)
    prefix = layout.checkpoint_prefix("torn")
    local = tmp_path / "first"

    def mirror(epoch: int, metrics: dict) -> None:
        # Epoch 3 uploads through a store that dies after its first file.
        store = s3_store if epoch < 3 else _DiesAfterPuts(s3_store, 2)
        upload_checkpoint(store, local, prefix)

    with pytest.raises(_TornUpload):
        train(config, train_set, val_set, checkpoint_dir=local, on_epoch=mirror)
    pointer = json.loads(s3_store.get_bytes(layout.checkpoint_pointer_key(prefix)))
    assert pointer["epoch"] == 2
    sets = {k[len(prefix):].split("/")[1] for k in _checkpoint_keys(s3_store, prefix + "sets/")}
    assert len(sets) == 2 and pointer["set"] in sets  # epoch 2's set and the torn one

    resumed_dir = tmp_path / "second"
    resumed_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger="malaria.model.checkpoints"):
        assert download_checkpoint(s3_store, prefix, resumed_dir) == 3
    assert any("not in the last complete set" in r.getMessage() for r in caplog.records)
    assert json.loads((resumed_dir / STATE).read_text())["epoch"] == 2
    assert len({k[len(prefix):].split("/")[1]  # the torn set is gone, epoch 2's kept
                for k in _checkpoint_keys(s3_store, prefix + "sets/")}) == 1
    result = train(config, train_set, val_set, checkpoint_dir=resumed_dir,
                   on_epoch=lambda epoch, metrics: upload_checkpoint(s3_store, resumed_dir,
                                                                     prefix))
    assert result.resumed_from_epoch == 2 and result.epochs_run == 3
    # The complete upload of epoch 3 replaced the pointer and pruned every other set.
    pointer = json.loads(s3_store.get_bytes(layout.checkpoint_pointer_key(prefix)))
    assert pointer["epoch"] == 3
    assert _checkpoint_keys(s3_store, prefix) == sorted(
        [layout.checkpoint_pointer_key(prefix)]
        + [layout.checkpoint_set_prefix(prefix, pointer["set"]) + f["name"]
           for f in pointer["files"]])


def _uploaded_set(store: Any, tmp_path: Path, prefix: str) -> Path:
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / LAST_MODEL).write_bytes(b"model bytes" * 100)
    (folder / "sub" / "extra.bin").write_bytes(b"x" * 10)
    (folder / STATE).write_text(json.dumps({"epoch": 4}))
    assert upload_checkpoint_(store, folder, prefix) == 3
    return folder


def upload_checkpoint_(store: Any, folder: Path, prefix: str) -> int:
    from malaria.model.checkpoints import upload_checkpoint

    return upload_checkpoint(store, folder, prefix)


def test_a_checkpoint_round_trips_through_its_pointer(any_store: Any, tmp_path: Path) -> None:
    from malaria.core import layout
    from malaria.model.checkpoints import download_checkpoint

    prefix = layout.checkpoint_prefix("round")
    folder = _uploaded_set(any_store, tmp_path, prefix)
    # The same files again write the same keys: nothing to prune, nothing new.
    keys = _checkpoint_keys(any_store, prefix)
    assert upload_checkpoint_(any_store, folder, prefix) == 3
    assert _checkpoint_keys(any_store, prefix) == keys and len(keys) == 4
    back = tmp_path / "back"
    back.mkdir()
    assert download_checkpoint(any_store, prefix, back) == 3
    assert {p.relative_to(back).as_posix(): p.read_bytes() for p in back.rglob("*")
            if p.is_file()} == {p.relative_to(folder).as_posix(): p.read_bytes()
                                for p in folder.rglob("*") if p.is_file()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


@pytest.mark.parametrize("damage", ["no_pointer", "file_changed", "file_missing",
                                    "pointer_garbage"])
def test_a_checkpoint_that_does_not_match_its_pointer_is_not_resumed(
        damage: str, s3_store: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from malaria.core import layout
    from malaria.model.checkpoints import download_checkpoint

    prefix = layout.checkpoint_prefix("damaged")
    _uploaded_set(s3_store, tmp_path, prefix)
    pointer_key = layout.checkpoint_pointer_key(prefix)
    pointer = json.loads(s3_store.get_bytes(pointer_key))
    model_key = layout.checkpoint_set_prefix(prefix, pointer["set"]) + LAST_MODEL
    if damage == "no_pointer":
        s3_store.delete(pointer_key)  # a first upload cut short before its pointer
    elif damage == "file_changed":
        s3_store.put_bytes(model_key, b"model bytes" * 99 + b"other bytes")  # same size
    elif damage == "file_missing":
        s3_store.delete(model_key)
    else:
        s3_store.put_bytes(pointer_key, b"{not json")
    back = tmp_path / "back"
    back.mkdir()
    with caplog.at_level(logging.WARNING, logger="malaria.model.checkpoints"):
        assert download_checkpoint(s3_store, prefix, back) == 0
    assert list(back.iterdir()) == []  # nothing half-restored for the trainer to find
    assert any("starts over" in r.getMessage() for r in caplog.records)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_nothing_in_the_bucket_is_a_quiet_fresh_start(s3_store: Any, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from malaria.core import layout
    from malaria.model.checkpoints import download_checkpoint

    with caplog.at_level("WARNING"):
        assert download_checkpoint(s3_store, layout.checkpoint_prefix("none"), tmp_path) == 0
    assert not [r for r in caplog.records if r.name == "malaria.model.checkpoints"]


def test_a_checkpoint_that_cannot_be_loaded_means_a_fresh_start(
        synthetic: tuple[ArraySet, ArraySet], tmp_path: Path) -> None:
    """A checkpoint written by an older trainer (or damaged) must not fail every retry."""
    train_set, val_set = synthetic
    config = _config(epochs=2)

    def stop_at_one(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            raise Interrupted("worker killed")

    with pytest.raises(Interrupted):
        train(config, train_set, val_set, checkpoint_dir=tmp_path, on_epoch=stop_at_one)
    (tmp_path / LAST_MODEL).write_bytes(b"not a keras archive")
    result = train(config, train_set, val_set, checkpoint_dir=tmp_path)
    assert result.resumed_from_epoch == 0 and result.epochs_run == 2
    assert [h["epoch"] for h in result.history] == [1, 2]

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


class _SlowDownAfterFirstEpoch(keras.callbacks.Callback):
    """The machine gets slow from the second epoch on (another job on the same cores)."""

    def __init__(self, seconds_per_batch: float) -> None:
        super().__init__()
        self.seconds_per_batch = seconds_per_batch
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.epoch >= 1:
            time.sleep(self.seconds_per_batch)


def test_time_budget_cuts_an_epoch_that_slowed_down(synthetic: tuple[ArraySet, ArraySet],
                                                     tmp_path: Path) -> None:
    """The planner plans whole epochs from the first one's speed; the second, slowed to
    1.5 s per batch, would take over 25 s of a 12 s budget, so it stops part-way, is
    validated and checkpointed, and the model holds the best epoch's weights."""
    train_set, val_set = synthetic
    steps = -(-len(train_set.labels) // 16)
    result = train(_config(epochs=50, max_minutes=0.2), train_set, val_set,
                   checkpoint_dir=tmp_path, callbacks=[_SlowDownAfterFirstEpoch(1.5)])
    assert result.stopped == "time_budget" and result.epochs_run == 2
    last = result.history[-1]
    assert 1 <= last["batches"] < steps and "val_loss" in last
    assert result.history[0]["batches"] == steps
    assert 1 <= result.best_epoch <= 2


def test_wrong_input_size_is_refused(synthetic: tuple[ArraySet, ArraySet],
                                     tmp_path: Path) -> None:
    train_set, val_set = synthetic
    with pytest.raises(ValueError, match="expects"):
        train(_config(input_size=48), train_set, val_set, checkpoint_dir=tmp_path)


def test_restore_best_by_validation_auc(synthetic: tuple[ArraySet, ArraySet],
                                        tmp_path: Path) -> None:
    train_set, val_set = synthetic
    config = _config(epochs=4, monitor="val_auc")
    result = train(config, train_set, val_set, checkpoint_dir=tmp_path, resume=False)
    best = max(result.history, key=lambda h: h["val_auc"])
    assert result.best_epoch == best["epoch"]
    # The returned model holds that epoch's weights: its validation AUC is the one recorded
    # for the epoch.
    probs = predict_probabilities(result.model, val_set.images)
    auc = keras.metrics.AUC()
    auc.update_state(val_set.labels, probs)
    assert abs(float(auc.result()) - best["val_auc"]) < 1e-3


def test_other_backends_fit_on_the_arrays_with_sample_weights(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import malaria.model.precision as precision
    import malaria.model.trainer as training

    monkeypatch.setattr(training, "backend", lambda: "jax")
    monkeypatch.setattr(precision, "backend", lambda: "jax")
    x = np.zeros((4, SIZE, SIZE, 3), np.uint8)
    y = np.array([1, 0, 0, 0], np.float32)

    inputs = training._fit_inputs(x, y, x[:2], y[:2], batch=2, seed=0,
                                  weights={0: 0.5, 1: 2.0})

    assert inputs["x"] is x and inputs["y"] is y and inputs["shuffle"] is True
    np.testing.assert_array_equal(inputs["sample_weight"], [2.0, 0.5, 0.5, 0.5])
    assert inputs["validation_batch_size"] == 256
    assert precision.distribution_strategy().num_replicas_in_sync == 1


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

    from malaria.model.precision import gpu_has_bf16

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


# ------------------------------------------------------------------ the precision choice
# Two kinds of CPU were measured training cellnet: AVX-512 with BF16 (and AMX), where bf16
# ran ~1.5x faster than float32, and AVX2 only, where bf16 (emulated) ran ~6x slower.
AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"}


class FakeProbe:
    """Step timings per policy, served in turn; records which policies were probed."""

    def __init__(self, **seconds: list[float]) -> None:
        self.seconds = seconds
        self.probed: list[str] = []

    def __call__(self, config: TrainConfig, policy: str) -> object:
        self.probed.append(policy)
        times = iter(self.seconds["fp32" if policy == "float32" else "bf16"])
        return lambda: next(times)


@pytest.fixture
def fresh_policy_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    import malaria.model.precision as precision

    monkeypatch.setattr(precision, "_POLICY_CACHE", {})


def _auto(**overrides: object) -> TrainConfig:
    return TrainConfig(**{"arch": "cellnet-tiny", "input_size": SIZE, **overrides})  # type: ignore[arg-type]


@pytest.mark.usefixtures("fresh_policy_cache")
def test_an_avx2_only_cpu_trains_in_float32_without_probing() -> None:
    from malaria.model.precision import resolve_precision

    probe = FakeProbe(fp32=[1.0] * 6, bf16=[0.1] * 6)  # would say bf16 if it were asked
    assert resolve_precision(_auto(), flags=AVX2_ONLY, devices=[], probe=probe) == "float32"
    assert probe.probed == []
    # AVX-512 without its BF16 extension emulates bf16 too.
    avx512_no_bf16 = AVX2_ONLY | {"avx512f", "avx512bw"}
    assert resolve_precision(_auto(), flags=avx512_no_bf16, devices=[],
                             probe=probe) == "float32"
    assert probe.probed == []


@pytest.mark.usefixtures("fresh_policy_cache")
@pytest.mark.parametrize(("fp32", "bf16", "expected"), [
    ([0.30] * 6, [0.20] * 6, "mixed_bfloat16"),  # 1.5x faster: the AVX-512 BF16 machine
    ([0.20] * 6, [1.20] * 6, "float32"),  # 6x slower: bf16 never wins where it is emulated
    ([0.30] * 6, [0.33] * 6, "mixed_bfloat16"),  # a tie under load: the flags decide
    ([0.30] * 6, [0.40] * 6, "float32"),  # clearly slower: the probe vetoes bf16
    # Load on a shared machine only adds time: the fastest step of each decides.
    ([0.9, 0.30, 0.8, 0.7, 0.6, 0.5], [0.6, 0.7, 0.20, 0.9, 0.8, 0.5], "mixed_bfloat16"),
])
def test_a_cpu_with_native_bf16_trains_in_bf16_unless_the_probe_vetoes(fp32: list[float], bf16: list[float],
                                                      expected: str) -> None:
    from malaria.model.precision import resolve_precision

    probe = FakeProbe(fp32=fp32, bf16=bf16)
    assert resolve_precision(_auto(), flags=AVX512_BF16, devices=[], probe=probe) == expected
    assert sorted(probe.probed) == ["float32", "mixed_bfloat16"]


@pytest.mark.usefixtures("fresh_policy_cache")
def test_the_probe_runs_once_per_model_shape() -> None:
    from malaria.model.precision import resolve_precision

    probe = FakeProbe(fp32=[0.3] * 6, bf16=[0.2] * 6)
    for _ in range(2):
        assert resolve_precision(_auto(), flags=AVX512_BF16, devices=[],
                                 probe=probe) == "mixed_bfloat16"
    assert len(probe.probed) == 2  # one model of each policy, the first time only


@pytest.mark.usefixtures("fresh_policy_cache")
def test_an_explicit_precision_or_a_gpu_needs_no_probe() -> None:
    from types import SimpleNamespace

    from malaria.model.precision import resolve_precision

    probe = FakeProbe(fp32=[], bf16=[])
    assert resolve_precision(_auto(mixed_precision="float32"), flags=AVX512_BF16,
                             probe=probe) == "float32"
    hopper, turing = SimpleNamespace(compute_capability="9.0"), SimpleNamespace(
        compute_capability="7.5")
    assert resolve_precision(_auto(), flags=AVX2_ONLY, devices=[hopper],
                             probe=probe) == "mixed_bfloat16"
    assert resolve_precision(_auto(), flags=AVX2_ONLY, devices=[hopper, turing],
                             probe=probe) == "mixed_float16"
    assert probe.probed == []


def test_cpu_flags_are_read_and_reported() -> None:
    from malaria.model.precision import (
        cpu_has_bf16,
        describe_precision,
        parse_cpu_flags,
        reported_cpu_flags,
    )

    cpuinfo = ("processor\t: 0\nmodel name\t: Some CPU\n"
               "flags\t\t: fpu sse4_2 avx avx2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    flags = parse_cpu_flags(cpuinfo)
    assert {"avx2", "avx512f", "avx512_bf16", "amx_tile"} <= flags and cpu_has_bf16(flags)
    assert parse_cpu_flags("no flags line\n") == frozenset()
    assert reported_cpu_flags(AVX2_ONLY) == {"avx2": True, "avx512f": False,
                                             "avx512_bf16": False, "amx_tile": False,
                                             "amx_bf16": False}
    assert not cpu_has_bf16(AVX2_ONLY)
    line = describe_precision("float32", AVX2_ONLY)
    assert line.startswith("precision float32") and "avx2=yes" in line
    assert "avx512_bf16=no" in line


def test_the_training_summary_names_the_precision_and_the_cpu(
        synthetic: tuple[ArraySet, ArraySet], tmp_path: Path) -> None:
    result = train(_config(epochs=1), *synthetic, checkpoint_dir=tmp_path, resume=False)
    summary = result.summary()
    assert summary["precision_policy"] == "float32" == result.precision_policy
    assert summary["epochs_run"] == 1 and summary["stopped"] == "epochs"
    assert set(summary["cpu_flags"]) >= {"avx2", "avx512f", "avx512_bf16", "amx_tile"}
    json.dumps(summary)  # a plain JSON record


@pytest.mark.usefixtures("fresh_policy_cache")
def test_a_bf16_model_the_backend_refuses_means_float32() -> None:
    """oneDNN limited to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 on the AVX-512 machine) refuses the
    bf16 convolution primitive outright; the probe takes that as "no bf16 here"."""
    from malaria.model.precision import resolve_precision

    def refusing(config: TrainConfig, policy: str) -> object:
        if policy == "mixed_bfloat16":
            raise RuntimeError("could not create a primitive descriptor")
        return lambda: 0.3

    assert resolve_precision(_auto(), flags=AVX512_BF16, devices=[],
                             probe=refusing) == "float32"
