"""Bulk scoring (the steps in malaria.scoring, run by the score flow) against moto S3 and local
folders, with a tiny model: CSV schema and counts, error rows, idempotence, the due rule,
leases, two runs at once and resuming after a SIGKILLed run. Whole runs go through the flow
(flows/score.py) against the session's Prefect test server."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from malaria.core import layout
from malaria.dataset.decode import decode_to_array
from malaria.io.store import LocalStore, ObjectInfo, S3Store, put_json
from malaria.scoring.due import Cell, due_reason, fingerprint
from malaria.scoring.infer import prepare_cell
from malaria.scoring.leases import LeaseOwner, SlideLeases
from malaria.scoring.model import resolve_model
from malaria.scoring.output import PREDICTION_COLUMNS, SUMMARY_COLUMNS
from malaria.scoring.paths import ScoringError, ScoringPaths
from malaria.scoring.report import ScoreReport, SlideTally
from malaria.scoring.shards import ShardResult, SlidePlan, split_shards
from malaria_dev.synthetic import generate_scan_cells

Store = S3Store | LocalStore
ROOT = Path(__file__).resolve().parents[1]

# Slide -> number of valid cells; slide 202 also gets the bad files below.
SLIDES = {"201": 23, "202": 9, "203": 4}
BAD = {"empty.png": b"", "notes.png": b"not an image at all\n"}


pytestmark = pytest.mark.usefixtures("clients_find_moto")


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def upload_scans(store: Store, prefix: str = layout.SCANS,
                 slides: dict[str, int] = SLIDES) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for slide, n in slides.items():
        for cell in generate_scan_cells(n, slide_id=int(slide), seed=3):
            key = f"{prefix}{slide}/{cell.file_name}"
            store.put_bytes(key, cell.data)
            keys.setdefault(slide, []).append(key)
    if "202" not in slides:
        return keys
    good = next(generate_scan_cells(1, slide_id=202, seed=9)).data
    bad = {**BAD, "truncated.png": good[: len(good) // 2],
           "grey.png": _png(Image.open(io.BytesIO(good)).convert("L"))}
    for name, data in bad.items():
        store.put_bytes(f"{prefix}202/{name}", data)
        keys["202"].append(f"{prefix}202/{name}")
    return keys


def read_csv(store: Store, key: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.get_bytes(key)), keep_default_na=False,
                       dtype={"slide": str})


def snapshot(store: Store) -> dict[str, tuple[str, datetime]]:
    return {i.key: (i.etag, i.last_modified) for i in store.list("")}


def score(**parameters: Any) -> dict[str, Any]:
    """One run of the score flow (the only scoring orchestrator) with ``parameters``."""
    from flows.score import score_flow

    return score_flow(**{"lease_settle_s": 0.05, **parameters})


def scored(result: dict[str, Any]) -> list[str]:
    return sorted(result["slides_scored"])


# ------------------------------------------------------------------------ preprocessing


def test_prepare_cell_is_the_training_preprocessing_with_one_decode() -> None:
    cell = next(generate_scan_cells(1, slide_id=210, seed=1))
    rgb = Image.open(io.BytesIO(cell.data)).convert("RGB")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 200))
    variants = {"png": cell.data, "jpeg": _png(rgb, "JPEG"), "rgba": _png(rgba),
                "palette": _png(rgb.convert("P", palette=Image.Palette.ADAPTIVE))}
    for name, data in variants.items():
        array, error = prepare_cell(data, 48)
        assert error == "" and array is not None, name
        np.testing.assert_array_equal(array, decode_to_array(data, 48), err_msg=name)

    grey = _png(rgb.convert("L"))
    assert prepare_cell(grey, 48) == (None, "grayscale")
    assert prepare_cell(b"", 48) == (None, "empty_file")
    assert prepare_cell(b"hello", 48) == (None, "not_an_image")
    assert prepare_cell(cell.data[: len(cell.data) // 2], 48) == (None, "corrupt_image")


def test_shards_are_near_equal_and_cover_every_cell_once() -> None:
    cells = [Cell(f"scans/1/{i:04d}.png", "e", 10) for i in range(2001)]
    shards = split_shards("1", cells, 2000)
    assert [len(s.cells) for s in shards] == [1000, 1001]
    assert [c for s in shards for c in s.cells] == cells
    assert [len(s.cells) for s in split_shards("1", cells[:5], 2000)] == [5]


# ------------------------------------------------------------------- outputs, errors


def test_csv_schema_row_counts_error_rows_and_summary(any_store: Store, tiny_model: Path,
                                                      prefect_harness: None) -> None:
    keys = upload_scans(any_store)
    paths = ScoringPaths.bucket(any_store.url)
    ref = resolve_model(paths, tiny_model)
    report = score(data_url=any_store.url, model_path=str(tiny_model), shard_size=10,
                   batch_size=8)
    assert scored(report) == sorted(SLIDES) and report["model_version"] == ref.version
    assert report["shards_scored"] == 3 + 2 + 1  # 23 cells -> 3 shards, 13 -> 2, 4 -> 1
    assert report["cells"] == sum(len(k) for k in keys.values())

    for slide, slide_keys in keys.items():
        frame = read_csv(any_store, layout.prediction_key(slide))
        assert tuple(frame.columns) == PREDICTION_COLUMNS
        assert list(frame.key) == sorted(slide_keys)  # every cell once, in key order
        assert (frame.slide == slide).all()
        assert (frame.cell_file == frame.key.str.rsplit("/", n=1).str[-1]).all()
        assert (frame.model_version == ref.version).all() and ref.version.startswith("file-")
        for stamp in frame.scored_at:
            assert datetime.fromisoformat(stamp).utcoffset().total_seconds() == 0
        ok = frame[frame.error == ""]
        probability = ok.probability.astype(float)
        assert probability.between(0, 1).all()
        expected = np.where(probability >= 0.5, "Parasitized", "Uninfected")
        assert list(ok.predicted_class) == list(expected)

    errors = read_csv(any_store, layout.prediction_key("202")).set_index("cell_file")
    assert errors.loc["empty.png"].error == "empty_file"
    assert errors.loc["notes.png"].error == "not_an_image"
    assert errors.loc["truncated.png"].error == "corrupt_image"
    assert errors.loc["grey.png"].error == "grayscale"
    assert (errors.loc[list(BAD)].probability == "").all()

    summary = read_csv(any_store, layout.PREDICTION_SUMMARY_KEY).set_index("slide")
    assert tuple(["slide", *summary.columns]) == SUMMARY_COLUMNS
    assert summary.loc["202"].unreadable == 4 and summary.loc["202"].cells_scored == 9
    assert summary.loc["201"].cells_scored == 23 and summary.loc["201"].unreadable == 0
    row = summary.loc["201"]
    assert row.parasitemia_pct == pytest.approx(100 * row.parasitized / 23, abs=1e-3)
    # Bookkeeping left behind: one marker per slide, no parts, no leases.
    state = [i.key for i in any_store.list(layout.SCORING_STATE)]
    assert sorted(state) == sorted(
        paths.marker_key(s["slide"], s["scan_fingerprint"], ref.version)
        for s in report["summary"])


def test_rerun_with_nothing_new_writes_nothing(local_store: LocalStore, tiny_model: Path,
                                               prefect_harness: None) -> None:
    upload_scans(local_store)
    score(data_url=local_store.url, model_path=str(tiny_model), shard_size=10)
    before = snapshot(local_store)
    again = score(data_url=local_store.url, model_path=str(tiny_model), shard_size=10)
    assert again["slides_scored"] == [] and again["slides_due"] == []
    assert again["up_to_date"] == 3 and not again["summary_written"]
    assert snapshot(local_store) == before  # local ETags are mtime+size: any rewrite shows


# --------------------------------------------------------------------------- due rule


def test_due_rule_function() -> None:
    from datetime import UTC

    def marker(fp: str, version: str) -> ObjectInfo:
        return ObjectInfo(f"state/scoring/done/1/{fp}@{version}.json", 1, "e", datetime.now(UTC))

    assert due_reason(True, [marker("f1", "v1")], "f1", "v1") is None
    assert due_reason(False, [marker("f1", "v1")], "f1", "v1") == "no predictions CSV"
    assert "model version" in str(due_reason(True, [marker("f1", "v1")], "f1", "v2"))
    assert "cells" in str(due_reason(True, [marker("f1", "v1")], "f2", "v1"))
    assert due_reason(True, [], "f1", "v1") is not None


def test_new_cells_and_new_champion_make_slides_due(s3_store: S3Store, tiny_model: Path,
                                                    prefect_harness: None) -> None:
    from malaria.registry.registry import ModelRegistry

    registry = ModelRegistry(s3_store)
    metrics = {"threshold": 0.4, "input_size": 32, "architecture": "cellnet-tiny"}
    registry.register("v1", tiny_model, metrics=metrics, plots={})
    registry.promote("v1", reason="test")
    upload_scans(s3_store, slides={"301": 3, "302": 3})
    kwargs = {"data_url": s3_store.url, "shard_size": 10}

    first = score(**kwargs)
    assert first["model_version"] == "v1" and len(first["slides_scored"]) == 2
    assert set(read_csv(s3_store, layout.prediction_key("301")).threshold) == {0.4}

    # A cell added to one slide makes that slide (only) due; the CSV covers the new set.
    extra = next(generate_scan_cells(1, slide_id=301, seed=77))
    s3_store.put_bytes(f"scans/301/{extra.file_name}", extra.data)
    second = score(**kwargs)
    assert second["slides_scored"] == ["301"] and second["up_to_date"] == 1
    assert len(read_csv(s3_store, layout.prediction_key("301"))) == 4

    # A replaced object (same key, new bytes) and a removed one count as changes too.
    s3_store.put_bytes(f"scans/301/{extra.file_name}", _png(Image.new("RGB", (40, 40), "red")))
    assert score(**kwargs)["slides_scored"] == ["301"]
    s3_store.delete(f"scans/301/{extra.file_name}")
    assert score(**kwargs)["slides_scored"] == ["301"]
    assert len(read_csv(s3_store, layout.prediction_key("301"))) == 3

    # A new champion makes every slide due again; the summary follows.
    registry.register("v2", tiny_model, metrics=metrics, plots={})
    registry.promote("v2", reason="test")
    third = score(**kwargs)
    assert third["model_version"] == "v2" and len(third["slides_scored"]) == 2
    summary = read_csv(s3_store, layout.PREDICTION_SUMMARY_KEY)
    assert set(summary.model_version) == {"v2"} and len(summary) == 2
    assert score(**kwargs)["slides_scored"] == []


# ------------------------------------------------------------------- concurrency guard


def test_leases_exclude_expire_and_break_for_dead_owners(local_store: LocalStore) -> None:
    paths = ScoringPaths.bucket(local_store.url)
    a = SlideLeases(paths, ttl=60, settle=0.01)
    b = SlideLeases(paths, ttl=60, settle=0.01)
    assert a.acquire(["1", "2"]) == ["1", "2"]
    assert b.acquire(["1", "2", "3"]) == ["3"]  # held ones are refused
    a.release("1")
    assert b.acquire(["1"]) == ["1"]
    assert b.renew() == []

    # An expired lease is stale; the old holder finds out at its next renewal.
    short = SlideLeases(paths, ttl=0.2, settle=0.01)
    assert short.acquire(["9"]) == ["9"]
    time.sleep(0.3)
    assert b.acquire(["9"]) == ["9"]
    assert short.renew() == ["9"] and "9" in short.lost

    # A lease whose owner process on this host is gone (SIGKILL) is stale at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ghost = SlideLeases(paths, ttl=600, settle=0.01,
                        owner=LeaseOwner("ghost", LeaseOwner.current().host, dead.pid))
    assert ghost.acquire(["7"]) == ["7"]
    assert b.acquire(["7"]) == ["7"]


def test_two_runs_at_once_never_score_the_same_slide(
        local_store: LocalStore, tiny_model: Path, prefect_harness: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import malaria.scoring.shards as shards

    slides = {str(s): 4 for s in range(401, 407)}
    upload_scans(local_store, slides=slides)
    reports = []
    start = threading.Barrier(2)
    real = shards.score_cells

    def slow(*args: Any, **kwargs: Any) -> Any:  # the two runs overlap for longer
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "score_cells", slow)

    def run() -> None:
        start.wait()
        reports.append(score(data_url=local_store.url, model_path=str(tiny_model),
                             shard_size=10, lease_settle_s=0.3))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(reports) == 2
    a, b = (set(r["slides_scored"]) for r in reports)
    assert not a & b and a | b == set(slides)
    assert sum(r["shards_scored"] for r in reports) == len(slides)


def test_a_slide_lost_during_the_settle_gets_nothing_written(
        local_store: LocalStore, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
        prefect_harness: None) -> None:
    """The flow waits for the claims to settle before its first shard; a slide whose claim a
    rival overwrote in that window is not scored and gets nothing written, and the other
    slides are unaffected."""
    slides = {"501": 4, "502": 4, "503": 4}
    upload_scans(local_store, slides=slides)
    paths = ScoringPaths.bucket(local_store.url)
    ref = resolve_model(paths, tiny_model)
    rival = SlideLeases(paths, ttl=600)
    real_claim = SlideLeases.claim

    def claim_then_rival_overwrites(self: SlideLeases, wanted: list[str]) -> list[str]:
        claimed = real_claim(self, wanted)
        if self is not rival:
            put_json(rival.store, paths.lease_key("502"), rival._payload())  # last writer
        return claimed

    monkeypatch.setattr(SlideLeases, "claim", claim_then_rival_overwrites)
    report = score(data_url=local_store.url, model_path=str(tiny_model), shard_size=10,
                   lease_settle_s=0.3)

    assert report["slides_busy"] == ["502"] and report["model_version"] == ref.version
    assert scored(report) == ["501", "503"]
    assert report["shards_scored"] == 2 and report["cells"] == 8
    out = paths.out_store()
    assert not out.exists(paths.prediction_key("502"))
    assert not list(out.list(paths.parts_prefix("502")))
    assert rival.read("502")["owner"] == rival.owner.token  # the rival's lease stays


# ------------------------------------------------------------------------- SIGKILL


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, time
    import malaria.scoring.shards as shards
    from flows.score import score_flow

    real = shards.score_cells
    calls = 0

    def slow_then_killed(*args, **kwargs):
        # One shard at a time, in slide order (two shards a slide): when the fourth starts,
        # slide 501 is finished and 502 has one part of two. SIGKILL then: no cleanup.
        global calls
        calls += 1
        if calls == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        time.sleep(0.4)  # the finished slide's CSV is written meanwhile
        return result

    shards.score_cells = slow_then_killed
    score_flow(scans_url=sys.argv[1], out_url=sys.argv[2], model_path=sys.argv[3],
               shard_size=3, parallel_shards=1, lease_settle_s=0.05)
""")


