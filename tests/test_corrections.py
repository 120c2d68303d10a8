"""Label corrections: a reviewer's verdict file moves a cell to the other class and removes
another, the ingest run's manifest says who and why, later ingests keep the verdicts, and
the next training sees the corrected dataset. Plus the parsing rules, crash recovery and the
`malaria labels` commands."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from malaria.core import layout
from malaria.core.labels import PARASITIZED, UNINFECTED
from malaria.ingest.corrections import apply_corrections, corrections_ledger_key
from malaria.ingest.ledger import load_labels, load_ledger
from malaria.ingest.manifest import ManifestRow, rows_to_csv
from malaria.ingest.verdicts import (
    BAD_LABEL,
    MISSING_COLUMNS,
    MISSING_VALUE,
    UNREADABLE_FILE,
    parse_verdicts,
)
from malaria.io.store import LocalStore, S3Store, put_json
from malaria_dev.synthetic import generate_cells

Store = S3Store | LocalStore
HEADER = "key,label,reason,reviewer\n"
# Run ids sort by time, so the ledger replays older runs first.
OLD_RUN = "ingest-20260101T000000-000000"


def ingest(store: Store) -> dict[str, Any]:
    from flows.ingest import ingest_flow

    return ingest_flow(data_url=store.url)


def manifest(store: Store, key: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.get_bytes(key)), keep_default_na=False)


def dataset(store: Store) -> set[str]:
    return {info.key for info in store.list(layout.DATASET)}


def put_cells(store: Store, n: int = 12, seed: int = 5) -> list[ManifestRow]:
    """Ingest-like rows for ``n`` cells written straight to dataset/, plus their ledger part:
    the state a real ingest leaves, without a Prefect run."""
    rows = []
    for cell in generate_cells(n, slides=2, seed=seed):
        key = layout.dataset_key(cell.class_name, str(cell.slide_id), cell.file_name)
        store.put_bytes(key, cell.data)
        rows.append(ManifestRow(OLD_RUN, f"incoming/{cell.class_name}/{cell.file_name}",
                                len(cell.data), "etag", "accepted", label=cell.class_name,
                                slide=str(cell.slide_id),
                                sha256=hashlib.sha256(cell.data).hexdigest(), dataset_key=key))
    store.put_bytes(layout.ingest_ledger_key(OLD_RUN, 0), rows_to_csv(rows))
    return rows


def first_of(rows: list[ManifestRow], label: str) -> ManifestRow:
    return next(r for r in rows if r.label == label)


# ----------------------------------------------------------------------------- the file


def test_every_row_is_a_verdict_or_a_reason() -> None:
    data = (b"key,label,reason,reviewer,hint\n"
            b"dataset/Parasitized/1/a.png,uninfected,no inclusion,dr a,extra is ignored\n"
            b"dataset/Parasitized/1/b.png,EXCLUDE,blurred,dr a\n"
            b",,,\n"  # blank: not a verdict
            b"dataset/Parasitized/1/c.png,maybe,unsure,dr a\n"
            b"dataset/Parasitized/1/d.png,Uninfected,,dr a\n"
            b"'=dataset/x.png,Uninfected,\"two\nlines\",dr b\n")
    verdicts = parse_verdicts(data).verdicts
    assert [(v.line, v.label, v.problem) for v in verdicts] == [
        (2, UNINFECTED, ""), (3, "exclude", ""), (5, "maybe", BAD_LABEL),
        (6, "Uninfected", MISSING_VALUE), (8, UNINFECTED, "")]
    assert verdicts[3].detail == "no reason given"
    assert verdicts[4].key == "=dataset/x.png"  # the template's formula-safe cell, read back
    assert verdicts[4].reason == "two\nlines"

    no_reviewer = parse_verdicts(b"key,label,reason\ndataset/a.png,Uninfected,x\n")
    assert no_reviewer.missing_columns == ("reviewer",)
    assert no_reviewer.verdicts[0].problem == MISSING_COLUMNS
    assert parse_verdicts(b"\xff\xfe\x00").unreadable
    assert parse_verdicts(b"").unreadable


def test_ingest_labels_skip_the_verdict_files(local_store: LocalStore) -> None:
    local_store.put_bytes("labels/extra.csv", b"key,label\nloose/a.png,Parasitized\n")
    local_store.put_bytes("labels/corrections/v.csv", HEADER.encode() +
                          b"dataset/Parasitized/1/a.png,exclude,why,me\n")
    assert set(load_labels(local_store)) == {"loose/a.png"}


# ------------------------------------------------------------------ through the ingest flow


def test_a_correction_moves_one_cell_removes_another_and_the_next_training_sees_it(
        local_store: LocalStore, prefect_harness: None) -> None:
    from malaria.dataset.records import records_from_store
    from malaria.model.candidate import data_manifest_hash, repeats_champion
    from malaria.model.config import RetrainConfig

    store = local_store
    cells = list(generate_cells(12, slides=2, seed=3))
    for cell in cells:
        store.put_bytes(f"incoming/{cell.class_name}/{cell.file_name}", cell.data)
    first = ingest(store)
    rows = manifest(store, first["manifest"])
    moved = rows[rows.label == PARASITIZED].iloc[0]
    gone = rows[rows.label == UNINFECTED].iloc[0]
    config = RetrainConfig()
    before = data_manifest_hash(records_from_store(store))
    champion = {"data_manifest_sha256": before, "config": asdict(config)}
    assert repeats_champion(champion, "v1", before, config)  # nothing new: training skips

    # The moved cell named by its dataset key, the removed one by its incoming key.
    verdicts = (HEADER +
                f"{moved.dataset_key},Uninfected,no stained inclusion,dr lee\n"
                f"{gone.source_key},exclude,two overlapping cells,dr lee\n"
                f"{moved.source_key},exclude,same cell again,dr lee\n"
                "dataset/Parasitized/9/nope.png,Uninfected,typo,dr lee\n"
                f"{rows.dataset_key.iloc[-1]},perhaps,unsure,dr lee\n")
    store.put_bytes("labels/corrections/2026-05-review.csv", verdicts.encode())
    new_cell = next(generate_cells(1, seed=99))  # a new upload, ingested in the same run
    store.put_bytes("incoming/Parasitized/C7P1_new_cell_1.png", new_cell.data)
    second = ingest(store)

    new_key = moved.dataset_key.replace("dataset/Parasitized/", "dataset/Uninfected/")
    assert new_key in dataset(store) and moved.dataset_key not in dataset(store)
    assert gone.dataset_key not in dataset(store)
    assert second["balanced"] and second["accepted"] == 1
    assert second["already_ingested"] == len(cells)  # the originals are not re-added
    assert second["corrections"] == {"relabelled": 1, "excluded": 1, "rejected": 3}

    # The manifest says what, who and why, for every row of the file.
    log = manifest(store, second["manifest"])
    verdict_rows = log[log.reviewer != ""].set_index("verdict")
    assert len(verdict_rows) == 5
    applied = [i.key for i in store.list(layout.LABEL_CORRECTIONS_APPLIED)]
    assert len(applied) == 1 and applied[0].endswith("-2026-05-review.csv")
    assert not list(store.list("labels/corrections/2026-05-review.csv"))
    by_line = {int(v.rsplit(":", 1)[1]): row for v, row in verdict_rows.iterrows()}
    assert all(v.startswith(applied[0] + ":") for v in verdict_rows.index)
    assert (by_line[2].outcome, by_line[2].source_key, by_line[2].dataset_key,
            by_line[2].label, by_line[2].detail, by_line[2].reviewer) == (
        "relabelled", moved.dataset_key, new_key, UNINFECTED, "no stained inclusion", "dr lee")
    assert (by_line[3].outcome, by_line[3].source_key, by_line[3].detail) == (
        "excluded", gone.dataset_key, "two overlapping cells")
    sidecar = json.loads(store.get_bytes(by_line[3].quarantine_key + ".json"))
    assert sidecar["reviewer"] == "dr lee" and sidecar["detail"] == "two overlapping cells"
    assert store.exists(by_line[3].quarantine_key)
    assert [by_line[n].reason for n in (4, 5, 6)] == ["repeated_key", "unknown_key",
                                                      "bad_label"]

    # The next training sees the cell under its new class, without the removed one, and
    # does not skip as a repeat of the champion.
    records = {r.key: r for r in records_from_store(store)}
    assert records[new_key].label == 0 and gone.dataset_key not in records
    after = data_manifest_hash(records.values())
    assert after != before and repeats_champion(champion, "v1", after, config) is None

    # Later runs keep the verdicts: the removed bytes stay out, the moved bytes uploaded
    # again under their new class are a duplicate, and the same verdicts again change nothing.
    store.put_bytes("incoming/again/Uninfected/C9P9_cell_1.png",
                    store.get_bytes(by_line[3].quarantine_key))
    store.put_bytes("incoming/again/Uninfected/C9P9_cell_2.png", store.get_bytes(new_key))
    store.put_bytes("labels/corrections/again.csv", verdicts.encode())
    snapshot = dataset(store)
    third = ingest(store)
    assert dataset(store) == snapshot
    assert third["quarantined"] == 1 and third["duplicate"] == 1 and third["balanced"]
    assert third["corrections"] == {"unchanged": 2, "rejected": 3}
    log = manifest(store, third["manifest"])
    assert set(log[log.outcome == "unchanged"].reason) == {"already_applied"}


# ------------------------------------------------------------- directly, on either store


@pytest.mark.usefixtures("clients_find_moto")
def test_a_run_that_died_before_its_ledger_part_is_finished_by_the_next(
        any_store: Store) -> None:
    rows = put_cells(any_store)
    cell = first_of(rows, PARASITIZED)
    any_store.put_bytes("labels/corrections/v.csv", (
        HEADER + f"{cell.dataset_key},Uninfected,no parasite,dr a\n").encode())
    target = cell.dataset_key.replace(PARASITIZED, UNINFECTED)
    at = datetime(2026, 5, 1, tzinfo=UTC)

    class Dies(Exception):
        pass

    # The first run copies and deletes the cell, then dies before writing its ledger part.
    original_put = any_store.put_bytes

    def put_bytes(key: str, data: bytes, **kwargs: Any) -> None:
        if key.startswith(layout.INGEST_LEDGER):
            raise Dies(key)
        original_put(key, data, **kwargs)

    any_store.put_bytes = put_bytes  # type: ignore[method-assign]
    ledger = load_ledger(any_store)
    with pytest.raises(Dies):
        apply_corrections(any_store, ledger, run_id="ingest-20260501T000000-aaaaaa",
                          applied_at=at)
    del any_store.put_bytes
    assert target in dataset(any_store) and cell.dataset_key not in dataset(any_store)
    assert any_store.exists("labels/corrections/v.csv")  # still waiting

    ledger = load_ledger(any_store)
    result = apply_corrections(any_store, ledger, run_id="ingest-20260502T000000-bbbbbb",
                               applied_at=at)
    assert [r.outcome for r in result.rows] == ["relabelled"]
    assert result.rows[0].dataset_key == target
    assert result.ledger_key == corrections_ledger_key("ingest-20260502T000000-bbbbbb")
    assert dataset(any_store) == {r.dataset_key for r in rows} - {cell.dataset_key} | {target}
    # The in-memory ledger and a fresh one agree: the content is Uninfected now.
    fresh = load_ledger(any_store)
    assert fresh.content == ledger.content and fresh.dataset_keys == ledger.dataset_keys
    assert not list(any_store.list("labels/corrections/v.csv"))


def test_unreadable_file_is_one_rejected_row_and_is_kept(local_store: LocalStore) -> None:
    put_cells(local_store, 4)
    local_store.put_bytes("labels/corrections/bad.csv", b"\xff\xfe\x00\x01")
    local_store.put_bytes("labels/corrections/notes.txt", b"not a verdict file")
    result = apply_corrections(local_store, load_ledger(local_store), run_id="r",
                               applied_at=datetime(2026, 5, 1, tzinfo=UTC))
    assert [(r.outcome, r.reason) for r in result.rows] == [("rejected", UNREADABLE_FILE)]
    assert result.ledger_key is None
    assert [i.key for i in local_store.list(layout.LABEL_CORRECTIONS)] == [
        "labels/corrections/applied/2026-05-01T000000-bad.csv", "labels/corrections/notes.txt"]


def test_no_verdict_files_writes_nothing(local_store: LocalStore) -> None:
    put_cells(local_store, 4)
    before = {i.key: i.etag for i in local_store.list("")}
    result = apply_corrections(local_store, load_ledger(local_store), run_id="r",
                               applied_at=datetime(2026, 5, 1, tzinfo=UTC))
    assert result.rows == [] and {i.key: i.etag for i in local_store.list("")} == before


# ---------------------------------------------------------------------- the CLI commands


def test_labels_review_writes_a_template_with_thumbnails_and_apply_uploads_it(
        local_store: LocalStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from malaria_cli.main import main

    rows = put_cells(local_store, 6)
    version = "20260101T000000Z-aaaaaa"
    review = [{"key": r.dataset_key, "slide": r.slide, "label": r.label, "probability": 0.01}
              for r in rows[:3]]
    put_json(local_store, f"models/{version}/metrics.json", {"version": version,
                                                              "label_review": review})
    put_json(local_store, layout.CHAMPION_KEY, {"version": version})
    url = ["--data-url", local_store.url]
    out = tmp_path / "review"

    assert main(["labels", "review", "--out", str(out), "--limit", "2", *url]) == 0
    printed = capsys.readouterr().out
    assert rows[0].dataset_key in printed and rows[2].dataset_key not in printed
    table = list(csv.DictReader((out / "review.csv").open()))
    assert [t["key"] for t in table] == [r.dataset_key for r in rows[:2]]
    assert list(table[0])[:4] == ["key", "label", "reason", "reviewer"]
    with Image.open(out / table[0]["thumbnail"]) as thumbnail:
        assert thumbnail.size == (128, 128)

    table[0].update(label="exclude", reason="debris", reviewer="dr a")
    with (out / "review.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    assert main(["labels", "apply", str(out / "review.csv"), *url]) == 0
    assert "line 3: will be rejected (missing_value)" in capsys.readouterr().out
    assert local_store.exists("labels/corrections/review.csv")
    # The same name again would replace a file not applied yet: refused.
    assert main(["labels", "apply", str(out / "review.csv"), *url]) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("key,verdict\nx,y\n")
    assert main(["labels", "apply", str(bad), *url]) == 1
    assert "no label, reason, reviewer column" in capsys.readouterr().err
    assert not local_store.exists("labels/corrections/bad.csv")


def test_a_retried_attempt_reports_what_its_first_attempt_committed(
        local_store: LocalStore) -> None:
    rows = put_cells(local_store, 6)
    moved, kept = first_of(rows, PARASITIZED), first_of(rows, UNINFECTED)
    local_store.put_bytes("labels/corrections/v.csv", (
        HEADER + f"{moved.dataset_key},Uninfected,no parasite,dr a\n"
        f"{kept.dataset_key},healthy,looks fine,dr a\n").encode())
    run = dict(run_id="ingest-20260501T000000-aaaaaa", applied_at=datetime(2026, 5, 1))

    # The first attempt commits the cell and the ledger part, then fails to keep the file.
    original_copy = local_store.copy

    def copy(src: str, dst: str) -> None:
        if dst.startswith(layout.LABEL_CORRECTIONS_APPLIED):
            raise ConnectionError("store went away")
        original_copy(src, dst)

    local_store.copy = copy  # type: ignore[method-assign]
    ledger = load_ledger(local_store)
    with pytest.raises(ConnectionError):
        apply_corrections(local_store, ledger, **run)  # type: ignore[arg-type]
    del local_store.copy

    retried = apply_corrections(local_store, ledger, **run)  # type: ignore[arg-type]
    assert [(r.outcome, r.reason) for r in retried.rows] == [
        ("relabelled", "label_correction"), ("unchanged", "label_confirmed")]
    assert [i.key for i in local_store.list(layout.LABEL_CORRECTIONS)] == [
        "labels/corrections/applied/2026-05-01T000000-v.csv"]
    assert load_ledger(local_store).content == ledger.content
