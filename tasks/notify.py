"""The Prefect blocks the pipeline reads: the alert webhook (a ``Webhook`` block the server's
automations call, deployments/local.py) and, when one is named, the AWS credentials block
the S3 clients use.

The webhook URL usually holds a token: it lives only in the block (a SecretStr), is never
logged, printed or put in an artifact, and a delivery error is reported by its type and
status code alone (httpx's errors name the URL).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import httpx
from prefect.blocks.webhook import Webhook
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from malaria.io.s3_clients import ExplicitCredentials, use_credentials

log = logging.getLogger(__name__)

WEBHOOK_ENV = "MALARIA_ALERT_WEBHOOK_URL"
WEBHOOK_BLOCK = "malaria-alert-webhook"
CREDENTIALS_ENV = "MALARIA_AWS_CREDENTIALS_BLOCK"
# prefect-aws's AwsCredentials block type. Read as a plain block document (below), so the
# project needs no prefect-aws (its aiobotocore pins would move boto3/botocore).
AWS_CREDENTIALS_TYPE = "aws-credentials"


# ---------------------------------------------------------------------------- the webhook


def save_webhook_block(url: str, name: str = WEBHOOK_BLOCK) -> Any:
    """Save (or replace) the webhook block; returns its block document id."""
    # Automations send JSON text (their payload is a rendered template string).
    block = Webhook(method="POST", url=url, headers={"Content-Type": "application/json"})
    return block.save(name, overwrite=True)


def load_webhook_block(name: str = WEBHOOK_BLOCK) -> Webhook | None:
    """The saved webhook block, or None when none was configured."""
    try:
        return Webhook.load(name)
    except (ValueError, ObjectNotFound):  # ValueError: Prefect's "Unable to find block"
        return None


def post_to_webhook(payload: dict[str, Any], name: str = WEBHOOK_BLOCK) -> str | None:
    """POST ``payload`` through the webhook block. Returns None when delivered, else a short
    reason without the URL ("not configured", "HTTP 500", "ConnectError")."""
    block = load_webhook_block(name)
    if block is None:
        return "not configured"
    # Through the transport, not a Client: httpx.Client logs every request's URL at INFO,
    # and this URL holds the webhook's token.
    request = httpx.Request("POST", block.url.get_secret_value(), content=json.dumps(payload),
                            headers=block.headers.get_secret_value(),
                            extensions={"timeout": httpx.Timeout(10).as_dict()})
    try:
        with httpx.HTTPTransport() as transport:
            response = transport.handle_request(request)
            response.read()
    except httpx.HTTPError as error:  # its message names the URL: keep the type only
        return type(error).__name__
    return None if response.is_success else f"HTTP {response.status_code}"


# ------------------------------------------------------------------------ AWS credentials


def aws_credentials_from_block(name: str) -> ExplicitCredentials:
    """A prefect-aws ``AwsCredentials`` block's key, secret, session token, region and
    endpoint, read from its block document (secrets included) without its class."""
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            name, block_type_slug=AWS_CREDENTIALS_TYPE, include_secrets=True)
    data = document.data or {}
    params = data.get("aws_client_parameters") or {}

    def text(value: Any) -> str | None:
        if value is None or value == "":
            return None
        # A SecretStr when the block came back typed, a plain string from the API.
        return str(value.get_secret_value() if hasattr(value, "get_secret_value") else value)

    return ExplicitCredentials(
        access_key=text(data.get("aws_access_key_id")),
        secret_key=text(data.get("aws_secret_access_key")),
        session_token=text(data.get("aws_session_token")),
        region=text(data.get("region_name")),
        endpoint_url=text(params.get("endpoint_url")) if isinstance(params, dict) else None)


def use_credentials_block(name: str | None = None) -> str | None:
    """When ``$MALARIA_AWS_CREDENTIALS_BLOCK`` (or ``name``) names an AwsCredentials block,
    every S3 client of this process uses it; otherwise boto3's chain (environment, profile,
    role) stays. Returns the block's name, or None."""
    name = name or os.environ.get(CREDENTIALS_ENV) or None
    if not name:
        return None
    use_credentials(aws_credentials_from_block(name))
    log.info("S3 credentials from the AwsCredentials block %r", name)
    return name
