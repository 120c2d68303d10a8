"""The lean signed GET the scorer fetches with: same signature as botocore, same bytes as
boto3 against a real SeaweedFS (which checks signatures), and a safe fallback otherwise."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from malaria.io.s3get import (
    EMPTY_SHA256,
    FastGetUnavailable,
    PathStyleGetter,
    SigV4Signer,
    canonical_query,
    path_style_client,
)
from malaria.io.store import ObjectNotFound, S3Store, s3_client

MOMENT = datetime(2026, 11, 27, 8, 30, 15, tzinfo=UTC)


def botocore_authorization(host: str, path: str, credentials: Credentials,
                           monkeypatch: pytest.MonkeyPatch, query: str = "") -> str:
    monkeypatch.setattr("botocore.auth.get_current_datetime",
                        lambda: MOMENT.replace(tzinfo=None))
    request = AWSRequest(method="GET", url=f"http://{host}{path}" + (f"?{query}" if query else ""),
                         headers={"x-amz-content-sha256": EMPTY_SHA256})
    S3SigV4Auth(credentials, "s3", "eu-west-1").add_auth(request)
    return str(request.headers["Authorization"])


@pytest.mark.parametrize("token", [None, "session-token/with+chars="])
@pytest.mark.parametrize("path", ["/bucket/scans/101/cell_1.png",
                                  "/bucket/scans/slide%20a/%C3%A9t%C3%A9%2B1.png"])
def test_signature_matches_botocore(path: str, token: str | None,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    ours = SigV4Signer("eu-west-1").headers("127.0.0.1:8333", path, credentials.access_key,
                                            credentials.secret_key, token, now=MOMENT)
    assert ours["Authorization"] == botocore_authorization("127.0.0.1:8333", path, credentials,
                                                        monkeypatch)
    assert ("x-amz-security-token" in ours) == (token is not None)


def test_listing_signature_matches_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    query = canonical_query({"list-type": "2", "prefix": "scans/slide é+1/",
                             "continuation-token": "c2VjcmV0/+=="})
    ours = SigV4Signer("eu-west-1").headers("127.0.0.1:8333", "/bucket", "AKIDEXAMPLE",
                                            credentials.secret_key, None, now=MOMENT,
                                            query=query)
    assert ours["Authorization"] == botocore_authorization(
        "127.0.0.1:8333", "/bucket", credentials, monkeypatch, query)


def boto3_bytes(store: S3Store, key: str) -> bytes:
    return store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()


def test_fast_get_reads_the_same_bytes_as_boto3(seaweed_bucket: S3Store) -> None:
    keys = ["scans/101/cell_1.png", "scans/slide a/été+1.png", "scans/x/a~b_c-d.(1).png"]
    for number, key in enumerate(keys):
        seaweed_bucket.put_bytes(key, bytes([number]) * (1000 + number))
    lean = path_style_client(seaweed_bucket.client, seaweed_bucket.bucket)
    assert lean is not None
    for key in keys:
        assert lean.get(key) == boto3_bytes(seaweed_bucket, key)
        assert seaweed_bucket.get_bytes(key) == boto3_bytes(seaweed_bucket, key)
    with pytest.raises(ObjectNotFound):
        seaweed_bucket.get_bytes("scans/101/missing.png")


def test_refused_fast_get_falls_back_to_boto3(seaweed_bucket: S3Store,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A 403 on the fast path (here: wrong credentials) is not an answer: the read goes
    through boto3, which has the right ones, and still returns the object."""
    seaweed_bucket.put_bytes("scans/1/a.png", b"cell")
    client = s3_client()
    wrong = Credentials("AKIDWRONG", "not-the-secret")
    getter = PathStyleGetter(client.meta.endpoint_url, seaweed_bucket.bucket,
                             client.meta.region_name, wrong)
    monkeypatch.setattr("malaria.io.s3get.path_style_client", lambda *_: getter)
    assert seaweed_bucket.get_bytes("scans/1/a.png") == b"cell"


