"""Conditional writes (create-if-absent, replace-if-unchanged) on every store, and what they
close: a lease claim whose PUT lands late, and two promotions at once."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from faultproxy import FaultProxy

from malaria.core.layout import CHAMPION_KEY
from malaria.io import s3 as s3_module
from malaria.io.local import LocalStore
from malaria.io.s3 import S3Store, reset_clients
from malaria.io.store import WriteConflict
from malaria.registry.registry import ModelRegistry
from malaria.scoring.leases import SlideLeases
from malaria.scoring.paths import ScoringPaths

S3_ENDPOINTS = ["moto", pytest.param("seaweedfs", marks=pytest.mark.integration)]


def _s3_store(kind: str, request: pytest.FixtureRequest,
              monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """A fresh bucket on moto or SeaweedFS, the environment's endpoint pointing at it."""
    if kind == "moto":
        endpoint = str(request.getfixturevalue("moto_endpoint"))
    else:
        env = request.getfixturevalue("seaweedfs")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(name, env[name])
        endpoint = env["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    reset_clients()
    store = S3Store(f"cas-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint)
    store.ensure_bucket()
    return store


@pytest.fixture(params=S3_ENDPOINTS)
def s3(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Store]:
    yield _s3_store(request.param, request, monkeypatch)
    reset_clients()


@pytest.fixture(params=[*S3_ENDPOINTS, "local"])
def store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
          tmp_path: Path) -> Iterator[S3Store | LocalStore]:
    if request.param == "local":
        yield LocalStore(tmp_path / "bucket")
        return
    yield _s3_store(request.param, request, monkeypatch)
    reset_clients()


def proxy_for(store: S3Store, **options: object) -> FaultProxy:
    target = urlsplit(str(store.endpoint_url))
    return FaultProxy(str(target.hostname), int(target.port or 80), **options)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the store contract


def test_create_if_absent_and_replace_if_unchanged(store: S3Store | LocalStore) -> None:
    assert store.conditional_writes("state/x.json")  # moto, SeaweedFS and folders honour them
    store.put_if_absent("state/x.json", b"first")
    with pytest.raises(WriteConflict):
        store.put_if_absent("state/x.json", b"second")
    assert store.get_bytes("state/x.json") == b"first"

    seen = store.head("state/x.json")
    assert seen is not None
    store.put_if_match("state/x.json", b"third", seen.etag)
    assert store.get_bytes("state/x.json") == b"third"
    with pytest.raises(WriteConflict):  # the ETag read before the replace is stale now
        store.put_if_match("state/x.json", b"fourth", seen.etag)
    with pytest.raises(WriteConflict):  # nothing to replace
        store.put_if_match("state/none.json", b"x", seen.etag)
    assert not store.exists("state/none.json")
    assert store.get_bytes("state/x.json") == b"third"
    # The probe object is gone: a listing shows only what was written.
    assert [o.key for o in store.list("state/")] == ["state/x.json"]


def test_a_same_size_replace_still_changes_the_local_etag(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    store.put_if_absent("a.json", b"0000")
    etags = []
    for n in range(1, 20):  # faster than the file clock ticks, same size every time
        before = store.head("a.json")
        assert before is not None
        etags.append(before.etag)
        store.put_if_match("a.json", f"{n:04d}".encode(), before.etag)
    assert len(set(etags)) == len(etags)


def test_a_server_without_conditional_writes_gets_check_then_write(
        s3: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S3Store, "conditional_writes", lambda self, near: False)
    s3.put_if_absent("state/y.json", b"one")
    with pytest.raises(WriteConflict):
        s3.put_if_absent("state/y.json", b"two")
    seen = s3.head("state/y.json")
    assert seen is not None
    s3.put_if_match("state/y.json", b"three", seen.etag)
    with pytest.raises(WriteConflict):
        s3.put_if_match("state/y.json", b"four", seen.etag)
    assert s3.get_bytes("state/y.json") == b"three"


def test_a_conditional_write_whose_answer_was_lost_counts_as_done(s3: S3Store) -> None:
    """The PUT lands but its answer is cut off; boto3's retry then fails the condition.
    The store sees its own bytes there and reports success, not a conflict."""
    cut = []

    def reset_first_put(head: bytes) -> str | None:
        if head.startswith(b"PUT ") and b"lost.json" in head.split(b"\r\n")[0] and not cut:
            cut.append(head)
            return "reset"
        return None

    s3.conditional_writes("state/lost.json")  # probe directly, not through the proxy
    with proxy_for(s3, choose=reset_first_put) as proxy:
        reset_clients()
        faulty = S3Store(s3.bucket, endpoint_url=proxy.url)
        faulty.put_if_absent("state/lost.json", b"mine")
        assert proxy.injected["reset"] == 1
        seen = faulty.head("state/lost.json")
        assert seen is not None
        cut.clear()
        faulty.put_if_match("state/lost.json", b"mine again", seen.etag)
        assert proxy.injected["reset"] == 2
    assert s3.get_bytes("state/lost.json") == b"mine again"


# --------------------------------------------------------------------------- leases


def test_a_lease_claim_whose_put_lands_late_loses(s3: S3Store) -> None:
    """Run A reads "no lease", then its PUT stalls (a retry after a 503, a slow link) for
    longer than the settle; run B claims and confirms meanwhile. When A's PUT lands it must
    not take the slide: exactly one owner."""
    stalled = threading.Event()
    paths = ScoringPaths.bucket(s3.url)
    lease_path = f"/{s3.bucket}/{paths.lease_key('701')}".encode()

    def stall_lease_put(head: bytes) -> str | None:
        request_line = head.split(b"\r\n")[0]
        if request_line.startswith(b"PUT ") and request_line.split(b" ")[1] == lease_path:
            stalled.set()
            return "stall"
        return None

    a = SlideLeases(paths, ttl=600, settle=0.3)
    b = SlideLeases(paths, ttl=600, settle=0.3)
    s3.conditional_writes(paths.lease_key("probe"))  # known before A's traffic is stalled
    with proxy_for(s3, choose=stall_lease_put, stall_s=2.5) as proxy:
        a.store = S3Store(s3.bucket, endpoint_url=proxy.url)
        granted_a: list[str] = []
        runner = threading.Thread(target=lambda: granted_a.extend(a.acquire(["701"])))
        runner.start()
        assert stalled.wait(30)
        granted_b = b.acquire(["701"])  # while A's PUT is held by the proxy
        runner.join(60)
    assert granted_b == ["701"]
    assert granted_a == []
    assert b.read("701")["owner"] == b.owner.token  # type: ignore[index]
    assert b.renew() == []  # B still holds it


def test_a_renewal_never_overwrites_a_takeover(local_store: LocalStore) -> None:
    paths = ScoringPaths.bucket(local_store.url)
    a = SlideLeases(paths, ttl=600, settle=0.0)
    assert a.acquire(["5"]) == ["5"]
    rival = SlideLeases(paths, ttl=600, settle=0.0)
    read = a._read_versioned

    def takeover_between_read_and_write(slide: str) -> tuple[object, object]:
        seen = read(slide)
        current = rival._read_versioned(slide)[1]
        assert current is not None
        local_store.put_if_match(paths.lease_key(slide), b'{"owner": "rival"}', current)
        return seen

    a._read_versioned = takeover_between_read_and_write  # type: ignore[method-assign]
    assert a.renew() == ["5"] and "5" in a.lost
    assert rival.read("5") == {"owner": "rival"}
    assert not a.still_held("5")


# -------------------------------------------------------------------------- champion


def _registry_with_versions(store: S3Store | LocalStore, tmp_path: Path) -> ModelRegistry:
    model = tmp_path / "model.keras"
    model.write_bytes(b"not a real model")
    registry = ModelRegistry(store)
    for version in ("v0", "v1", "v2"):
        registry.register(version, model, {"created_at": "2025-01-01T00:00:00+00:00"}, {})
    registry.promote("v0", reason="first")
    return registry


class _SlowChampionReads(LocalStore):
    """A folder whose champion.json takes a while to read: both promotions read the same."""

    def get_bytes(self, key: str) -> bytes:
        if key == CHAMPION_KEY:
            time.sleep(0.3)
        return super().get_bytes(key)


def test_two_promotions_at_once_both_land_in_history(
        store: S3Store | LocalStore, tmp_path: Path) -> None:
    registry = _registry_with_versions(store, tmp_path)
    stores: list[S3Store | LocalStore]
    proxy = None
    if isinstance(store, S3Store):
        champion_path = f"/{store.bucket}/{CHAMPION_KEY}".encode()
        proxy = proxy_for(store, stall_s=0.5, choose=lambda head: "stall" if (
            head.startswith(b"GET ") and head.split(b"\r\n")[0].split(b" ")[1] == champion_path)
            else None).__enter__()
        reset_clients()
        stores = [S3Store(store.bucket, endpoint_url=proxy.url) for _ in range(2)]
    else:
        stores = [_SlowChampionReads(store.root) for _ in range(2)]
    try:
        start = threading.Barrier(2)
        errors: list[BaseException] = []

        def promote(target: S3Store | LocalStore, version: str) -> None:
            try:
                start.wait()
                ModelRegistry(target).promote(version, reason=f"race {version}")
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=promote, args=(s, v))
                   for s, v in zip(stores, ("v1", "v2"), strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        if proxy is not None:
            proxy.__exit__(None, None, None)
    assert errors == []
    champion = registry.champion()
    assert champion is not None
    history = [(h["action"], h["version"]) for h in champion["history"]]
    assert history[0] == ("promote", "v0") and len(history) == 3
    assert sorted(history[1:]) == [("promote", "v1"), ("promote", "v2")]
    # Each entry names the champion it replaced: the history is one chain, nothing skipped.
    assert [h["previous"] for h in champion["history"][1:]] == [
        history[0][1], history[1][1]]
    assert champion["version"] == history[-1][1]

    # A rollback then goes back exactly one step of that chain.
    assert registry.rollback(reason="test") == history[1][1]


def test_the_probe_is_asked_once_per_endpoint(s3: S3Store, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    calls: list[dict[str, object]] = []
    real = s3.client.put_object

    def counting(**kwargs: object) -> object:
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(s3_module, "_conditional_support", {})
    monkeypatch.setattr(s3.client, "put_object", counting)
    for n in range(3):
        s3.put_if_absent(f"state/n{n}.json", b"x")
    probes = [c for c in calls if ".probe-" in str(c["Key"])]
    assert len(probes) == 3  # one plain write, then each condition once
    assert len(calls) == 3 + 3


def test_a_lease_taken_over_mid_run_gets_no_csv(
        local_store: LocalStore, tmp_path: Path, prefect_harness: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rival takes slide 902 over after our confirm and before our heartbeat could
    notice (its lease expired under us, say): the CSV is left to the rival, since the flow
    reads the lease again before writing it."""
    from flows.score import score_flow
    from malaria.model.architectures import build_model
    from malaria.model.checkpoints import save_for_serving
    from malaria_dev.synthetic import generate_scan_cells

    model = tmp_path / "model.keras"
    save_for_serving(build_model("cellnet-tiny", 32), model)
    for slide in ("901", "902"):
        for cell in generate_scan_cells(5, slide_id=int(slide), seed=1):
            local_store.put_bytes(f"scans/{slide}/{cell.file_name}", cell.data)
    paths = ScoringPaths.bucket(local_store.url)
    rival = SlideLeases(paths, ttl=600)
    real_confirm = SlideLeases.confirm

    def confirm_then_rival_takes_over(self: SlideLeases, claimed: list[str]) -> list[str]:
        granted = real_confirm(self, claimed)
        if self is not rival:
            found = local_store.head(paths.lease_key("902"))
            assert found is not None
            local_store.put_if_match(paths.lease_key("902"),
                                     json.dumps(rival._payload()).encode(), found.etag)
        return granted

    monkeypatch.setattr(SlideLeases, "confirm", confirm_then_rival_takes_over)
    state = score_flow(data_url=local_store.url, model_path=str(model), shard_size=10,
                       return_state=True)
    assert state.is_failed() and "902: lease lost" in str(state.message)
    out = paths.out_store()
    assert out.exists(paths.prediction_key("901"))
    assert not out.exists(paths.prediction_key("902"))
    assert rival.read("902")["owner"] == rival.owner.token  # type: ignore[index]
