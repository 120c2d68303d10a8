"""Lineage: every registered model lists the exact cells it saw (key, ETag, class, slide,
split), with the flow run, code version and package versions, and can be trained again on
exactly those cells."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from malaria.core import layout
from malaria.core.labels import PARASITIZED, UNINFECTED
from malaria.dataset.records import CellRecord, records_from_store
from malaria.dataset.split import SlideSplit, split_by_slide
from malaria.io.store import LocalStore, S3Store
from malaria.registry import provenance
from malaria.registry.lineage import (
    LineageError,
    LineageMismatch,
    LineageRow,
    lineage_csv,
    lineage_rows,
    parse_lineage,
    resolve,
    split_of,
)
from malaria.registry.registry import ModelRegistry, RegistryError
from malaria_cli.main import main
from malaria_dev.synthetic import generate_cells

VERSION = "20260101T000000Z-aaaaaa"


def fill_dataset(store: S3Store | LocalStore, n: int, *, slides: int = 6, seed: int = 3) -> None:
    cells = list(generate_cells(n, slides=slides, seed=seed))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: store.put_bytes(
            layout.dataset_key(c.class_name, str(c.slide_id), c.file_name), c.data), cells))


def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.keras"
    path.write_bytes(b"weights")
    return path


def register_with_lineage(store: S3Store | LocalStore, tmp_path: Path,
                          record: dict[str, object] | None = None,
                          ) -> tuple[list[CellRecord], SlideSplit]:
    records = records_from_store(store)
    split = split_by_slide(records, seed=0)
    ModelRegistry(store).register(VERSION, model_file(tmp_path), record or {"threshold": 0.5},
                                  {}, lineage=lineage_rows(records, split),
                                  flow_run_id="run-1234")
    return records, split


@pytest.fixture
def bucket(tmp_path: Path) -> Iterator[LocalStore]:
    store = LocalStore(tmp_path / "bucket")
    fill_dataset(store, 60)
    yield store


# ------------------------------------------------------------------------------ records


def test_records_carry_the_listing_etag(any_store: S3Store | LocalStore) -> None:
    fill_dataset(any_store, 12)
    listed = {info.key: info.etag for info in any_store.list(layout.DATASET)}
    records = records_from_store(any_store)
    assert len(records) == 12
    assert all(r.etag and r.etag == listed[r.key] for r in records)
    assert all(r.content_id.startswith(r.etag) for r in records)


# ------------------------------------------------------------------------------- the CSV


def test_lineage_csv_round_trips_and_is_formula_safe() -> None:
    # A slide folder is whatever an upload named it: here a formula.
    records = [CellRecord("dataset/Parasitized/=1+2/a.png", 1, "=1+2", "e1-9", "e1"),
               CellRecord("dataset/Uninfected/2/b.png", 0, "2", "e2-9", "e2"),
               CellRecord("dataset/Uninfected/3/c.png", 0, "3", "e3-9", "e3"),
               CellRecord("dataset/Uninfected/9/unused.png", 0, "9", "e9-9", "e9")]
    split = SlideSplit(["=1+2"], ["2"], ["3"])
    rows = lineage_rows(records, split)
    # Slide 9 is in no split: the model never saw it, so the lineage does not list it.
    assert [r.key for r in rows] == sorted(r.key for r in records[:3])
    assert {r.key: r.split for r in rows}["dataset/Uninfected/2/b.png"] == "val"
    data = lineage_csv(rows)
    assert data.splitlines()[0] == b"key,etag,class,slide,split"
    assert b",'=1+2," in data  # a spreadsheet shows it as text, never runs it
    assert parse_lineage(data) == rows
    assert split_of(rows) == split


def test_lineage_refuses_cells_without_etag_and_bad_files() -> None:
    with pytest.raises(LineageError, match="no ETag"):
        lineage_rows([CellRecord("dataset/Uninfected/1/a.png", 0, "1", "x")],
                     SlideSplit(["1"], [], []))
    with pytest.raises(LineageError, match="columns"):
        parse_lineage(b"key,label\nx,1\n")
    with pytest.raises(LineageError, match="line 2"):
        parse_lineage(b"key,etag,class,slide,split\nk,e,Parasitized,1,holdout\n")
    with pytest.raises(LineageError, match="line 2"):
        parse_lineage(b"key,etag,class,slide,split\nk,e,Parasitized\n")
    with pytest.raises(LineageError, match="more than one split"):
        split_of([LineageRow("a", "e", PARASITIZED, "1", "train"),
                  LineageRow("b", "e", UNINFECTED, "1", "test")])


# --------------------------------------------------------------------------- registering


def test_register_writes_lineage_and_provenance(any_store: S3Store | LocalStore,
                                                tmp_path: Path) -> None:
    fill_dataset(any_store, 30)
    records, split = register_with_lineage(any_store, tmp_path)
    registry = ModelRegistry(any_store)
    record = registry.get(VERSION)

    lineage = record["lineage"]
    assert lineage["key"] == layout.lineage_key(VERSION) == f"models/{VERSION}/lineage.csv"
    assert lineage["rows"] == len(records) == 30
    assert sum(lineage["classes"].values()) == 30
    assert lineage["slides"] == {part: len(getattr(split, part))
                                 for part in ("train", "val", "test")}
    assert sum(sum(c.values()) for c in lineage["splits"].values()) == 30
    assert lineage["sha256"] == hashlib.sha256(
        any_store.get_bytes(lineage["key"])).hexdigest()

    prov = record["provenance"]
    assert prov["flow_run_id"] == "run-1234"
    assert {"tensorflow", "keras", "numpy", "prefect", "pillow", "pandas", "boto3",
            "python"} == set(prov["packages"])
    assert prov["packages"]["numpy"] and prov["packages"]["prefect"]
    assert prov["code"]["source"] in ("env", "git", "package")
    # The short forms older readers know are still there.
    assert set(record["packages"]) == {"tensorflow", "keras", "numpy", "python"}

    rows = registry.get_lineage(VERSION)
    assert [(r.key, r.etag, r.slide) for r in rows] == [(r.key, r.etag, r.slide)
                                                        for r in records]
    assert split_of(rows) == split


def test_lineage_file_is_checked_against_the_record(bucket: LocalStore, tmp_path: Path) -> None:
    register_with_lineage(bucket, tmp_path)
    registry = ModelRegistry(bucket)
    key = layout.lineage_key(VERSION)
    bucket.put_bytes(key, bucket.get_bytes(key).replace(b"val", b"train", 1))
    with pytest.raises(LineageError, match="altered"):
        registry.get_lineage(VERSION)
    bucket.delete(key)
    with pytest.raises(LineageError, match="missing"):
        registry.get_lineage(VERSION)
    # A version registered without a lineage (before lineages were kept) says so.
    registry.register("20260102T000000Z-bbbbbb", model_file(tmp_path), {}, {})
    assert "lineage" not in registry.get("20260102T000000Z-bbbbbb")
    with pytest.raises(LineageError, match="no lineage"):
        registry.get_lineage("20260102T000000Z-bbbbbb")
    with pytest.raises(RegistryError, match="invalid or clashing"):
        registry.register("20260103T000000Z-cccccc", _renamed(tmp_path, "lineage.csv"), {}, {})


def _renamed(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(b"x")
    return path


# ---------------------------------------------------------------------------- resolving


def test_resolve_gives_the_same_cells_and_split(bucket: LocalStore, tmp_path: Path) -> None:
    from malaria.model.candidate import data_manifest_hash

    records, split = register_with_lineage(bucket, tmp_path)
    fill_dataset(bucket, 20, slides=[301, 302], seed=9)  # ingested later: not in the lineage
    again, again_split = resolve(bucket, VERSION, ModelRegistry(bucket).get_lineage(VERSION))
    assert again == records and again_split == split
    assert data_manifest_hash(again) == data_manifest_hash(records)


def test_changed_or_missing_objects_are_named_not_dropped(bucket: LocalStore,
                                                          tmp_path: Path) -> None:
    records, _ = register_with_lineage(bucket, tmp_path)
    changed, gone = records[0].key, records[5].key
    bucket.put_bytes(changed, bucket.get_bytes(changed) + b"tampered")
    bucket.delete(gone)
    with pytest.raises(LineageMismatch) as raised:
        resolve(bucket, VERSION, ModelRegistry(bucket).get_lineage(VERSION))
    error = raised.value
    assert error.missing == [gone]
    assert [c[0] for c in error.changed] == [changed]
    assert error.changed[0][1] == records[0].etag != error.changed[0][2]
    assert gone in str(error) and changed in str(error) and "2 of 60 cells" in str(error)


def test_load_training_data_takes_the_lineage_and_keeps_the_recorded_split(
        bucket: LocalStore, tmp_path: Path) -> None:
    from prefect.logging import disable_run_logger

    from malaria.model.config import RetrainConfig
    from tasks.training import TrainingData, load_training_data

    config = RetrainConfig(arch="cellnet-tiny", input_size=32)
    cache = str(tmp_path / "cache")
    with disable_run_logger():
        fresh = load_training_data.fn(bucket.url, config, cache)
    assert isinstance(fresh, TrainingData) and fresh.retrained_from is None
    assert len(fresh.lineage) == 60 and split_of(fresh.lineage) == fresh.split

    # A split the splitting rule would not choose: re-training keeps it all the same.
    records = records_from_store(bucket)
    slides = sorted({r.slide for r in records})
    odd = SlideSplit(slides[3:], slides[:1], slides[1:3])
    assert odd != fresh.split
    ModelRegistry(bucket).register(VERSION, model_file(tmp_path), {}, {},
                                   lineage=lineage_rows(records, odd))
    fill_dataset(bucket, 10, slides=[301], seed=5)
    with disable_run_logger():
        again = load_training_data.fn(bucket.url, config, cache, lineage_version=VERSION)
    assert again.split == odd and again.retrained_from == VERSION
    assert len(again.train) + len(again.val) + len(again.test) == 60
    assert again.manifest_sha256 == fresh.manifest_sha256


# -------------------------------------------------------------------------------- code


def test_code_version_from_env_git_files_or_package(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALARIA_CODE_REVISION", "release-1.2.3")
    assert provenance.code_version(tmp_path)["revision"] == "release-1.2.3"
    assert provenance.code_version(tmp_path)["source"] == "env"
    monkeypatch.delenv("MALARIA_CODE_REVISION")

    sha, other = "a" * 40, "b" * 40
    repo = tmp_path / "repo"
    (repo / ".git" / "refs" / "heads").mkdir(parents=True)
    (repo / "src" / "pkg").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".git" / "refs" / "heads" / "main").write_text(sha + "\n")
    found = provenance.code_version(repo / "src" / "pkg")
    assert found["revision"] == sha and found["source"] == "git"
    assert found["package"] == provenance._distribution_version(provenance.PACKAGE_NAME)
    # A branch only in packed-refs, and a worktree whose .git is a file.
    (repo / ".git" / "refs" / "heads" / "main").unlink()
    (repo / ".git" / "packed-refs").write_text(f"# pack-refs\n{sha} refs/heads/main\n")
    assert provenance.git_head(repo) == sha
    worktree = repo / ".git" / "worktrees" / "wt"
    worktree.mkdir(parents=True)
    (worktree / "HEAD").write_text(other + "\n")  # detached
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {worktree}\n")
    assert provenance.git_head(tmp_path / "wt") == other
    (worktree / "HEAD").write_text("ref: refs/heads/main\n")
    (worktree / "commondir").write_text("../..\n")
    assert provenance.git_head(tmp_path / "wt") == sha
    # No checkout at all (an image): the package version is what there is.
    plain = tmp_path / "plain"
    plain.mkdir()
    assert provenance.code_version(plain) == {
        "revision": None, "dirty": None, "source": "package",
        "package": provenance._distribution_version(provenance.PACKAGE_NAME)}


# ---------------------------------------------------------------------------------- CLI


def test_models_show_prints_the_lineage_summary(bucket: LocalStore, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    register_with_lineage(bucket, tmp_path, {"threshold": 0.42, "architecture": "cellnet",
                                             "metrics": {"accuracy": 0.95, "roc_auc": 0.98}})
    ModelRegistry(bucket).record_decision(VERSION, {"promote": True, "reason": "first model"})
    url = ["--data-url", bucket.url]
    assert main(["models", "show", VERSION, *url]) == 0
    shown = capsys.readouterr().out
    assert f"model {VERSION}" in shown and "accuracy 0.9500" in shown
    assert "gate        promoted: first model" in shown
    assert "flow run    run-1234" in shown
    assert "prefect " in shown and "tensorflow " in shown
    assert f"models/{VERSION}/lineage.csv: 60 cells" in shown
    for part in ("train", "val", "test"):
        assert f"              {part}" in shown
    assert main(["models", "show", VERSION, "--json", *url]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["record"]["lineage"]["rows"] == 60 and document["gate"]["promote"]


def test_train_from_lineage_retrains_on_the_same_cells(bucket: LocalStore, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from malaria.model.config import RetrainConfig

    monkeypatch.setenv("MALARIA_CACHE_DIR", str(tmp_path / "cache"))
    config = RetrainConfig(arch="cellnet-tiny", input_size=32, epochs=1, batch_size=32,
                           tta=False)
    from malaria.model.candidate import data_manifest_hash

    records = records_from_store(bucket)
    register_with_lineage(bucket, tmp_path, {"config": dataclasses.asdict(config),
                                             "data_manifest_sha256":
                                             data_manifest_hash(records)})
    fill_dataset(bucket, 10, slides=[301], seed=5)  # later cells are not trained on
    out = tmp_path / "again" / "model.keras"
    out.parent.mkdir()
    assert main(["train", "--from-lineage", VERSION, "--out", str(out),
                 "--data-url", bucket.url, "--seed", "7"]) == 0
    assert "re-trained on the 60 cells" in capsys.readouterr().out
    card = json.loads(out.with_name("model.keras.json").read_text())
    assert card["retrained_from"] == {"version": VERSION, "same_data": True,
                                      "data_manifest_sha256": data_manifest_hash(records)}
    recorded = ModelRegistry(bucket).get(VERSION)
    assert card["slides"] == {part: getattr(split_of(ModelRegistry(bucket).get_lineage(
        VERSION)), part) for part in ("train", "val", "test")}
    assert card["lineage"]["sha256"] == recorded["lineage"]["sha256"]
    assert card["config"]["arch"] == "cellnet-tiny" and card["config"]["seed"] == 7
    assert sum(card["cells"].values()) == 60

    # A cell changed since: the re-training stops and names it.
    bucket.put_bytes(records[0].key, b"replaced")
    assert main(["train", "--from-lineage", VERSION, "--out", str(out),
                 "--data-url", bucket.url]) == 1
    assert records[0].key in capsys.readouterr().err


# ------------------------------------------------------------------------- the task layer


@pytest.mark.integration
def test_register_candidate_records_the_flow_run_and_the_loaded_lineage(
        bucket: LocalStore, tmp_path: Path, prefect_harness: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The registering task passes the lineage taken at load time and its flow run's id
    (training and evaluation stubbed: only the registration is under test here)."""
    from types import SimpleNamespace

    from prefect import flow
    from prefect.runtime import flow_run

    import tasks.training as training
    from malaria.model.config import RetrainConfig

    config = RetrainConfig(arch="cellnet-tiny", input_size=32)
    monkeypatch.setattr(training, "save_for_serving",
                        lambda _model, path: Path(path).write_bytes(b"weights"))
    monkeypatch.setattr(training, "metrics_document",
                        lambda _c, data, _e, _t: {"data_manifest_sha256": data.manifest_sha256})

    @flow
    def register_only() -> tuple[str, str]:
        data = training.load_training_data(bucket.url, config, str(tmp_path / "cache"))
        fill_dataset(bucket, 10, slides=[301], seed=5)  # ingested while it "trained"
        version = training.register_candidate(
            bucket.url, {"model": None, "summary": {}}, data,
            SimpleNamespace(plots={}), config)
        return version, str(flow_run.get_id())

    version, run_id = register_only()
    record = ModelRegistry(bucket).get(version)
    assert record["provenance"]["flow_run_id"] == run_id
    assert record["lineage"]["rows"] == 60  # not the 70 listed at registration time
    rows = ModelRegistry(bucket).get_lineage(version)
    assert {r.slide for r in rows} == {str(s) for s in range(201, 207)}
