"""What a scoring run did (:class:`ScoreReport`), and the per-slide tally of shards still out
that the score flow keeps while shards come back."""

from __future__ import annotations

from dataclasses import dataclass, field

from malaria.scoring.output import SlideSummary
from malaria.scoring.shards import ShardResult, SlidePlan


@dataclass
class ScoreReport:
    model_version: str
    slides_due: list[str] = field(default_factory=list)
    slides_busy: list[str] = field(default_factory=list)  # leased by another run
    slides: list[SlideSummary] = field(default_factory=list)  # scored in this run
    shards_scored: int = 0
    shards_resumed: int = 0
    cells: int = 0  # cells scored in this run (resumed shards not counted)
    seconds: float = 0.0
    summary_written: bool = False
    up_to_date: int = 0
    # Re-scored slides whose parasitemia moved by more than the set points (and from what).
    changed: list[dict[str, object]] = field(default_factory=list)

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"model {self.model_version}: {len(self.slides)} slides scored "
                f"({self.cells} cells in {self.seconds:.1f} s, {self.cells_per_s:.0f} cells/s; "
                f"{self.shards_scored} shards, {self.shards_resumed} resumed), "
                f"{self.up_to_date} up to date, {len(self.slides_busy)} busy elsewhere"
                + (f"; parasitemia changed on {len(self.changed)} re-scored slides"
                   if self.changed else ""))


@dataclass
class SlideTally:
    """Which planned slides still have shards out, and the counts that go into ``report``
    (the score flow's bookkeeping, kept here so that it is unit-testable)."""

    report: ScoreReport
    plans: dict[str, SlidePlan] = field(default_factory=dict)
    left: dict[str, int] = field(default_factory=dict)  # shards not yet back, per slide

    def add(self, plan: SlidePlan | None) -> None:
        """A slide's fresh plan; ``None`` (another run finished the slide after this run
        listed it) counts as up to date."""
        if plan is None:
            self.report.up_to_date += 1
            return
        self.plans[plan.slide], self.left[plan.slide] = plan, len(plan.pending)
        self.report.shards_resumed += len(plan.done)

    def complete(self, slide: str) -> bool:
        return self.left.get(slide) == 0

    def shard_done(self, result: ShardResult) -> bool | None:
        """Count a shard that came back: True when it was its slide's last, None when its
        slide was dropped meanwhile (nothing counted)."""
        if result.slide not in self.left:
            return None
        if result.resumed:
            self.report.shards_resumed += 1
        else:
            self.report.shards_scored += 1
            self.report.cells += result.cells
        self.left[result.slide] -= 1
        return self.left[result.slide] == 0

    def pop(self, slide: str) -> SlidePlan:
        """The plan of a slide whose shards are all in, to finalize."""
        self.left.pop(slide)
        return self.plans.pop(slide)

    def drop(self, slide: str) -> None:
        self.plans.pop(slide, None)
        self.left.pop(slide, None)
