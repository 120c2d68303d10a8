"""Removing a test's buckets from the session's S3 server (see conftest)."""

from __future__ import annotations

from typing import Any


def drop_bucket(client: Any, bucket: str) -> None:
    """Delete every object of ``bucket`` through a boto3 ``client``, then the bucket."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)
