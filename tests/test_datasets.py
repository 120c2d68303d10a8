"""Download, unpack and upload of class-folder datasets, against local servers only.

The archive is served by ``http.server`` on 127.0.0.1 and uploads go to a moto S3 server on
127.0.0.1 or to a local folder, so nothing here needs the network.
"""

from __future__ import annotations

import hashlib
import io
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image

from malaria.io.store import open_store, reset_clients
from malaria_dev.datasets import (
    ArchiveError,
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    UploadError,
    download_nih_dataset,
    upload_tree,
)

# ---------------------------------------------------------------------------------- helpers


def make_png(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def build_zip(members: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


P1, P2, U1 = make_png(1), make_png(2), make_png(3)

# The shape of the real NIH archive, with the junk it carries.
NIH_LIKE: dict[str, bytes] = {
    "cell_images/": b"",
    "cell_images/Parasitized/C33P1thinF_IMG_20150619_114756a_cell_179.png": P1,
    "cell_images/Parasitized/C39P4thinF_original_IMG_20150622_111206_cell_99.png": P2,
    "cell_images/Parasitized/Thumbs.db": b"\xd0\xcf\x11\xe0 thumbnail cache",
    "cell_images/Uninfected/C1_thinF_IMG_20150604_104722_cell_9.png": U1,
    "cell_images/Uninfected/Thumbs.db": b"\xd0\xcf\x11\xe0 thumbnail cache",
    "__MACOSX/cell_images/Parasitized/._C33P1thinF_IMG_20150619_114756a_cell_179.png": b"AppleDouble",
    "cell_images/notes.txt": b"not an image",
}


@dataclass
class FileServer:
    """A tiny HTTP server: path -> (status, headers, body)."""

    base: str
    routes: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)

    def serve(self, path: str, body: bytes, *, status: int = 200,
              headers: dict[str, str] | None = None) -> str:
        self.routes[path] = (status, headers or {}, body)
        return self.base + path


@pytest.fixture
def http_server() -> Iterator[FileServer]:
    files = FileServer(base="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, extra, body = files.routes.get(self.path, (404, {}, b"not found"))
            self.send_response(status)
            # Extra headers may override Content-Length to fake a short body.
            for name, value in {"Content-Length": str(len(body)), **extra}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    files.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield files
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment must not intercept requests to the loopback servers.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------- download


def test_download_unpacks_into_class_folders(http_server: FileServer, tmp_path: Path) -> None:
    body = build_zip(NIH_LIKE)
    url = http_server.serve("/cell_images.zip", body)
    out = tmp_path / "cells"

    result = download_nih_dataset(out, url=url, progress=True)

    assert result.path == out
    assert result.bytes_downloaded == len(body)
    assert result.sha256 == hashlib.sha256(body).hexdigest()
    assert result.counts == {"Parasitized": 2, "Uninfected": 1}
    assert result.written == 3 and result.unchanged == 0
    # Two Thumbs.db and one AppleDouble file are junk; notes.txt is not an image.
    assert result.skipped == 4
    assert result.skipped_reasons == {"os-junk": 3, "not-image": 1}
    # Only the images, flattened under their class; no temporary file left behind.
    assert all_files(out) == {
        "Parasitized/C33P1thinF_IMG_20150619_114756a_cell_179.png",
        "Parasitized/C39P4thinF_original_IMG_20150622_111206_cell_99.png",
        "Uninfected/C1_thinF_IMG_20150604_104722_cell_9.png",
    }
    assert (out / "Parasitized/C39P4thinF_original_IMG_20150622_111206_cell_99.png"
            ).read_bytes() == P2


def test_nested_tree_synonyms_and_duplicates(http_server: FileServer, tmp_path: Path) -> None:
    body = build_zip({
        "cell_images/cell_images/infected/a.png": P1,
        "cell_images/cell_images/HEALTHY/deeper/b.PNG": U1,
        # The same tree once more one level up: identical bytes count once.
        "cell_images/Parasitized/a.png": P1,
        # Same destination, other bytes: the first one wins, the clash is reported.
        "other/parasite/a.png": P2,
        "loose/c.png": make_png(4),  # no class folder anywhere above it
    })
    url = http_server.serve("/nested.zip", body)

    result = download_nih_dataset(tmp_path / "out", url=url, progress=False)

    assert result.counts == {"Parasitized": 1, "Uninfected": 1}
    assert result.skipped_reasons == {"duplicate": 1, "name-conflict": 1, "no-class": 1}
    assert all_files(tmp_path / "out") == {"Parasitized/a.png", "Uninfected/b.PNG"}
    assert (tmp_path / "out/Parasitized/a.png").read_bytes() == P1


def test_rerun_is_a_no_op_and_repairs_changed_files(
    http_server: FileServer, tmp_path: Path
) -> None:
    url = http_server.serve("/cell_images.zip", build_zip(NIH_LIKE))
    out = tmp_path / "cells"
    first = download_nih_dataset(out, url=url, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    again = download_nih_dataset(out, url=url, progress=False)

    assert again.counts == first.counts
    assert (again.written, again.unchanged) == (0, 3)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    assert all_files(out) == {p.relative_to(out).as_posix() for p in before}

    # A damaged local copy is put right on the next run.
    damaged = out / "Uninfected/C1_thinF_IMG_20150604_104722_cell_9.png"
    damaged.write_bytes(b"garbage")
    repaired = download_nih_dataset(out, url=url, progress=False)
    assert (repaired.written, repaired.unchanged) == (1, 2)
    assert damaged.read_bytes() == U1


def test_sha256_is_checked(http_server: FileServer, tmp_path: Path) -> None:
    body = build_zip(NIH_LIKE)
    url = http_server.serve("/cell_images.zip", body)
    out = tmp_path / "cells"

    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        download_nih_dataset(out, url=url, sha256="0" * 64, progress=False)
    assert all_files(out) == set()  # nothing unpacked, no partial download left

    good = hashlib.sha256(body).hexdigest().upper()  # case does not matter
    assert download_nih_dataset(out, url=url, sha256=good, progress=False).written == 3


def _flip_inside(body: bytes, member: bytes) -> bytes:
    at = body.index(member) + len(member) // 2
    return body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1:]


@pytest.mark.parametrize(
    ("case", "match"),
    [("truncated", "not a readable zip"), ("flipped-byte", "CRC check failed"),
     ("html-page", "not a readable zip")],
)
def test_corrupt_archive_is_refused(
    http_server: FileServer, tmp_path: Path, case: str, match: str
) -> None:
    stored = build_zip(NIH_LIKE, compression=zipfile.ZIP_STORED)
    body = {
        "truncated": stored[: len(stored) // 2],
        "flipped-byte": _flip_inside(stored, P2),
        "html-page": b"<html>Please log in</html>",
    }[case]
    url = http_server.serve("/cell_images.zip", body)
    out = tmp_path / "cells"

    with pytest.raises(ArchiveError, match=match):
        download_nih_dataset(out, url=url, progress=False)
    assert all_files(out) == set()


@pytest.mark.parametrize(
    "evil", ["../evil.png", "cell_images/Parasitized/../../../evil.png", "/tmp/evil.png",
             "..\\evil.png", "C:/evil.png"],
)
def test_zip_slip_is_refused(http_server: FileServer, tmp_path: Path, evil: str) -> None:
    body = build_zip({"cell_images/Parasitized/good.png": P1, evil: P2})
    assert evil in zipfile.ZipFile(io.BytesIO(body)).namelist()  # zipfile kept the name
    url = http_server.serve("/evil.zip", body)
    out = tmp_path / "a" / "b" / "cells"

    with pytest.raises(UnsafeArchiveError, match="refusing archive"):
        download_nih_dataset(out, url=url, progress=False)
    # The archive is refused as a whole: not even its good member is unpacked.
    assert all_files(tmp_path) == set()


def test_zip_bombs_are_refused(http_server: FileServer, tmp_path: Path) -> None:
    zeros = b"\0" * (2 * 2**20)  # deflates to a few kilobytes
    url = http_server.serve("/bomb.zip", build_zip({"cell_images/Parasitized/x.png": zeros}))
    with pytest.raises(ArchiveError, match="unpacks to 2097152 bytes"):
        download_nih_dataset(tmp_path / "out", url=url, progress=False,
                             max_member_bytes=2**20)

    many = {f"cell_images/Parasitized/{i}.png": zeros[: 600_000] for i in range(3)}
    url = http_server.serve("/many.zip", build_zip(many))
    with pytest.raises(ArchiveError, match="in all"):
        download_nih_dataset(tmp_path / "out", url=url, progress=False,
                             max_total_bytes=2**20)
    assert all_files(tmp_path / "out") == set()


def test_http_errors_are_reported(http_server: FileServer, tmp_path: Path) -> None:
    out = tmp_path / "cells"
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_nih_dataset(out, url=http_server.base + "/missing.zip", progress=False)

    # The server promises more bytes than it sends, then hangs up.
    body = build_zip(NIH_LIKE)
    short = http_server.serve("/short.zip", body,
                              headers={"Content-Length": str(len(body) + 100)})
    with pytest.raises(DownloadError, match=r"short\.zip"):
        download_nih_dataset(out, url=short, progress=False)

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match="failed"):
        download_nih_dataset(out, url=f"http://127.0.0.1:{port}/x.zip", progress=False,
                             timeout=5)
    assert all_files(out) == set()


def test_redirects_are_followed(http_server: FileServer, tmp_path: Path) -> None:
    http_server.serve("/cell_images.zip", build_zip(NIH_LIKE))
    old = http_server.serve("/old/cell_images.zip", b"", status=302,
                            headers={"Location": "/cell_images.zip"})
    result = download_nih_dataset(tmp_path / "cells", url=old, progress=False)
    assert result.counts == {"Parasitized": 2, "Uninfected": 1}


# ----------------------------------------------------------------------------------- upload


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A class-folder tree with junk; returns it and the files that should be uploaded."""
    src = tmp_path / "src"
    wanted = {
        "Parasitized/C1P1_cell_1.png": P1,
        "Parasitized/C1P1_cell_2.png": P2,
        "Uninfected/slide 7/C7P9_cell_3.png": U1,  # nested, with a space in a folder
        "Uninfected/C7P9_cell_4.jpg": b"jpeg bytes",
    }
    junk = {
        ".DS_Store": b"x",
        "Parasitized/Thumbs.db": b"x",
        ".hidden/C1P1_cell_9.png": P1,
        "Uninfected/._C7P9_cell_3.png": b"x",
    }
    for rel, data in {**wanted, **junk}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return src, wanted


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name, value in {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    reset_clients()  # cached clients would keep another endpoint or credentials
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    yield client
    reset_clients()


def test_upload_tree_to_s3(s3: Any, tree: tuple[Path, dict[str, bytes]]) -> None:
    src, wanted = tree
    s3.create_bucket(Bucket="lab")

    result = upload_tree(src, "s3://lab/site-a", concurrency=4, progress=True)

    assert (result.uploaded, result.skipped) == (len(wanted), 4)
    assert result.bytes == sum(len(data) for data in wanted.values())
    assert result.seconds > 0
    listed = s3.list_objects_v2(Bucket="lab")["Contents"]
    assert {item["Key"] for item in listed} == {f"site-a/incoming/{rel}" for rel in wanted}
    for rel, data in wanted.items():
        got = s3.get_object(Bucket="lab", Key=f"site-a/incoming/{rel}")
        assert got["Body"].read() == data
        expected_type = "image/png" if rel.endswith(".png") else "image/jpeg"
        assert got["ContentType"] == expected_type

    # Uploading again rewrites the same objects: same keys, same bytes.
    assert upload_tree(src, "s3://lab/site-a", progress=False).uploaded == len(wanted)
    assert len(s3.list_objects_v2(Bucket="lab")["Contents"]) == len(wanted)


def test_upload_failure_is_reported(s3: Any, tree: tuple[Path, dict[str, bytes]]) -> None:
    src, _ = tree
    with pytest.raises(UploadError, match="no-such-bucket"):
        upload_tree(src, "s3://no-such-bucket", progress=False)


@pytest.mark.parametrize("concurrency", [1, 3, 16])
def test_upload_tree_to_folder(
    tmp_path: Path, tree: tuple[Path, dict[str, bytes]], concurrency: int
) -> None:
    src, wanted = tree
    # More files than the submission window, so the window has to refill.
    for i in range(20):
        rel = f"Parasitized/bulk/C2P2_cell_{i}.png"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(make_png(100 + i, size=4))
        wanted = {**wanted, rel: (src / rel).read_bytes()}
    url = (tmp_path / "bucket").as_uri()

    result = upload_tree(src, url, prefix="/raw/", concurrency=concurrency, progress=False)

    assert (result.uploaded, result.skipped) == (len(wanted), 4)
    store = open_store(url)
    assert {info.key for info in store.list("raw/")} == {f"raw/{rel}" for rel in wanted}
    for rel, data in wanted.items():
        assert store.get_bytes(f"raw/{rel}") == data


def test_upload_tree_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(UploadError, match="not a folder"):
        upload_tree(tmp_path / "missing", (tmp_path / "bucket").as_uri(), progress=False)
