"""The lean signed GET the scorer fetches with: same signature as botocore, same bytes as
boto3 against a real SeaweedFS (which checks signatures), and a safe fallback otherwise."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from malaria.s3get import EMPTY_SHA256, PathStyleGetter, SigV4Signer, path_style_getter
from malaria.scoring import object_reader
from malaria.storage import ObjectNotFound, S3Store, s3_client

MOMENT = datetime(2026, 11, 27, 8, 30, 15, tzinfo=UTC)


def botocore_authorization(host: str, path: str, credentials: Credentials,
                           monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr("botocore.auth.get_current_datetime",
                        lambda: MOMENT.replace(tzinfo=None))
    request = AWSRequest(method="GET", url=f"http://{host}{path}",
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


def test_fast_get_reads_the_same_bytes_as_boto3(seaweed_bucket: S3Store) -> None:
    keys = ["scans/101/cell_1.png", "scans/slide a/été+1.png", "scans/x/a~b_c-d.(1).png"]
    for number, key in enumerate(keys):
        seaweed_bucket.put_bytes(key, bytes([number]) * (1000 + number))
    fast = path_style_getter(seaweed_bucket.client, seaweed_bucket.bucket)
    assert fast is not None
    read = object_reader(seaweed_bucket)
    for key in keys:
        assert fast(key) == seaweed_bucket.get_bytes(key)
        assert read(key) == seaweed_bucket.get_bytes(key)
    with pytest.raises(ObjectNotFound):
        read("scans/101/missing.png")


def test_refused_fast_get_falls_back_to_boto3(seaweed_bucket: S3Store,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A 403 on the fast path (here: wrong credentials) is not an answer: the read goes
    through boto3, which has the right ones, and still returns the object."""
    seaweed_bucket.put_bytes("scans/1/a.png", b"cell")
    client = s3_client()
    wrong = Credentials("AKIDWRONG", "not-the-secret")
    getter = PathStyleGetter(client.meta.endpoint_url, seaweed_bucket.bucket,
                             client.meta.region_name, wrong)
    monkeypatch.setattr("malaria.s3get.path_style_getter", lambda *_: getter.get)
    assert object_reader(seaweed_bucket)("scans/1/a.png") == b"cell"


def test_no_fast_path_without_credentials(seaweed_bucket: S3Store,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("boto3.session.Session.get_credentials", lambda self: None)
    assert path_style_getter(seaweed_bucket.client, seaweed_bucket.bucket) is None


def test_dropped_connection_is_retried_on_a_new_one(seaweed_bucket: S3Store) -> None:
    seaweed_bucket.put_bytes("scans/1/a.png", b"first")
    fast = path_style_getter(seaweed_bucket.client, seaweed_bucket.bucket)
    assert fast is not None
    assert fast("scans/1/a.png") == b"first"
    getter = fast.__self__  # type: ignore[attr-defined]
    getter._local.sock.close()  # the server went away between two requests
    assert fast("scans/1/a.png") == b"first"
