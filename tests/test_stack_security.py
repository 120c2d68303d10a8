"""The local stack lets nobody in: every port it opens refuses a request without the stack's
credentials, and with them S3, the Prefect API, Prefect's own client and the UI still work.

One real stack (SeaweedFS + Prefect server) in a temp state folder on free loopback ports,
shared by the module's tests.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from malaria_dev.stack import (
    StackConfig,
    prefect_api_client,
    stack_down,
    stack_env,
    stack_s3_client,
    stack_up,
)
from malaria_dev.stack.seaweedfs import weed_socket_files
from malaria_dev.stack.security import CA_CERT, internal_tls, security_dir

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHAMPION = "models/champion.json"  # the object an anonymous overwrite once replaced
ORIGINAL = b'{"version": "v-original"}'


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackConfig]:
    cfg = StackConfig.with_free_ports(tmp_path_factory.mktemp("secure"))
    stack_up(cfg)
    try:
        stack_s3_client(cfg).put_object(Bucket=cfg.bucket, Key=CHAMPION, Body=ORIGINAL)
        yield cfg
    finally:
        stack_down(cfg)


def _anonymous() -> httpx.Client:
    return httpx.Client(timeout=10, trust_env=False)


def _champion(cfg: StackConfig) -> bytes:
    return bytes(stack_s3_client(cfg).get_object(Bucket=cfg.bucket, Key=CHAMPION)["Body"].read())


def test_s3_refuses_unsigned_requests_and_serves_signed_ones(stack: StackConfig) -> None:
    url = f"{stack.s3_endpoint}/{stack.bucket}/{CHAMPION}"
    with _anonymous() as client:
        assert client.get(url).status_code == 403
        assert client.put(url, content=b"evil").status_code == 403
        assert client.get(f"{stack.s3_endpoint}/{stack.bucket}?list-type=2").status_code == 403
    assert _champion(stack) == ORIGINAL


def test_filer_refuses_anonymous_get_and_post(stack: StackConfig) -> None:
    url = f"http://{stack.host}:{stack.filer_port}/buckets/{stack.bucket}/{CHAMPION}"
    with _anonymous() as client:
        for answer in (client.get(url), client.get(url, params={"metadata": "true"}),
                       client.get(f"http://{stack.host}:{stack.filer_port}/buckets/"),
                       client.post(url, files={"file": ("champion.json", b"evil")}),
                       client.put(url, content=b"evil"),
                       client.delete(url)):
            assert answer.status_code in (401, 403, 404), (answer.request.method, answer.text)
            assert b"v-original" not in answer.content
    assert _champion(stack) == ORIGINAL  # the overwrite did not land


def _without_certificate(cfg: StackConfig) -> httpx.Client:
    """Trusts the stack's CA (so the server is known) but presents no client certificate."""
    context = ssl.create_default_context(cafile=str(security_dir(cfg) / CA_CERT))
    return httpx.Client(timeout=10, trust_env=False, verify=context)


