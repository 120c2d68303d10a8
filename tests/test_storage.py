"""The storage interface behaves the same over S3 (moto) and a local folder."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from malaria.io.store import (
    LocalStore,
    ObjectNotFound,
    S3Store,
    StorageError,
    get_csv,
    get_json,
    open_store,
    put_csv,
    put_json,
)


def test_put_get_head_exists_delete(any_store: S3Store | LocalStore) -> None:
    any_store.put_bytes("a/b/c.bin", b"hello")
    assert any_store.get_bytes("a/b/c.bin") == b"hello"
    assert any_store.exists("a/b/c.bin")
    info = any_store.head("a/b/c.bin")
    assert info is not None and info.size == 5 and info.etag
    any_store.delete("a/b/c.bin")
    assert not any_store.exists("a/b/c.bin")
    assert any_store.head("a/b/c.bin") is None
    with pytest.raises(ObjectNotFound):
        any_store.get_bytes("a/b/c.bin")


def test_listing_is_sorted_filtered_and_paginated(any_store: S3Store | LocalStore) -> None:
    keys = [f"incoming/Parasitized/cell_{i:04d}.png" for i in range(1005)]
    keys += ["incoming/Uninfected/x.png", "incoming/Uninfected.png", "other/y.png"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: any_store.put_bytes(k, b"x"), keys))
    listed = [info.key for info in any_store.list("incoming/")]
    expected = sorted(k for k in keys if k.startswith("incoming/"))
    assert listed == expected  # more than one page of 1,000 on S3
    partial = [info.key for info in any_store.list("incoming/Uninf")]
    assert partial == ["incoming/Uninfected.png", "incoming/Uninfected/x.png"]
    assert [info.key for info in any_store.list("missing/")] == []


def test_listing_is_lazy(any_store: S3Store | LocalStore) -> None:
    for i in range(3):
        any_store.put_bytes(f"p/{i}", b"x")
    stream = any_store.list("p/")
    assert next(stream).key == "p/0"  # a generator: nothing is materialised up front


def test_copy_is_server_side_and_missing_source_is_clear(any_store: S3Store | LocalStore) -> None:
    any_store.put_bytes("src.png", b"\x89PNG data")
    any_store.copy("src.png", "dst/copy.png")
    assert any_store.get_bytes("dst/copy.png") == b"\x89PNG data"
    with pytest.raises(ObjectNotFound):
        any_store.copy("nope.png", "dst/nope.png")


def test_json_and_csv_round_trip(any_store: S3Store | LocalStore) -> None:
    put_json(any_store, "models/champion.json", {"version": "v1", "auc": 0.99})
    assert get_json(any_store, "models/champion.json") == {"auc": 0.99, "version": "v1"}
    frame = pd.DataFrame({"key": ["a", "b"], "probability": [0.25, 0.75]})
    put_csv(any_store, "predictions/1.csv", frame)
    pd.testing.assert_frame_equal(get_csv(any_store, "predictions/1.csv"), frame)


def test_put_file_and_download_file(any_store: S3Store | LocalStore, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(b"z" * 300_000)
    any_store.put_file("blobs/big.bin", source)
    target = tmp_path / "back.bin"
    any_store.download_file("blobs/big.bin", target)
    assert target.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a/./b", "nul\x00l"])
def test_invalid_keys_are_refused(any_store: S3Store | LocalStore, key: str) -> None:
    with pytest.raises(StorageError):
        any_store.put_bytes(key, b"x")


def test_local_writes_are_atomic_and_hide_temporary_files(local_store: LocalStore) -> None:
    local_store.put_bytes("dir/file.csv", b"a,b\n1,2\n")
    (local_store.root / "dir" / ".tmp-inflight").write_bytes(b"partial")
    assert [info.key for info in local_store.list("dir/")] == ["dir/file.csv"]


def test_open_store_parses_urls(tmp_path: Path) -> None:
    s3 = open_store("s3://bucket/some/prefix")
    assert isinstance(s3, S3Store) and s3.bucket == "bucket" and s3.prefix == "some/prefix"
    assert s3.uri("x.png") == "s3://bucket/some/prefix/x.png"
    local = open_store(tmp_path.as_uri())
    assert isinstance(local, LocalStore) and local.root == tmp_path.resolve()
    with pytest.raises(StorageError):
        open_store("ftp://host/x")
    with pytest.raises(StorageError):
        open_store("s3:///no-bucket")


def test_prefixed_s3_store_keys_are_relative(moto_endpoint: str) -> None:
    root = S3Store("prefixed-bucket", endpoint_url=moto_endpoint)
    root.ensure_bucket()
    store = S3Store("prefixed-bucket", "team/a", endpoint_url=moto_endpoint)
    store.put_bytes("incoming/x.png", b"x")
    assert [i.key for i in store.list("incoming/")] == ["incoming/x.png"]
    assert [i.key for i in root.list("team/")] == ["team/a/incoming/x.png"]


@pytest.mark.parametrize(("listed", "expected"), [
    # object_store folds the folder marker "a/" into an empty "a": dropped when a key under
    # "a/" follows; keys sorting between ("a-b" < "a/") keep their order.
    ([("a", 0), ("a-b", 3), ("a/b", 0), ("a/b/c", 2), ("b", 0), ("c", 1), ("d", 0)],
     ["a-b", "a/b/c", "b", "c", "d"]),
    # A non-empty object with keys under its name is an object; an empty one with nothing
    # under it is an (empty) object too.
    ([("a", 5), ("a/x", 1), ("b", 0), ("b.txt", 1), ("b0", 1)], ["a", "a/x", "b", "b.txt", "b0"]),
])
def test_obstore_listing_drops_folder_markers_only(listed: list[tuple[str, int]],
                                                   expected: list[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime

    import malaria.io.s3 as s3

    metas = [{"path": key, "size": size, "e_tag": '"e"', "last_modified": datetime.now(UTC)}
             for key, size in listed]
    monkeypatch.setattr(s3.obstore, "list", lambda *args, **kwargs: [metas])
    monkeypatch.setattr(s3.S3Store, "reader", None)
    assert [info.key for info in s3.S3Store("bucket")._list_obstore("")] == expected
