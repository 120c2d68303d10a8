"""Test-time views: how many symmetries of the square a model's probabilities are averaged
over. A model's threshold is chosen on probabilities at one setting, so everything that
applies the threshold (the scorer, ``malaria evaluate``, ``malaria predict``) reads the
setting recorded with the model, never its own default."""

from __future__ import annotations

MAX_VIEWS = 8  # identity, two flips, three rotations, two transposes


def views_of(tta: object) -> int:
    """Views per cell for a ``tta`` setting as recorded with a model: ``True`` all 8,
    ``False`` or ``None`` one, a number that many (clamped to 1-8)."""
    if tta is True:
        return MAX_VIEWS
    if tta is None or tta is False:
        return 1
    if not isinstance(tta, int | float | str):
        raise TypeError(f"tta must be a bool or a number of views, got {tta!r}")
    return max(1, min(MAX_VIEWS, int(tta)))
