"""Where a scoring run reads scans and writes predictions and its bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from malaria.core import layout
from malaria.io.store import Store, open_store

if TYPE_CHECKING:
    from malaria.scoring.shards import Shard

SUMMARY_FILE = layout.PREDICTION_SUMMARY_FILE


class ScoringError(RuntimeError):
    """Scoring cannot proceed; the message says why."""


# ------------------------------------------------------------------------------- where


@dataclass(frozen=True)
class ScoringPaths:
    """Where scans are read and predictions and bookkeeping written.

    URLs rather than open stores, so the value pickles to Dask workers, which open their
    own clients.
    """

    scans_url: str
    out_url: str
    scans_prefix: str = layout.SCANS
    predictions_prefix: str = layout.PREDICTIONS
    state_prefix: str = layout.SCORING_STATE
    registry_url: str | None = None  # where models/ and champion.json are

    @classmethod
    def bucket(cls, data_url: str) -> ScoringPaths:
        """The system of record's layout: scans/, predictions/, state/scoring/, models/."""
        return cls(data_url, data_url, registry_url=data_url)

    @classmethod
    def folders(cls, scans: str | Path, out: str | Path,
                registry_url: str | None = None) -> ScoringPaths:
        """``scans`` holds ``<slide>/<file>``; ``out`` receives ``<slide>.csv``,
        ``summary.csv`` and the bookkeeping in ``out/_scoring/``.

        When ``scans`` and ``out`` are the ``scans`` and ``predictions`` folders of one
        bucket or folder, the bucket layout is used, so the command and the flow share
        their bookkeeping.
        """
        scans_url, out_url = str(scans).rstrip("/"), str(out).rstrip("/")
        scans_parent, _, scans_name = scans_url.rpartition("/")
        out_parent, _, out_name = out_url.rpartition("/")
        if (scans_parent and scans_parent == out_parent and f"{scans_name}/" == layout.SCANS
                and f"{out_name}/" == layout.PREDICTIONS and not scans_parent.endswith(":/")):
            return cls(scans_parent, scans_parent, registry_url=registry_url or scans_parent)
        return cls(scans_url, out_url, "", "", layout.LOCAL_SCORING_STATE, registry_url)

    @classmethod
    def for_run(cls, data_url: str, scans: str | Path | None = None,
                out: str | Path | None = None, registry_url: str | None = None
                ) -> ScoringPaths:
        """The paths of one run: the bucket layout of ``data_url`` (the deployment), or the
        ``scans`` and ``out`` folders (``malaria score``); models come from ``registry_url``,
        by default the folders' bucket or ``data_url``."""
        if scans is None and out is None:
            paths = cls.bucket(data_url)
            return replace(paths, registry_url=registry_url) if registry_url else paths
        if scans is None or out is None:
            raise ScoringError("give both the scans and the out location, or neither "
                               "(then the bucket layout of the data URL is used)")
        paths = cls.folders(scans, out, registry_url)
        return paths if paths.registry_url else replace(paths, registry_url=data_url)

    def scans_store(self) -> Store:
        return open_store(self.scans_url)

    def out_store(self) -> Store:
        return open_store(self.out_url)

    def slide_prefix(self, slide: str) -> str:
        return f"{self.scans_prefix}{slide}/"

    def prediction_key(self, slide: str) -> str:
        return f"{self.predictions_prefix}{slide}.csv"

    def history_key(self, slide: str, fingerprint: str, version: str) -> str:
        return layout.prediction_history_key(slide, fingerprint, version,
                                             self.predictions_prefix)

    @property
    def summary_key(self) -> str:
        return f"{self.predictions_prefix}{SUMMARY_FILE}"

    def marker_prefix(self, slide: str) -> str:
        return layout.scoring_marker_prefix(slide, self.state_prefix)

    def marker_key(self, slide: str, fingerprint: str, version: str) -> str:
        return layout.scoring_marker_key(slide, fingerprint, version, self.state_prefix)

    def parts_prefix(self, slide: str) -> str:
        return layout.scoring_parts_prefix(slide, self.state_prefix)

    def part_key(self, shard: Shard, version: str) -> str:
        return layout.scoring_part_key(shard.slide, shard.fingerprint, version, shard.start,
                                       shard.end, self.state_prefix)

    def lease_key(self, slide: str) -> str:
        return layout.scoring_lease_key(slide, self.state_prefix)