def test_sigkill_mid_run_then_rerun_scores_every_cell_exactly_once(
        tmp_path: Path, tiny_model: Path, prefect_harness: None) -> None:
    from prefect.settings import PREFECT_API_URL

    scans, out = tmp_path / "scans-in", tmp_path / "out"
    slides = {str(s): 5 for s in range(501, 505)}
    keys = upload_scans(LocalStore(scans), prefix="", slides=slides)
    parts = out / "_scoring" / "parts"
    # The killed run is a flow run too, against the same test server.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(scans), str(out),
                              str(tiny_model)], env=env, cwd=ROOT)
    try:
        child.wait(timeout=240)  # it kills itself mid-run (see KILLED_RUN)
    finally:
        child.kill()
    assert child.returncode == -9
    # Killed once a slide is finished and the next one has a part but not all.
    assert any(out.glob("*.csv")) and any(parts.rglob("*.csv"))
    total = sum(-(-len(k) // 3) for k in keys.values())
    finished_before = len(list(out.glob("*.csv")))
    assert finished_before < len(keys), "the run finished before it was killed"

    folders = {"scans_url": str(scans), "out_url": str(out), "model_path": str(tiny_model),
               "shard_size": 3}
    report = score(**folders)
    assert report["slides_busy"] == []  # the dead owner's lease was broken at once
    assert report["shards_scored"] < total  # the killed run's parts were kept
    assert report["shards_resumed"] > 0
    store = LocalStore(out)
    for slide, slide_keys in keys.items():
        frame = read_csv(store, f"{slide}.csv")
        assert list(frame.key) == sorted(k for k in slide_keys)  # none missing, none twice
    assert len(read_csv(store, "summary.csv")) == len(keys)
    assert not list(parts.rglob("*.csv")) and not list((out / "_scoring" / "leases").glob("*"))
    assert score(**folders)["slides_scored"] == []


def test_fingerprint_ignores_listing_order() -> None:
    cells = [Cell("a", "1", 1), Cell("b", "2", 1)]
    assert fingerprint(cells) == fingerprint(cells[::-1])
    assert fingerprint(cells) != fingerprint([Cell("a", "1", 1), Cell("b", "3", 1)])


def test_a_cell_deleted_after_listing_is_an_error_row(s3_store: S3Store,
                                                      tiny_model: Path) -> None:
    from malaria.scoring.infer import score_cells
    from malaria.scoring.model import ModelRef, load_model

    cell = next(generate_scan_cells(1, slide_id=700, seed=1))
    s3_store.put_bytes("scans/700/ok.png", cell.data)
    model = load_model(ModelRef("t", 0.5, "file", str(tiny_model)))
    cells = [Cell("scans/700/ok.png", "e", len(cell.data)), Cell("scans/700/gone.png", "e", 99)]
    (probability, error), missing = score_cells(s3_store, cells, model, batch_size=4)
    assert error == "" and probability is not None and 0 <= probability <= 1
    assert missing == (None, "missing_object")


def test_score_command_on_folders(tmp_path: Path, tiny_model: Path,
                                  prefect_harness: None) -> None:
    import argparse

    from malaria_cli.score import add_score_command

    upload_scans(LocalStore(tmp_path / "scans"), prefix="", slides={"801": 3, "802": 2})
    parser = argparse.ArgumentParser(prog="malaria")
    add_score_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["score", "--scans", str(tmp_path / "scans"), "--out",
                              str(tmp_path / "out"), "--model", str(tiny_model),
                              "--threshold", "0.3"])
    assert args.func(args) == 0
    out = LocalStore(tmp_path / "out")
    frame = read_csv(out, "801.csv")
    assert len(frame) == 3 and set(frame.threshold) == {0.3}
    assert len(read_csv(out, "summary.csv")) == 2
    before = snapshot(out)
    assert args.func(args) == 0 and snapshot(out) == before


def test_paths_bucket_layout_and_folders() -> None:
    bucket = ScoringPaths.bucket("s3://lab")
    assert bucket.prediction_key("12") == layout.prediction_key("12")
    assert bucket.summary_key == layout.PREDICTION_SUMMARY_KEY
    assert bucket.lease_key("12") == "state/scoring/leases/12.json"
    # The command pointed at a bucket's scans/ and predictions/ shares the flow's bookkeeping.
    assert ScoringPaths.folders("s3://lab/scans", "s3://lab/predictions/") == bucket
    folders = ScoringPaths.folders("/data/new", "/data/out")
    assert folders.prediction_key("12") == "12.csv" and folders.state_prefix == "_scoring/"
    # One run's paths, as the score flow picks them from its parameters.
    assert ScoringPaths.for_run("s3://lab") == bucket
    assert ScoringPaths.for_run("s3://lab", registry_url="s3://models").registry_url == \
        "s3://models"
    run = ScoringPaths.for_run("s3://lab", "/data/new", "/data/out")
    assert run.scans_url == "/data/new" and run.registry_url == "s3://lab"
    assert ScoringPaths.for_run("s3://lab", "s3://lab/scans", "s3://lab/predictions") == bucket
    with pytest.raises(ScoringError, match="both"):
        ScoringPaths.for_run("s3://lab", scans="/data/new")


def test_the_recorded_operating_point_is_used(tmp_path: Path, tiny_model: Path,
                                             prefect_harness: None) -> None:
    import json
    import shutil

    import keras

    from malaria.model.predict import predict_probabilities

    model_path = tmp_path / "m.keras"
    shutil.copy(tiny_model, model_path)
    (tmp_path / "m.keras.json").write_text(json.dumps({"threshold": 0.3, "tta": True}))
    keys = upload_scans(LocalStore(tmp_path / "scans"), prefix="", slides={"901": 3})
    paths = ScoringPaths.folders(tmp_path / "scans", tmp_path / "out")
    ref = resolve_model(paths, model_path)
    assert (ref.threshold, ref.tta) == (0.3, 8)
    assert resolve_model(paths, model_path, threshold=0.6, tta=1).tta == 1
    score(scans_url=str(tmp_path / "scans"), out_url=str(tmp_path / "out"),
          model_path=str(model_path), lease_settle_s=0.0)
    frame = read_csv(LocalStore(tmp_path / "out"), "901.csv")
    images = np.stack([decode_to_array((tmp_path / "scans" / k).read_bytes(), 32)
                       for k in sorted(keys["901"])])
    model = keras.models.load_model(model_path, compile=False)
    expected = predict_probabilities(model, images, tta=True)
    np.testing.assert_allclose(frame.probability.astype(float), expected, atol=2e-6)
    assert set(frame.threshold) == {0.3}


def test_the_slide_tally_counts_shards_and_says_when_a_slide_is_complete() -> None:
    cells = [Cell(f"scans/9/{i}.png", f"e{i}", 10) for i in range(5)]
    shards = split_shards("9", cells, 2)  # 3 shards
    report = ScoreReport(model_version="v1")
    tally = SlideTally(report)

    tally.add(SlidePlan("9", "fp", 5, "new", shards, done=frozenset({0})))
    tally.add(None)  # finished by another run meanwhile
    tally.add(SlidePlan("8", "fp", 0, "new", (), done=frozenset()))

    assert report.up_to_date == 1 and report.shards_resumed == 1
    assert tally.complete("8") and not tally.complete("9")

    def result(index: int, *, resumed: bool = False) -> ShardResult:
        return ShardResult("9", index, 3, len(shards[index].cells), 0, 0, 0.1, resumed=resumed)

    assert tally.shard_done(result(1)) is False
    assert tally.shard_done(result(2, resumed=True)) is True
    assert report.shards_scored == 1 and report.cells == len(shards[1].cells)
    assert report.shards_resumed == 2
    assert tally.pop("9").slide == "9" and not tally.complete("9")
    tally.drop("8")
    assert tally.shard_done(result(1)) is None and report.shards_scored == 1


def test_batched_fetch_keeps_every_cell_in_its_place(s3_store: S3Store,
                                                     tiny_model: Path) -> None:
    """Cells fetched a few per ``get_many`` call: chunks that do not divide the cells or the batch,
    an empty object (refused from the listing, never fetched) and a missing one inside a
    chunk all land on their own row, as they do one cell per request."""
    from malaria.scoring.infer import score_cells
    from malaria.scoring.model import ModelRef, load_model

    cells = []
    for n, cell in enumerate(generate_scan_cells(9, slide_id=701, seed=2)):
        key = f"scans/701/c{n}.png"
        s3_store.put_bytes(key, cell.data)
        cells.append(Cell(key, "e", len(cell.data)))
    s3_store.put_bytes("scans/701/empty.png", b"")
    cells.insert(4, Cell("scans/701/empty.png", "e", 0))
    cells.insert(7, Cell("scans/701/gone.png", "e", 99))
    model = load_model(ModelRef("t", 0.5, "file", str(tiny_model)))
    one_by_one = score_cells(s3_store, cells, model, batch_size=4, keys_per_fetch=1)
    assert one_by_one[4][0] is None and one_by_one[4][1] != ""
    assert one_by_one[7] == (None, "missing_object")
    assert sum(p is not None for p, _ in one_by_one) == 9
    for keys_per_fetch in (3, 8, 32):
        batched = score_cells(s3_store, cells, model, batch_size=4,
                              keys_per_fetch=keys_per_fetch)
        assert [e for _, e in batched] == [e for _, e in one_by_one]
        assert [p is None for p, _ in batched] == [p is None for p, _ in one_by_one]
        assert [p for p, _ in batched if p is not None] == pytest.approx(
            [p for p, _ in one_by_one if p is not None], abs=1e-6)
