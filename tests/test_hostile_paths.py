"""Hostile bucket contents and hostile names (issue 13, findings 1, 2, 9 and 11): nothing a
bucket writer controls (a key, a model record, a slide or file name) puts a file outside its
folder on a worker, or a formula into a CSV a person opens."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from malaria.core import layout
from malaria.io.store import LocalStore, S3Store, StorageError, check_key

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def cells_of(text: str) -> list[str]:
    return [cell for row in csv.reader(io.StringIO(text)) for cell in row]


def assert_formula_safe(text: str) -> None:
    unsafe = [cell for cell in cells_of(text) if cell.startswith(FORMULA_STARTS)]
    assert unsafe == [], f"cells a spreadsheet would evaluate: {unsafe}"


# ------------------------------------------------------------------------- keys (finding 2)


@pytest.mark.parametrize("key", ["a//b", "a/", "a/b//", "//a", "a/./b", "./a", "a/..", ".",
                                 "..", "/a", "", "a\x00b"])
def test_keys_with_empty_dot_or_dotdot_segments_are_refused(key: str) -> None:
    with pytest.raises(StorageError, match="invalid object key"):
        check_key(key)


@pytest.mark.parametrize("key", ["a", "a/b.png", "scans/=1+2/cell .png", "a/.hidden", "a/..b"])
def test_ordinary_keys_pass(key: str) -> None:
    assert check_key(key) == key


def _raw_put(store: S3Store, key: str, data: bytes) -> None:
    """What a hostile bucket writer does: any key at all, past the product's checks."""
    store.client.put_object(Bucket=store.bucket, Key=key, Body=data)


def test_download_folder_never_writes_outside_its_folder(
        s3_store: S3Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from malaria.model.checkpoints import download_folder

    prefix = layout.checkpoint_prefix("run1")
    s3_store.put_bytes(prefix + "state.json", b"{}")
    s3_store.put_bytes(prefix + "sub/last.keras", b"model")
    outside = tmp_path / "outside" / "planted.pth"
    _raw_put(s3_store, prefix + str(outside), b"evil")  # "<prefix>//tmp/.../planted.pth"
    _raw_put(s3_store, prefix + "a/../../../escaped.txt", b"evil")
    folder = tmp_path / "work" / "ckpt"
    folder.mkdir(parents=True)

    with caplog.at_level(logging.WARNING):
        count = download_folder(s3_store, prefix, folder)

    assert count == 2
    assert files_under(tmp_path) == {"work/ckpt/state.json", "work/ckpt/sub/last.keras"}
    assert not outside.exists()
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 2


# -------------------------------------------------------------------- local store (finding 2)


def test_local_store_never_reaches_outside_its_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    root = tmp_path / "bucket"
    store = LocalStore(root)
    store.put_bytes("scans/1/a.png", b"a")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "scans" / "1" / "b.png").symlink_to(outside / "secret.txt")

    # A listing neither walks a symlinked folder nor names a symlinked file.
    assert [i.key for i in store.list("")] == ["scans/1/a.png"]
    with pytest.raises(StorageError):
        list(store.list("../"))
    with pytest.raises(StorageError):
        list(store.list("scans/../../"))
    # Reads and writes through a link out of the root are refused.
    with pytest.raises(StorageError):
        store.get_bytes("link/secret.txt")
    with pytest.raises(StorageError):
        store.put_bytes("link/planted.txt", b"evil")
    with pytest.raises(StorageError):
        store.get_bytes("scans/1/b.png")
    with pytest.raises(StorageError):
        store.put_bytes("scans//x.png", b"evil")
    assert files_under(outside) == {"secret.txt"}


# ------------------------------------------------------------------- model file (finding 1)


def _plant_model(store: S3Store, tmp_path: Path, file_name: str) -> bytes:
    """Register v1 honestly, then rewrite its record the way a bucket writer could: the model
    file name points out of the download folder, and the checksum matches the planted
    bytes (it lives in the same bucket)."""
    from malaria.registry.registry import ModelRegistry

    model = tmp_path / "model.keras"
    model.write_bytes(b"honest weights")
    ModelRegistry(store).register("v1", model, {"threshold": 0.5, "metrics": {}}, {})
    planted = b"import os  # runs at the next worker start\n"
    record = json.loads(store.get_bytes("models/v1/metrics.json"))
    record["model"]["file"] = file_name
    record["model"]["sha256"] = hashlib.sha256(planted).hexdigest()
    store.put_bytes("models/v1/metrics.json", json.dumps(record).encode())
    _raw_put(store, f"models/v1/{file_name}", planted)
    return planted


