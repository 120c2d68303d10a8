"""Settings read from the environment, with defaults that work on the local stack."""

from __future__ import annotations

import os

DEFAULT_DATA_URL = "s3://malaria"


def data_url(explicit: str | None = None) -> str:
    """Where the system of record lives: ``s3://bucket[/prefix]`` or ``file:///dir``."""
    return explicit or os.environ.get("MALARIA_DATA_URL") or DEFAULT_DATA_URL


def redact(text: str) -> str:
    """Remove credentials that might have slipped into a message before it is logged."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return text


def cache_dir(explicit: str | None = None) -> str:
    """Local folder for decoded-image caches (safe to delete; rebuilt on demand)."""
    return explicit or os.environ.get("MALARIA_CACHE_DIR") or os.path.join(
        os.environ.get("MALARIA_STATE_DIR", ".malaria"), "cache")