def test_no_fast_path_without_credentials(seaweed_bucket: S3Store,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("boto3.session.Session.get_credentials", lambda self: None)
    assert path_style_client(seaweed_bucket.client, seaweed_bucket.bucket) is None


def test_dropped_connection_is_retried_on_a_new_one(seaweed_bucket: S3Store) -> None:
    seaweed_bucket.put_bytes("scans/1/a.png", b"first")
    lean = path_style_client(seaweed_bucket.client, seaweed_bucket.bucket)
    assert lean is not None
    assert lean.get("scans/1/a.png") == b"first"
    lean._local.sock.close()  # the server went away between two requests
    assert lean.get("scans/1/a.png") == b"first"


def test_lean_listing_matches_boto3_across_pages(seaweed_bucket: S3Store) -> None:
    """More than a page (1,000 keys), odd characters, a folder marker: the same objects,
    sizes and ETags as boto3's paginator, in key order."""
    from concurrent.futures import ThreadPoolExecutor

    keys = [f"scans/{n // 500}/cell {n:04d}+é.png" for n in range(1203)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: seaweed_bucket.put_bytes(k, k.encode()), keys))
    seaweed_bucket.put_bytes("scans/1/", b"")  # a folder marker: not an object to list
    lean = path_style_client(seaweed_bucket.client, seaweed_bucket.bucket)
    assert lean is not None
    first, token = lean.list_page("scans/")
    assert len(first) == 1000 and token

    listed = list(seaweed_bucket.list("scans/"))
    paginator = seaweed_bucket.client.get_paginator("list_objects_v2")
    expected = [(o["Key"], o["Size"], o["ETag"].strip('"'))
                for page in paginator.paginate(Bucket=seaweed_bucket.bucket, Prefix="scans/")
                for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    assert [(o.key, o.size, o.etag) for o in listed] == expected
    assert [o.key for o in listed] == sorted(keys)


def test_listing_falls_back_to_boto3_after_the_last_key(
        seaweed_bucket: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean listing fails after its first page: boto3 goes on from the last key, so
    nothing is listed twice and nothing is missed."""
    keys = [f"scans/{n:04d}.png" for n in range(1500)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: seaweed_bucket.put_bytes(k, b"x"), keys))
    real = PathStyleGetter.list_page

    def one_page_then_fail(self: PathStyleGetter, prefix: str,
                           continuation: str | None = None) -> tuple[list, str | None]:
        if continuation:
            raise FastGetUnavailable("HTTP 503")
        return real(self, prefix, continuation)

    monkeypatch.setattr(PathStyleGetter, "list_page", one_page_then_fail)
    assert [o.key for o in seaweed_bucket.list("scans/")] == keys


def test_pipelined_get_many_matches_boto3_and_marks_missing_keys(seaweed_bucket: S3Store) -> None:
    """Twenty requests in one write on one connection: every answer in order, a missing key
    in the middle answered as missing without upsetting the ones after it."""
    keys = [f"scans/7/cell {n:02d}+é.png" for n in range(20)]
    for number, key in enumerate(keys):
        seaweed_bucket.put_bytes(key, bytes([number]) * (700 + 997 * number))
    asked = [*keys[:10], "scans/7/missing.png", *keys[10:]]
    lean = path_style_client(seaweed_bucket.client, seaweed_bucket.bucket)
    assert lean is not None
    answers = lean.get_many(asked)
    assert isinstance(answers[10], ObjectNotFound)
    assert [a for i, a in enumerate(answers) if i != 10] == [
        boto3_bytes(seaweed_bucket, key) for key in keys]
    through_store = seaweed_bucket.get_many(asked)
    assert isinstance(through_store[10], ObjectNotFound)
    assert str(through_store[10]) == repr("scans/7/missing.png")
    assert [a for i, a in enumerate(through_store) if i != 10] == answers[:10] + answers[11:]


def test_pipelined_get_many_survives_a_dropped_connection(seaweed_bucket: S3Store) -> None:
    seaweed_bucket.put_bytes("scans/1/a.png", b"first")
    seaweed_bucket.put_bytes("scans/1/b.png", b"second")
    lean = path_style_client(seaweed_bucket.client, seaweed_bucket.bucket)
    assert lean is not None
    assert lean.get_many(["scans/1/a.png"]) == [b"first"]
    lean._local.sock.close()  # the server went away between two batches
    assert lean.get_many(["scans/1/a.png", "scans/1/b.png"]) == [b"first", b"second"]


def test_refused_pipelined_gets_fall_back_to_boto3(seaweed_bucket: S3Store,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """403s on the pipelined path are not answers: each key is read through boto3."""
    seaweed_bucket.put_bytes("scans/1/a.png", b"cell a")
    seaweed_bucket.put_bytes("scans/1/b.png", b"cell b")
    client = s3_client()
    getter = PathStyleGetter(client.meta.endpoint_url, seaweed_bucket.bucket,
                             client.meta.region_name, Credentials("AKIDWRONG", "nope"))
    assert all(isinstance(a, FastGetUnavailable)
               for a in getter.get_many(["scans/1/a.png", "scans/1/b.png"]))
    monkeypatch.setattr("malaria.io.s3get.path_style_client", lambda *_: getter)
    answers = seaweed_bucket.get_many(["scans/1/a.png", "scans/1/missing", "scans/1/b.png"])
    assert answers[0] == b"cell a" and answers[2] == b"cell b"
    assert isinstance(answers[1], ObjectNotFound)


def test_response_reader_splits_back_to_back_responses() -> None:
    """Two responses arriving in one read, the second split across reads: each body is
    framed by its own Content-Length; a response without one is refused."""
    import socket

    from malaria.io.s3get import _ResponseReader

    ours, theirs = socket.socketpair()
    with ours, theirs:
        first = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        second = b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\nConnection: close\r\n\r\nno!"
        theirs.sendall(first + second[:20])
        reader = _ResponseReader(ours)
        assert reader.read() == (200, b"hello", True)
        theirs.sendall(second[20:] + b"HTTP/1.1 200 OK\r\n\r\n")
        assert reader.read() == (404, b"no!", False)
        with pytest.raises(FastGetUnavailable):
            reader.read()
