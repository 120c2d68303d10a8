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
