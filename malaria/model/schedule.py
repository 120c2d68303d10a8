"""The learning-rate schedule: linear warm-up, then cosine decay to a floor, re-planned to
fit a time budget without the rate ever stepping back up."""

from __future__ import annotations

import math

from malaria.model.config import TrainConfig


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