def _refused_over_plain_http(method: str, url: str, **kwargs: object) -> None:
    """An HTTPS port answers plain HTTP with a bare 400 and hangs up (a request with a body
    may see only the hang-up): nothing reaches a handler."""
    with _anonymous() as client:
        try:
            answer = client.request(method, url, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError:
            return
        assert answer.status_code == 400 and b"Volume" not in answer.content, answer.text


def _with_certificate(cfg: StackConfig) -> httpx.Client:
    return httpx.Client(timeout=10, trust_env=False, verify=internal_tls(cfg))


@pytest.mark.parametrize("port, path", [("master_port", "/"), ("master_port", "/ui/index.html"),
                                        ("volume_port", "/status"),
                                        ("volume_port", "/ui/index.html")])
def test_status_pages_need_the_stack_client_certificate(stack: StackConfig, port: str,
                                                        path: str) -> None:
    """The master's and the volume server's status pages (topology, volumes, disk paths)
    are served over HTTPS only to a client holding the stack's certificate."""
    address = f"{stack.host}:{getattr(stack, port)}"
    _refused_over_plain_http("GET", f"http://{address}{path}")
    with _without_certificate(stack) as client, pytest.raises(httpx.TransportError):
        client.get(f"https://{address}{path}")
    if path == "/status":  # the certificate, not the port, is what decides
        with _with_certificate(stack) as client:
            assert client.get(f"https://{address}{path}").status_code == 200


def test_volume_server_refuses_anonymous_reads_and_writes(stack: StackConfig) -> None:
    base = f"{stack.host}:{stack.volume_port}"
    needle = "1,01637037d6"
    _refused_over_plain_http("GET", f"http://{base}/{needle}")
    _refused_over_plain_http("POST", f"http://{base}/{needle}", files={"file": ("x", b"evil")})
    _refused_over_plain_http("DELETE", f"http://{base}/{needle}")
    with _without_certificate(stack) as client, pytest.raises(httpx.TransportError):
        client.post(f"https://{base}/{needle}", files={"file": ("x", b"evil")})
    # Even with the certificate, reads and writes need the JWT the master signs.
    with _with_certificate(stack) as client:
        for answer in (client.get(f"https://{base}/{needle}"),
                       client.post(f"https://{base}/{needle}", files={"file": ("x", b"evil")}),
                       client.delete(f"https://{base}/{needle}")):
            assert answer.status_code in (401, 403, 404), (answer.request.method, answer.text)


def test_master_hands_out_nothing_and_deletes_nothing(stack: StackConfig) -> None:
    base = f"{stack.host}:{stack.master_port}"
    paths = ("/dir/assign", "/dir/lookup?volumeId=1", "/dir/status", "/vol/status",
             f"/col/delete?collection={stack.bucket}", "/vol/grow?count=1", "/vol/vacuum")
    for path in paths:
        _refused_over_plain_http("GET", f"http://{base}{path}")
    with _without_certificate(stack) as client, pytest.raises(httpx.TransportError):
        client.get(f"https://{base}/dir/assign")
    # With the certificate: the HTTP API is off (-disableHttp), the JWT guards the rest.
    with _with_certificate(stack) as client:
        for path in paths:
            answer = client.get(f"https://{base}{path}")
            assert answer.status_code in (401, 403, 404), (path, answer.text)
            assert "fid" not in answer.text and "authorization" not in answer.headers
    assert _champion(stack) == ORIGINAL  # /col/delete did not drop the bucket's volumes


def test_grpc_ports_refuse_clients_without_the_stack_certificate(stack: StackConfig) -> None:
    grpc = pytest.importorskip("grpc")
    ca = (security_dir(stack) / CA_CERT).read_bytes()
    for name in ("master_grpc_port", "volume_grpc_port", "filer_grpc_port", "s3_grpc_port",
                 "admin_grpc_port"):
        target = f"{stack.host}:{getattr(stack, name)}"
        for channel in (grpc.insecure_channel(target),
                        grpc.secure_channel(target, grpc.ssl_channel_credentials(ca))):
            with channel, pytest.raises(grpc.FutureTimeoutError):
                grpc.channel_ready_future(channel).result(timeout=3)


def test_unix_sockets_beside_the_ports_refuse_too(stack: StackConfig) -> None:
    """weed also listens on Unix sockets in /tmp (filer and S3 HTTP, every gRPC server)."""
    grpc = pytest.importorskip("grpc")
    sockets = [p for p in weed_socket_files(stack) if p.exists()]
    assert sockets
    for path in sockets:
        if "-grpc-" in path.name:
            with grpc.insecure_channel(f"unix:{path}") as channel, \
                    pytest.raises(grpc.FutureTimeoutError):
                grpc.channel_ready_future(channel).result(timeout=3)
            continue
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), timeout=10) as client:
            key = f"http://local/{stack.bucket}/{CHAMPION}"
            if path.name.startswith("seaweedfs-filer-"):
                key = f"http://local/buckets/{stack.bucket}/{CHAMPION}"
            for answer in (client.get(key), client.put(key, content=b"evil"),
                           client.post(key, files={"file": ("champion.json", b"evil")})):
                # 401/403 unsigned, 404 no such API, 400 a form POST S3 does not take.
                assert 400 <= answer.status_code < 500, (path, answer.text)
                assert b"v-original" not in answer.content
    assert _champion(stack) == ORIGINAL


