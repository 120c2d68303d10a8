"""Splits by slide, never by cell: cells of one slide share a stain and optics, and a
cell-level split leaks them into the test set (published: 98.6% cell-level vs 95.7%
slide-level accuracy for the same model)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from malaria.core.defaults import TEST_FRACTION, VAL_FRACTION
from malaria.dataset.records import CellRecord


@dataclass(frozen=True)
class SlideSplit:
    train: list[str]
    val: list[str]
    test: list[str]

    def of(self, records: Iterable[CellRecord], part: str) -> list[CellRecord]:
        slides = set(getattr(self, part))
        return [r for r in records if r.slide in slides]

    def as_dict(self) -> dict[str, list[str]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _slide_sort_key(slide: str) -> tuple[int, int | str]:
    return (0, int(slide)) if slide.isdigit() else (1, slide)


def split_by_slide(records: Sequence[CellRecord], *, seed: int = 0,
                   val_fraction: float = VAL_FRACTION,
                   test_fraction: float = TEST_FRACTION) -> SlideSplit:
    """Disjoint train/validation/test slide lists, the same for the same records and seed.

    Stratified: slides are grouped by their majority class (in the NIH set, slides of
    healthy patients have only uninfected cells) and each group is shared out in the same
    proportions, so every split sees both kinds of slide whenever there are enough. Each
    non-empty fraction gets at least one slide when there are three or more slides.
    The split is a function of the slide ids and their majority class only, so adding
    cells to existing slides does not move a slide between splits.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("fractions must be in [0, 1) and sum to less than 1")
    groups = _slides_by_majority(records)
    rng = np.random.default_rng(seed)
    train: list[str] = []
    val: list[str] = []
    test: list[str] = []
    total = sum(len(s) for s in groups.values())
    for slides in groups.values():
        order = [slides[i] for i in rng.permutation(len(slides))]
        n_test = round(len(order) * test_fraction)
        n_val = round(len(order) * val_fraction)
        test += order[:n_test]
        val += order[n_test:n_test + n_val]
        train += order[n_test + n_val:]
    # Tiny sets: make sure each asked-for split has at least one slide (taken from train).
    for part, fraction in ((test, test_fraction), (val, val_fraction)):
        if fraction > 0 and not part and total >= 3 and len(train) > 1:
            part.append(train.pop(int(rng.integers(len(train)))))
    key = _slide_sort_key
    return SlideSplit(sorted(train, key=key), sorted(val, key=key), sorted(test, key=key))


def _slides_by_majority(records: Iterable[CellRecord]) -> dict[int, list[str]]:
    """Slide ids grouped by their majority class (1 = parasitized, ties counted as 1, as
    :func:`split_by_slide` does), each group sorted."""
    counts: dict[str, Counter[int]] = defaultdict(Counter)
    for record in records:
        counts[record.slide][record.label] += 1
    groups: dict[int, list[str]] = defaultdict(list)
    for slide, c in counts.items():
        groups[int(c[1] >= c[0])].append(slide)
    return {g: sorted(s, key=_slide_sort_key) for g, s in sorted(groups.items())}


def slide_folds(records: Sequence[CellRecord], k: int, seed: int = 0) -> dict[str, int]:
    """Slide -> fold (0 .. k-1) for slide-grouped, class-stratified K-fold cross-validation.

    Every slide lands in exactly one fold. Slides are grouped by majority class, each group
    shuffled with ``seed`` and dealt round-robin; the deal carries on from group to group, so
    fold sizes differ by at most one slide overall and by at most one within each class. Like
    :func:`split_by_slide` it depends only on the slide ids and their majority class.
    """
    groups = _slides_by_majority(records)
    total = sum(len(s) for s in groups.values())
    if k < 2 or k > total:
        raise ValueError(f"k must be between 2 and the number of slides ({total}), not {k}")
    rng = np.random.default_rng(seed)
    folds: dict[str, int] = {}
    dealt = 0
    for slides in groups.values():
        for i in rng.permutation(len(slides)):
            folds[slides[i]] = dealt % k
            dealt += 1
    return dict(sorted(folds.items(), key=lambda item: _slide_sort_key(item[0])))


def fold_split(records: Sequence[CellRecord], folds: dict[str, int], fold: int, *,
               seed: int = 0,
               val_fraction: float = VAL_FRACTION / (1 - TEST_FRACTION)) -> SlideSplit:
    """Fold ``fold``'s slides as test; validation slides (threshold, early stopping) taken,
    stratified, from the other folds' slides, the rest train.

    The default validation share of the training slides keeps the product split's
    proportions when k = 5 (65/15/20% of the slides); the validation slides never come from
    the test fold, so the threshold is chosen without looking at it.
    """
    if fold not in set(folds.values()):
        raise ValueError(f"no fold {fold} in the assignment")
    test = sorted((s for s, f in folds.items() if f == fold), key=_slide_sort_key)
    held = set(test)
    inner = split_by_slide([r for r in records if r.slide not in held], seed=seed,
                           val_fraction=val_fraction, test_fraction=0.0)
    return SlideSplit(inner.train, inner.val, test)
