"""The morning digest's bucket part (malaria.reports.digest, no Prefect): what falls inside
the window, what is left out, and a source that cannot be read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from digestbucket import digest_bucket

from malaria.core import layout
from malaria.reports.digest import Digest, bucket_sections, render


def _last_day() -> Digest:
    until = datetime.now(UTC) + timedelta(minutes=1)
    return Digest(since=until - timedelta(hours=24), until=until)


def test_the_bucket_sections_count_what_falls_in_the_window(tmp_path: Path) -> None:
    digest = _last_day()
    bucket_sections(digest_bucket(tmp_path / "bucket"), digest)

    assert digest.problems == []
    assert digest.registered == ["v-new"]  # v-old was created years ago
    assert [p["version"] for p in digest.promotions] == ["v-new"]
    assert digest.champion == "v-new"
    assert [r["slide"] for r in digest.slides_scored] == ["s1", "s2"]
    assert digest.rescored == ["s1"]
    assert digest.manifests == 1
    assert digest.quarantined == {"unreadable_image": 2, "no_label": 1}
    assert digest.counts()["quarantined"] == 3

    markdown = render(digest)
    assert "slides scored: 2; parasitemia changes (re-scored slides): 1" in markdown
    assert "| unreadable_image | 2 |" in markdown
    assert "| s1 | 100 |" in markdown and "| yes |" in markdown
    assert "gate: better / AUC" in markdown  # a '|' would break the table's row


def test_an_empty_window_and_an_unreadable_source(tmp_path: Path) -> None:
    store = digest_bucket(tmp_path / "bucket")
    old = Digest(since=datetime(2019, 1, 1, tzinfo=UTC), until=datetime(2019, 1, 2, tzinfo=UTC))
    bucket_sections(store, old)
    assert old.counts() == {"runs": {}, "models_registered": 0, "promotions": 0,
                            "slides_scored": 0, "parasitemia_changes": 0, "ingest_runs": 0,
                            "quarantined": 0}
    assert "## Slides scored" not in render(old)

    store.put_bytes(layout.PREDICTION_SUMMARY_KEY, b"\xff\xfe not text")
    broken = _last_day()
    bucket_sections(store, broken)
    assert [p.split(":")[0] for p in broken.problems] == ["scoring"]
    assert broken.registered == ["v-new"] and broken.manifests == 1  # the rest is read
    assert "## Not read" in render(broken)