@pytest.mark.parametrize("name", ["absolute", "dotdot"])
def test_download_model_refuses_a_file_name_that_leaves_the_folder(
        s3_store: S3Store, tmp_path: Path, name: str) -> None:
    from malaria.registry.registry import ModelRegistry, RegistryError

    outside = tmp_path / "site-packages" / "usercustomize.py"
    outside.parent.mkdir()
    folder = tmp_path / "download"
    folder.mkdir()
    file_name = str(outside) if name == "absolute" else "../site-packages/usercustomize.py"
    _plant_model(s3_store, tmp_path, file_name)
    with pytest.raises(RegistryError, match="model file name"):
        ModelRegistry(s3_store).download_model("v1", folder)
    assert not outside.exists()
    assert files_under(folder) == set()


def test_serving_and_scoring_refuse_a_hostile_model_record(
        s3_store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        clients_find_moto: None) -> None:
    from malaria.model.serving import registered_model_file
    from malaria.registry.registry import ModelRegistry, RegistryError
    from malaria.scoring.model import ModelRef, _model_file

    monkeypatch.setenv("MALARIA_CACHE_DIR", str(tmp_path / "cache"))
    outside = tmp_path / "site-packages" / "usercustomize.py"
    outside.parent.mkdir()
    _plant_model(s3_store, tmp_path, str(outside))
    with pytest.raises(RegistryError, match="model file name"):
        registered_model_file(ModelRegistry(s3_store), "v1")
    with pytest.raises(RegistryError, match="model file name"):
        _model_file(ModelRef("v1", 0.5, "registry", s3_store.url))
    assert not outside.exists()


def test_only_keras_archives_are_loaded(tmp_path: Path) -> None:
    import keras

    from malaria.model.serving import load_model_file

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    legacy = tmp_path / "model.h5"
    model.save(legacy)  # the legacy HDF5 loader has had safe_mode bypasses
    with pytest.raises(ValueError, match=r"\.keras"):
        load_model_file(legacy)
    fake = tmp_path / "fake.keras"
    fake.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"\.keras"):
        load_model_file(fake)
    # A Lambda layer (arbitrary code) is refused even if unsafe deserialization was switched
    # on globally somewhere in the process.
    lam = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    lambda_file = tmp_path / "lambda.keras"
    lam.save(lambda_file)
    from keras.src.saving import serialization_lib

    before = serialization_lib.in_safe_mode()
    keras.config.enable_unsafe_deserialization()
    try:
        with pytest.raises(ValueError, match="safe_mode"):
            load_model_file(lambda_file)
    finally:
        serialization_lib.global_state.set_global_attribute("safe_mode_saving", before)
    ok = tmp_path / "ok.keras"
    model.save(ok)
    assert load_model_file(ok).count_params() == model.count_params()


def test_the_keras_floor_is_declared() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    for extra in ("cpu", "gpu"):
        floors = [d for d in extras[extra] if d.replace(" ", "").startswith("keras>=")]
        assert floors, f"no keras floor in the {extra} extra"
        version = floors[0].replace(" ", "").split(">=")[1].split(",")[0]
        major, minor = (int(part) for part in version.split(".")[:2])
        assert (major, minor) >= (3, 14)  # CVE-2025-1550, -8747, -9906, CVE-2026-1462 fixed


# ---------------------------------------------------------------------- CSVs (finding 9)


def test_manifest_cells_are_escaped_and_read_back_exactly() -> None:
    from malaria.ingest.manifest import ManifestRow, read_rows, rows_to_csv

    rows = [ManifestRow(run_id="r", source_key="incoming/=1+2.png", size=3, etag="-e",
                        outcome="quarantined", reason="not_an_image",
                        detail='=HYPERLINK("http://127.0.0.1/x","click")', label="Parasitized",
                        slide="@SUM(A1)", quarantine_key="quarantine/x/+1.png",
                        converted_from="\tTAB"),
            ManifestRow(run_id="r", source_key="incoming/ok.png", size=1, etag="e",
                        outcome="accepted", slide="'=already quoted", detail="\rCR")]
    data = rows_to_csv(rows)
    assert_formula_safe(data.decode())
    assert list(read_rows(data)) == rows


