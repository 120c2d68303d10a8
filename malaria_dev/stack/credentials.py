"""The stack's S3 identity and the client settings a process needs to use the stack.

``s3-identities.json`` holds the one S3 access key and secret (given to weed -s3.config);
``stack.env`` holds what a client needs: endpoint, keys, region, Prefect API URL and its auth
string (``PREFECT_API_AUTH_STRING``; the server gets the same value as
``PREFECT_SERVER_API_AUTH_STRING``), data URL. Both are mode 0600; secrets are written to
files and never printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import string
from typing import Any

from malaria.io.atomic import write_atomic
from malaria_dev.stack.config import REGION, StackConfig, StackError

PRIVATE = 0o600


def _new_access_key() -> str:
    # AWS-shaped: 20 upper-case alphanumerics.
    alphabet = string.ascii_uppercase + string.digits
    return "MAL" + "".join(secrets.choice(alphabet) for _ in range(17))


def ensure_identities(cfg: StackConfig) -> None:
    """Create the S3 identity file on first use; later calls keep the existing keys."""
    if cfg.identities_file.exists():
        os.chmod(cfg.identities_file, PRIVATE)
        return
    doc = {
        "identities": [
            {
                "name": "malaria",
                "credentials": [
                    {"accessKey": _new_access_key(), "secretKey": secrets.token_hex(20)}
                ],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    write_atomic(cfg.identities_file, json.dumps(doc, indent=2) + "\n", mode=PRIVATE)


def s3_credentials(cfg: StackConfig) -> tuple[str, str]:
    """(access key, secret key) of the stack's S3 identity, read from the state folder."""
    try:
        doc = json.loads(cfg.identities_file.read_text())
        cred = doc["identities"][0]["credentials"][0]
        return str(cred["accessKey"]), str(cred["secretKey"])
    except FileNotFoundError as exc:
        raise StackError(
            f"no S3 credentials in {cfg.state_dir}; run `malaria stack up` first"
        ) from exc
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise StackError(f"{cfg.identities_file} is not a SeaweedFS identity file") from exc


AUTH_VARIABLE = "PREFECT_API_AUTH_STRING"
AUTH_USER = "malaria"


def _recorded_auth_string(cfg: StackConfig) -> str | None:
    try:
        return stack_env(cfg).get(AUTH_VARIABLE) or None
    except StackError:
        return None


def prefect_auth_string(cfg: StackConfig) -> str:
    """The Prefect API's auth string (``user:password``, what the UI's login asks for), from
    stack.env; created with it (and the S3 identity) on first use."""
    existing = _recorded_auth_string(cfg)
    if existing:
        return existing
    ensure_identities(cfg)
    write_env_file(cfg)
    return stack_env(cfg)[AUTH_VARIABLE]


def write_env_file(cfg: StackConfig) -> None:
    """(Re)write stack.env from the identity file and the config; the Prefect auth string
    already there is kept (a running server and its workers hold it), else a new one."""
    access, secret = s3_credentials(cfg)
    auth = _recorded_auth_string(cfg) or f"{AUTH_USER}:{secrets.token_urlsafe(24)}"
    values = {
        "AWS_ENDPOINT_URL": cfg.s3_endpoint,
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": REGION,
        "PREFECT_API_URL": cfg.prefect_api_url,
        AUTH_VARIABLE: auth,
        "MALARIA_DATA_URL": f"s3://{cfg.bucket}",
    }
    body = "".join(f"{k}={v}\n" for k, v in values.items())
    write_atomic(cfg.env_file, "# written by `malaria stack up`; contains secrets\n" + body,
                 mode=PRIVATE)


def stack_env(cfg: StackConfig) -> dict[str, str]:
    """The environment a client process needs to use the stack (read from stack.env)."""
    try:
        text = cfg.env_file.read_text()
    except FileNotFoundError as exc:
        raise StackError(f"{cfg.env_file} not found; run `malaria stack up` first") from exc
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip()
    return env


def load_stack_env(cfg: StackConfig) -> None:
    """Put the stack's variables into os.environ, keeping any already set."""
    for key, value in stack_env(cfg).items():
        os.environ.setdefault(key, value)


def use_local_stack_if_configured() -> None:
    """Point clients at the local stack of MALARIA_STATE_DIR (the CLI's --state-dir) unless
    the environment already names a target; without a stack there, nothing changes."""
    with contextlib.suppress(StackError):
        load_stack_env(StackConfig.from_env())


def stack_s3_client(cfg: StackConfig) -> Any:
    """The project's S3 client (``malaria.io.s3_clients.s3_client``) signed with the stack's
    own identity, whatever AWS_* the caller's environment holds, and failing fast: readiness
    checks retry on their own."""
    from malaria.io.s3_clients import s3_client  # here: keeps `malaria stack status` light

    access, secret = s3_credentials(cfg)
    return s3_client(cfg.s3_endpoint, pool_size=4, region=REGION, access_key=access,
                     secret_key=secret, max_attempts=1, connect_timeout=3, read_timeout=10)


def prefect_api_client(cfg: StackConfig, *, timeout: float = 30) -> Any:
    """An ``httpx.Client`` for raw calls to the stack's Prefect REST API (tests, scripts):
    the auth string as HTTP Basic auth, and a CSRF token on state-changing requests, as
    Prefect's own client does. Prefect's ``get_client()`` needs none of this: it reads
    PREFECT_API_AUTH_STRING from the environment (stack.env)."""
    import uuid

    import httpx

    headers = {"Authorization": _basic(prefect_auth_string(cfg))}
    csrf_client = str(uuid.uuid4())
    # A one-off request: the client returned must still be unopened (usable in `with`).
    answer = httpx.get(f"{cfg.prefect_api_url}/csrf-token", params={"client": csrf_client},
                       headers=headers, timeout=timeout, trust_env=False)
    if answer.status_code == 200:  # 422: CSRF protection is off on this server
        headers.update({"Prefect-Csrf-Token": answer.json()["token"],
                        "Prefect-Csrf-Client": csrf_client})
    return httpx.Client(base_url=cfg.prefect_api_url, timeout=timeout, trust_env=False,
                        headers=headers)


def _basic(auth: str) -> str:
    import base64

    return "Basic " + base64.b64encode(auth.encode()).decode()