def test_prefect_api_refuses_requests_without_the_auth_string(stack: StackConfig) -> None:
    api = stack.prefect_api_url
    wrong = "Basic " + base64.b64encode(b"malaria:guess").decode()
    with _anonymous() as client:
        assert client.get(f"{api}/health").status_code == 200  # the readiness probe only
        for headers in ({}, {"Authorization": wrong}, {"Authorization": "Bearer x"}):
            assert client.get(f"{api}/admin/settings", headers=headers).status_code == 401
            assert client.get(f"{api}/flows/count", headers=headers).status_code == 401
            # A POST meets the CSRF check (403) or the auth check (401) first: refused.
            for path, body in (("/flows/filter", {}),
                               ("/work_pools/", {"name": "evil", "type": "process"})):
                answer = client.post(f"{api}{path}", json=body, headers=headers)
                assert answer.status_code in (401, 403), (path, answer.text)
    with prefect_api_client(stack) as client:
        assert "evil" not in {p["name"] for p in client.post("/work_pools/filter", json={}).json()}


def test_prefect_api_works_with_the_auth_string_and_checks_csrf(stack: StackConfig) -> None:
    with prefect_api_client(stack) as client:
        assert client.post("/flows/filter", json={}).status_code == 200
        # Same credentials, no CSRF token: a page that got the password still cannot post.
        bare = {k: v for k, v in client.headers.items() if not k.lower().startswith("prefect-csrf")}
        answer = httpx.post(f"{stack.prefect_api_url}/flows/filter", json={}, headers=bare,
                            timeout=10, trust_env=False)
        assert answer.status_code == 403


def test_prefect_cors_allows_only_its_own_origin(stack: StackConfig) -> None:
    url = f"{stack.prefect_api_url}/flows/filter"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with _anonymous() as client:
        evil = client.options(url, headers={"Origin": "http://evil.example", **preflight})
        assert evil.headers.get("access-control-allow-origin") not in ("*", "http://evil.example")
        own = client.options(url, headers={"Origin": stack.ui_url, **preflight})
        assert own.headers.get("access-control-allow-origin") == stack.ui_url


def test_prefect_client_runs_a_flow_with_stack_env(stack: StackConfig) -> None:
    """What workers and the CLI do: read stack.env, run flows against the server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(stack_env(stack))
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    code = ("from prefect import flow, get_run_logger\n"
            "@flow(name='security-probe')\n"
            "def probe() -> int:\n"
            "    get_run_logger().info('probe ran')\n"
            "    return 7\n"
            "print('result', probe())\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=env, text=True,
                            capture_output=True, timeout=300, check=False)
    assert result.returncode == 0 and "result 7" in result.stdout, result.stderr[-3000:]
    with prefect_api_client(stack) as client:
        runs = client.post("/flow_runs/filter", json={}).json()
        assert any(r["state_type"] == "COMPLETED" for r in runs)


def test_credentials_are_private(stack: StackConfig) -> None:
    env = stack_env(stack)
    assert env["PREFECT_API_AUTH_STRING"].startswith("malaria:")
    assert len(env["PREFECT_API_AUTH_STRING"]) > 24
    files = [stack.env_file, stack.identities_file, *security_dir(stack).iterdir()]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(security_dir(stack).stat().st_mode) == 0o700
    # The server's command line (visible to every local user in ps) holds no secret.
    argv = json.loads(stack.pid_file("prefect").read_text())["argv"]
    assert env["PREFECT_API_AUTH_STRING"] not in " ".join(argv)


def test_ui_asks_for_the_auth_string_and_works_after_login(stack: StackConfig) -> None:
    with _anonymous() as client:
        settings = client.get(f"{stack.ui_url}/ui-settings").json()
    assert settings["auth"] == "BASIC" and settings["csrf_enabled"] is True
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    with prefect_api_client(stack) as client:
        client.post("/flows/", json={"name": "ui-login-probe"}).raise_for_status()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(f"{stack.ui_url}/flows", wait_until="domcontentloaded")
            password = page.locator("input[type=password]")
            password.wait_for(timeout=60_000)  # the login form, not the flows
            password.fill(stack_env(stack)["PREFECT_API_AUTH_STRING"])
            page.get_by_role("button", name="Login").click()
            page.goto(f"{stack.ui_url}/flows", wait_until="domcontentloaded")
            page.get_by_text("ui-login-probe").first.wait_for(timeout=60_000)
        finally:
            browser.close()
