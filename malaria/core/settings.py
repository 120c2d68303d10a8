"""Settings read from the environment, with defaults that work on the local stack; and
``redact``, which also reads the local stack's ``stack.env`` (configuration, not data) to know
every credential a message might carry."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from urllib.parse import quote, urlsplit

DEFAULT_DATA_URL = "s3://malaria"
MASK = "***"
# Environment variables whose values are credentials, by name; and every value of stack.env
# except these plain settings (endpoint, region, URLs of our own servers).
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|AUTH|CREDENTIAL|WEBHOOK|"
                          r"ACCESS_KEY|PRIVATE_KEY|API_KEY|_KEY_ID$", re.IGNORECASE)
_NOT_SECRET = {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "PREFECT_API_URL",
               "PREFECT_UI_URL", "MALARIA_DATA_URL"}
# user:password@ in any URL, whoever wrote it.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@")
# Shorter values are too likely to occur in ordinary text to be replaced safely.
_MIN_SECRET = 8


def data_url(explicit: str | None = None) -> str:
    """Where the system of record lives: ``s3://bucket[/prefix]`` or ``file:///dir``."""
    return explicit or os.environ.get("MALARIA_DATA_URL") or DEFAULT_DATA_URL


def _stack_env_values() -> dict[str, str]:
    """The local stack's ``stack.env`` (MALARIA_STATE_DIR, default .malaria), if readable:
    a worker may hold these values although its environment names them differently."""
    path = Path(os.environ.get("MALARIA_STATE_DIR") or ".malaria") / "stack.env"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    values = {}
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith("#"):
            values[name.strip()] = value.strip()
    return values


def _forms(secret: str) -> set[str]:
    """A secret as it may appear in a message: as is, URL-quoted, as an HTTP Basic token
    (base64, how a Prefect auth string travels), and, for a URL, its path and query (a
    webhook's token lives there: an error may print the URL normalised or cut)."""
    forms = {secret, quote(secret, safe=""), quote(secret, safe="/:"),
             base64.b64encode(secret.encode()).decode()}
    parts = urlsplit(secret) if "://" in secret else None
    if parts and parts.netloc:
        tail = parts.path + (f"?{parts.query}" if parts.query else "")
        if len(tail.strip("/")) >= _MIN_SECRET:
            forms.add(tail)
            forms.add(tail.lstrip("/"))
    return {f for f in forms if len(f) >= _MIN_SECRET}


def secret_values(env: dict[str, str] | None = None) -> set[str]:
    """Every credential value this process knows of: variables named like credentials
    (AWS keys, PREFECT_API_AUTH_STRING, PREFECT_SERVER_API_AUTH_STRING, MALARIA_ALERT_
    WEBHOOK_URL, ...), and every value of the local stack's stack.env but its plain settings
    (endpoint, region, the Prefect API URL, the data URL)."""
    source = dict(os.environ) if env is None else env
    # Both sources in full: the same name may hold different values in each.
    named = [value for name, value in source.items() if _SECRET_NAME.search(name)]
    stack = [value for name, value in _stack_env_values().items() if name not in _NOT_SECRET]
    return {value for value in [*named, *stack]
            if value and len(value) >= _MIN_SECRET and value not in _plain(source)}


def _plain(env: dict[str, str]) -> set[str]:
    return {env[name] for name in _NOT_SECRET if env.get(name)}


def redact(text: str) -> str:
    """Remove credentials that might have slipped into a message before it is logged:
    every form of every value :func:`secret_values` finds, and any URL's user:password."""
    forms = {form for secret in secret_values() for form in _forms(secret)}
    for form in sorted(forms, key=len, reverse=True):  # a whole URL before its path
        text = text.replace(form, MASK)
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)


def cache_dir(explicit: str | None = None) -> str:
    """Local folder for decoded-image caches (safe to delete; rebuilt on demand)."""
    return explicit or os.environ.get("MALARIA_CACHE_DIR") or os.path.join(
        os.environ.get("MALARIA_STATE_DIR", ".malaria"), "cache")
