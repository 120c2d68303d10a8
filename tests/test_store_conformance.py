"""The default S3Store behaves the same against moto and a real SeaweedFS, and through a
server that misbehaves (a 503 first, a connection closed after every response); the local
store where the same contract applies."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
from buckets import drop_bucket

from benchmarks.latency_proxy import LatencyProxy
from malaria.io.local import LocalStore
from malaria.io.s3 import S3Store, reset_clients
from malaria.io.store import ObjectNotFound, StorageError

if TYPE_CHECKING:
    from malaria_dev.stack import StackConfig

NON_ASCII_KEYS = ["scans/1/zelle-ä ü.png", "scans/slide a/été+1.png", "scans/x/a~b_c-d.(1).png",
                  "scans/emoji/😀.png", "scans/odd/%41 #?&=.png", "scans/odd/tab\tin-name.png"]


@pytest.fixture(params=["moto", pytest.param("seaweedfs", marks=pytest.mark.integration)])
def endpoint(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """An S3 endpoint, with the client environment (credentials) pointing at it."""
    if request.param == "moto":
        return str(request.getfixturevalue("moto_endpoint"))
    env = request.getfixturevalue("seaweedfs")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    return str(env["AWS_ENDPOINT_URL"])


@pytest.fixture
def store(endpoint: str) -> Iterator[S3Store]:
    reset_clients()
    created = S3Store(f"conf-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint)
    created.ensure_bucket()
    yield created
    reset_clients()


def through_proxy(store: S3Store, proxy: LatencyProxy) -> S3Store:
    reset_clients()
    return S3Store(store.bucket, endpoint_url=proxy.url)


def proxy_to(store: S3Store, **faults: object) -> LatencyProxy:
    target = urlsplit(str(store.endpoint_url))
    return LatencyProxy(str(target.hostname), int(target.port or 80), 0, **faults)  # type: ignore[arg-type]


def put_all(store: S3Store | LocalStore, items: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: store.put_bytes(*kv), items.items()))


def put_raw(store: S3Store, key: str, data: bytes) -> None:
    """Any key at all, as another S3 client may write it (the store refuses empty segments)."""
    store.client.put_object(Bucket=store.bucket, Key=key, Body=data)


def test_listing_spans_many_pages_in_key_order(store: S3Store) -> None:
    keys = [f"scans/{n // 40}/cell {n:04d}+é.png" for n in range(130)]
    put_all(store, {key: key.encode() for key in keys})
    put_raw(store, "scans/1/", b"")  # a folder marker: not an object to list
    store.put_bytes("scans/9", b"")  # an empty object that is not a folder: listed
    expected = sorted([*keys, "scans/9"])
    assert [o.key for o in store.list("scans/")] == expected  # obstore's listing
    store.fast_listing, store.list_page_size = False, 25  # boto3's paginator, six pages
    listed = list(store.list("scans/"))
    assert [o.key for o in listed] == expected
    listed.remove(next(o for o in listed if o.key == "scans/9"))
    assert all(o.size == len(o.key.encode()) for o in listed)
    # The ETag the ledger and fingerprints use: the same as HEAD, without quotes.
    head = store.head(keys[0])
    assert head is not None and listed[0].etag == head.etag and '"' not in head.etag
    assert listed[0].last_modified.tzinfo is not None
    assert [o.key for o in store.list("scans/1/cell 005")] == [
        f"scans/1/cell {n:04d}+é.png" for n in range(50, 60)]  # a prefix inside a name


def test_fast_listing_matches_boto3s_field_for_field(store: S3Store) -> None:
    put_all(store, {f"scans/{n % 3}/c{n}.png": b"x" * n for n in range(1, 40)})
    put_raw(store, "scans/0/", b"")
    fast = list(store.list("scans/"))
    store.fast_listing = False
    slow = list(store.list("scans/"))
    assert [(o.key, o.size, o.etag) for o in fast] == [(o.key, o.size, o.etag) for o in slow]
    assert all(f.last_modified == s.last_modified for f, s in zip(fast, slow, strict=True))


def test_a_key_obstore_cannot_name_does_not_stop_a_listing(store: S3Store) -> None:
    keys = ["scans/1/a.png", "scans/1//b.png", "scans/1/c.png"]  # an empty segment
    for key in keys:  # the store refuses to write such a key; a hostile writer need not
        put_raw(store, key, b"x")
    fast = [o.key for o in store.list("scans/")]
    store.fast_listing = False
    # What the server keeps: moto keeps the empty segment, SeaweedFS collapses it.
    assert fast == [o.key for o in store.list("scans/")] and len(fast) == 3


def test_listing_more_than_a_thousand_keys(store: S3Store) -> None:
    keys = [f"incoming/cell_{n:04d}.png" for n in range(1005)]
    put_all(store, dict.fromkeys(keys, b"x"))
    assert [o.key for o in store.list("incoming/")] == keys


def test_missing_keys(store: S3Store) -> None:
    store.put_bytes("scans/1/a.png", b"cell a")
    store.put_bytes("scans/1/b.png", b"cell b")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("scans/1/missing.png")
    answers = store.get_many(["scans/1/a.png", "scans/1/missing.png", "scans/1/b.png"])
    assert answers[0] == b"cell a" and answers[2] == b"cell b"
    assert isinstance(answers[1], ObjectNotFound)
    assert str(answers[1]) == repr("scans/1/missing.png")  # the caller's key, not the full one
    assert store.get_many([]) == []


def test_non_ascii_and_odd_keys(store: S3Store) -> None:
    put_all(store, {key: key.encode() for key in NON_ASCII_KEYS})
    for key in NON_ASCII_KEYS:
        assert store.get_bytes(key) == key.encode()
    assert store.get_many(NON_ASCII_KEYS) == [key.encode() for key in NON_ASCII_KEYS]
    assert [o.key for o in store.list("scans/")] == sorted(NON_ASCII_KEYS)


def test_prefixed_store_reads_relative_keys(store: S3Store) -> None:
    prefixed = S3Store(store.bucket, "team/a", endpoint_url=store.endpoint_url)
    prefixed.put_bytes("scans/1/zelle-ä.png", b"x")
    assert prefixed.get_many(["scans/1/zelle-ä.png", "scans/1/no.png"])[0] == b"x"
    assert store.get_bytes("team/a/scans/1/zelle-ä.png") == b"x"
    assert [o.key for o in prefixed.list("scans/")] == ["scans/1/zelle-ä.png"]


def test_a_5xx_is_retried(store: S3Store) -> None:
    store.put_bytes("scans/1/a.png", b"cell a")
    store.put_bytes("scans/1/b.png", b"cell b")
    with proxy_to(store, fail_first=1) as proxy:
        assert through_proxy(store, proxy).get_bytes("scans/1/a.png") == b"cell a"
        assert proxy.failed == 1 and proxy.requests >= 2
    with proxy_to(store, fail_first=2) as proxy:
        answers = through_proxy(store, proxy).get_many(["scans/1/a.png", "scans/1/b.png"])
        assert answers == [b"cell a", b"cell b"] and proxy.failed == 2
    with proxy_to(store, fail_first=1) as proxy:
        assert [o.key for o in through_proxy(store, proxy).list("scans/")] == [
            "scans/1/a.png", "scans/1/b.png"]
        assert proxy.failed == 1


def test_a_server_that_closes_after_each_response(store: S3Store) -> None:
    keys = [f"scans/2/cell_{n:02d}.png" for n in range(40)]
    put_all(store, {key: key.encode() * 50 for key in keys})
    with proxy_to(store, close_each=True) as proxy:
        closing = through_proxy(store, proxy)
        for _ in range(2):  # the second round finds only closed connections in the pool
            assert closing.get_many(keys) == [key.encode() * 50 for key in keys]
        assert closing.get_bytes(keys[0]) == keys[0].encode() * 50
        assert [o.key for o in closing.list("scans/2/")] == keys
        assert proxy.connections >= proxy.requests >= 2 * len(keys)


def test_a_read_that_keeps_failing_is_an_error_not_a_hang(
        store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.put_bytes("scans/1/a.png", b"cell a")
    monkeypatch.setattr("malaria.io.s3_clients.MAX_ATTEMPTS", 3)  # a budget a test can wait for
    with proxy_to(store, fail_first=1000) as proxy:
        failing = through_proxy(store, proxy)
        with pytest.raises(StorageError, match=r"scans/1/a\.png"):
            failing.get_bytes("scans/1/a.png")
        with pytest.raises(StorageError, match=r"scans/1/a\.png"):
            failing.get_many(["scans/1/a.png"])
        assert proxy.failed == proxy.requests == 6  # three tries each, then a clear error


@pytest.mark.integration
def test_a_dropped_bucket_gives_its_volume_back(seaweedfs_stack: StackConfig) -> None:
    """Why every test drops its buckets (conftest): each bucket written to takes a volume of
    its own, and the session's server has free disk / 128 MB of them."""
    from malaria_dev.stack.credentials import stack_s3_client

    client = stack_s3_client(seaweedfs_stack)
    volumes = seaweedfs_stack.seaweedfs_dir.glob
    before = len(list(volumes("*.dat")))
    bucket = f"drop-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    for n in range(3):
        client.put_object(Bucket=bucket, Key=f"scans/1/{n}.png", Body=b"cell")
    assert len(list(volumes("*.dat"))) == before + 1
    drop_bucket(client, bucket)
    assert len(list(volumes("*.dat"))) == before
    assert bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]


# ------------------------------------------------------------------ the local store too


def test_local_store_missing_and_non_ascii_keys(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "bucket")
    keys = [k for k in NON_ASCII_KEYS if "\t" not in k]
    put_all(local, {key: key.encode() for key in keys})
    assert local.get_many([*keys, "scans/none.png"])[:-1] == [k.encode() for k in keys]
    assert isinstance(local.get_many(["scans/none.png"])[0], ObjectNotFound)
    with pytest.raises(ObjectNotFound):
        local.get_bytes("scans/none.png")
    with pytest.raises(ObjectNotFound):
        local.get_bytes("scans/1")  # a folder is not an object
    assert [o.key for o in local.list("scans/")] == sorted(keys)