def test_prediction_and_summary_csvs_hold_no_formula_and_round_trip(
        local_store: LocalStore, tiny_model: Path) -> None:
    from malaria.scoring.model import resolve_model
    from malaria.scoring.output import finalize_slide, rebuild_summary
    from malaria.scoring.paths import ScoringPaths
    from malaria.scoring.shards import plan_slide, score_shard
    from malaria_dev.synthetic import generate_scan_cells

    slides = {"=1+2": ["=cell.png", "-cell.png", "@cell.png"], "@SUM(1)": ["+cell.png"],
              "-5": ["cell.png"]}
    for slide, names in slides.items():
        for name, cell in zip(names, generate_scan_cells(len(names), slide_id=7, seed=1),
                              strict=True):
            local_store.put_bytes(f"{layout.SCANS}{slide}/{name}", cell.data)
    paths = ScoringPaths.bucket(local_store.url)
    ref = resolve_model(paths, tiny_model)
    for slide, names in slides.items():
        plan = plan_slide(paths, ref.version, slide, shard_size=2)
        assert plan is not None
        for shard in plan.pending:
            score_shard(paths, ref, shard, batch_size=4)
        summary = finalize_slide(paths, ref, plan)  # compares the keys it reads back
        assert summary.cells_scored == len(names)
        text = local_store.get_bytes(paths.prediction_key(slide)).decode()
        assert_formula_safe(text)
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [r["slide"] for r in rows] == ["'" + slide] * len(names)
        assert plan_slide(paths, ref.version, slide) is None  # done: the marker round trips
    written, _ = rebuild_summary(paths)
    assert written
    summary_text = local_store.get_bytes(paths.summary_key).decode()
    assert_formula_safe(summary_text)
    assert rebuild_summary(paths) == (False, [])  # read back, it shows every slide


def test_a_scan_key_with_an_empty_segment_is_an_error_row(
        s3_store: S3Store, tiny_model: Path, clients_find_moto: None) -> None:
    from malaria.scoring.model import resolve_model
    from malaria.scoring.output import finalize_slide
    from malaria.scoring.paths import ScoringPaths
    from malaria.scoring.shards import plan_slide, score_shard
    from malaria_dev.synthetic import generate_scan_cells

    good, bad = generate_scan_cells(2, slide_id=3, seed=2)
    s3_store.put_bytes(f"{layout.SCANS}3/a.png", good.data)
    _raw_put(s3_store, f"{layout.SCANS}3//b.png", bad.data)
    paths = ScoringPaths.bucket(s3_store.url)
    ref = resolve_model(paths, tiny_model)
    plan = plan_slide(paths, ref.version, "3")
    assert plan is not None and plan.cells == 2
    results = [score_shard(paths, ref, shard) for shard in plan.pending]
    assert sum(r.unreadable for r in results) == 1
    finalize_slide(paths, ref, plan)
    rows = list(csv.DictReader(io.StringIO(
        s3_store.get_bytes(paths.prediction_key("3")).decode())))
    assert {r["key"]: r["error"] for r in rows} == {f"{layout.SCANS}3//b.png": "invalid_key",
                                                    f"{layout.SCANS}3/a.png": ""}


# ------------------------------------------------------------------ training records (5)


def test_dataset_keys_training_cannot_use_are_counted_and_logged(
        local_store: LocalStore, caplog: pytest.LogCaptureFixture) -> None:
    from malaria.dataset.records import records_from_store

    local_store.put_bytes("dataset/Parasitized/C1/a.png", b"a")
    local_store.put_bytes("dataset/Parasitized/C1/extra/b.png", b"b")  # slide "C1/extra"
    local_store.put_bytes("dataset/Uninfected/C2/notes.txt", b"c")
    local_store.put_bytes("dataset/Unknownclass/C3/d.png", b"d")
    skipped: Counter[str] = Counter()
    with caplog.at_level(logging.WARNING):
        records = records_from_store(local_store, skipped=skipped)
    assert [r.key for r in records] == ["dataset/Parasitized/C1/a.png"]
    assert skipped == {"not_class_slide_file": 1, "not_an_image_name": 1, "unknown_class": 1}
    assert any("3 objects under dataset/ are not training cells" in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------- upload_tree (finding 11)


def test_upload_tree_skips_symlinks_and_reports_them(tmp_path: Path) -> None:
    from malaria_dev.datasets import upload_tree

    secret = tmp_path / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"aws_secret_access_key = planted")
    src = tmp_path / "tree"
    (src / "Parasitized").mkdir(parents=True)
    (src / "Parasitized" / "a.png").write_bytes(b"png")
    (src / "Parasitized" / "b.png").symlink_to(secret)
    (src / "Uninfected").symlink_to(secret.parent, target_is_directory=True)
    bucket = tmp_path / "bucket"

    result = upload_tree(src, bucket.as_uri(), progress=False)

    assert result.uploaded == 1
    assert result.skipped == 2
    assert result.skipped_links == ("Parasitized/b.png", "Uninfected")
    assert files_under(bucket) == {"incoming/Parasitized/a.png"}
