"""A time budget plans from steady-state epochs: the first batch of a call (tracing, or XLA
compilation on JAX) must not make the budget plan a single epoch."""

from __future__ import annotations

import time
from pathlib import Path

from malaria.model.checkpoints import fresh_state
from malaria.model.config import TrainConfig
from malaria.model.trainer import _Trainer


def _trainer(tmp_path: Path, minutes: float) -> tuple[_Trainer, dict]:
    config = TrainConfig(arch="cellnet-tiny", input_size=32, epochs=1000, batch_size=16,
                         max_minutes=minutes, patience=None)
    state = fresh_state(config)
    trainer = _Trainer(config, state, steps_per_epoch=60, checkpoint_dir=tmp_path,
                       on_epoch=None, started=time.perf_counter())
    return trainer, state


def test_a_slow_first_batch_does_not_plan_a_single_epoch(tmp_path: Path) -> None:
    """48 s budget; the first epoch took 31 s, 30.4 of them in its first batch (compilation),
    the other 59 batches 0.5 s: about 28 more epochs fit, not zero."""
    trainer, state = _trainer(tmp_path, minutes=0.8)
    state.update(epoch=1, planned_epochs=1000, seconds=31.0)
    trainer.started = time.perf_counter()
    trainer.epoch_seconds = [31.0]
    trainer.steady_seconds = [0.5 * 60 / 59 + 0.1]
    trainer._replan()
    assert 20 <= state["planned_epochs"] <= 40


def test_a_slowed_down_epoch_is_cut_where_the_budget_ends(tmp_path: Path) -> None:
    """After the first epoch, one more batch plus validation and the checkpoint (the
    slowest tail seen) must fit in what is left, or the epoch stops there."""
    trainer, state = _trainer(tmp_path, minutes=1.0)
    state.update(epoch=3, seconds=50.0)
    trainer.started = time.perf_counter()
    trainer.batch_seconds = 0.5
    trainer.tail_seconds = [2.0, 4.0]
    assert trainer._out_of_time() is False  # 50 + 0.5 + 4 < 60
    state["seconds"] = 56.0
    assert trainer._out_of_time() is True  # 56 + 0.5 + 4 >= 60


def test_a_runs_first_epoch_is_never_cut(tmp_path: Path) -> None:
    trainer, state = _trainer(tmp_path, minutes=0.01)
    state.update(epoch=0, seconds=100.0)
    assert trainer._out_of_time() is False
    no_budget, state = _trainer(tmp_path, minutes=1.0)
    no_budget.config = TrainConfig(arch="cellnet-tiny", max_minutes=None)
    state.update(epoch=5, seconds=1e6)
    assert no_budget._out_of_time() is False
