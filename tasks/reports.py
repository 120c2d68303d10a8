"""Prefect tasks that leave pictures and summaries for the people watching the UI.

Artifacts point at objects in the bucket, never carry a credential: no presigned URL (it
embeds the access key id and grants access to whoever holds it). A link or image is the
object's ``s3://`` address, or, when ``MALARIA_ARTIFACT_BASE_URL`` names an http(s) address
where the lab's browsers may read the bucket (a read-only gateway, a signed-in console),
that address followed by ``<bucket>/<key>``, which the UI can open and show.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
)
from prefect.cache_policies import NO_CACHE

from malaria.core import defaults
from malaria.core.settings import redact
from malaria.io.store import Store, open_store
from malaria.reports.gifs import class_gifs

ARTIFACT_BASE_URL = "MALARIA_ARTIFACT_BASE_URL"


# A picture up to this size goes into the artifact itself (a data: URI in markdown, which the
# Prefect UI shows); a larger one is linked. No bucket credentials are needed to see it.
EMBED_LIMIT_BYTES = 1_500_000


def embedded_image(alt: str, data: bytes, mime: str) -> str | None:
    """Markdown that shows ``data`` inline, or None when it is too large to embed."""
    if not data or len(data) > EMBED_LIMIT_BYTES:
        return None
    encoded = base64.b64encode(data).decode("ascii")
    return f"![{alt}](data:{mime};base64,{encoded})"


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only)."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def artifact_url(store: Store, key: str) -> str:
    """Where a person can find ``key``: see the module docstring."""
    uri = store.uri(key)
    base = os.environ.get(ARTIFACT_BASE_URL, "").strip()
    if base.startswith(("https://", "http://")) and uri.startswith("s3://"):
        uri = f"{base.rstrip('/')}/{uri.removeprefix('s3://')}"
    return redact(uri)


def publish_object_links(store: Store, keys: Mapping[str, str], *, kind: str,
                         images: bool = False, keyed: bool = True) -> None:
    """One artifact per object: an image artifact (``images``: plots, GIFs) or a link
    artifact, keyed ``<kind>-<name>`` so the Artifacts page keeps its versions (``keyed``
    False: attached to the run only, for per-run objects such as one slide's CSV)."""
    for name, key in keys.items():
        url = artifact_url(store, key)
        artifact = artifact_key(kind, name) if keyed else None
        description = f"{kind} {name}: {store.uri(key)}"
        if images:
            create_image_artifact(image_url=url, key=artifact, description=description)
        else:
            create_link_artifact(link=url, link_text=key.rsplit("/", 1)[-1], key=artifact,
                                 description=description)


@task(name="publish-cell-gifs", retries=1, cache_policy=NO_CACHE,
      timeout_seconds=defaults.REPORT_TIMEOUT_S)
def publish_cell_gifs(data_url: str, run_id: str, per_class: int = 100) -> dict[str, str]:
    store = open_store(data_url)
    keys = class_gifs(store, per_class=per_class, run_id=run_id)
    get_run_logger().info("cell GIFs: %s", ", ".join(store.uri(k) for k in keys.values()))
    for name, key in keys.items():
        # Shown in the UI from the artifact itself; an http gateway (or a GIF too large to
        # embed) gets an image artifact pointing at the object instead.
        inline = None if os.environ.get(ARTIFACT_BASE_URL) else embedded_image(
            f"first cells of {name}", store.get_bytes(key), "image/gif")
        if inline is None:
            publish_object_links(store, {name: key}, kind="cell-gif", images=True)
        else:
            create_markdown_artifact(key=artifact_key("cell-gif", name),
                                     markdown=f"# First cells of {name}\n\n{inline}\n",
                                     description=f"cell-gif {name}: {store.uri(key)}")
    return {name: store.uri(key) for name, key in keys.items()}


@task(name="publish-nightly-report", cache_policy=NO_CACHE, timeout_seconds=defaults.REPORT_TIMEOUT_S)
def publish_nightly_report(ingest: dict[str, Any], training: dict[str, Any] | None,
                           gifs: dict[str, str]) -> None:
    lines = ["# Nightly retraining", "",
             "## Ingest", "",
             f"- listed {ingest['listed']}: accepted {ingest.get('accepted', 0)}, duplicates "
             f"{ingest.get('duplicate', 0)}, quarantined {ingest.get('quarantined', 0)}, "
             f"already ingested {ingest.get('already_ingested', 0)}",
             f"- quarantine reasons: {ingest['reasons'] or 'none'}",
             f"- manifest: `{ingest['manifest']}`", ""]
    if training is None:
        lines += ["## Training", "", "Skipped: no labelled cells in dataset/ yet.", ""]
    elif training.get("skipped"):
        lines += ["## Training", "", f"Skipped: {training['reason']}. The champion "
                  f"`{training.get('champion') or '?'}` serves on; nothing was registered and "
                  "no slide became due.", ""]
    else:
        m = training["metrics"]
        verdict = "promoted to champion" if training["promoted"] else "not promoted"
        lines += ["## Training", "",
                  f"- model `{training['version']}`: **{verdict}**",
                  f"- gate: {training['reason']}",
                  f"- held-out test slides: accuracy {m['accuracy']:.4f}, AUC "
                  f"{m['roc_auc']:.4f}, sensitivity {m['sensitivity']:.4f}, specificity "
                  f"{m['specificity']:.4f} (threshold {training['threshold']:.3f})",
                  "- full report: the `training-report` artifact", ""]
    lines += ["## Cells", ""]
    lines += [f"- first cells of {name}: `{uri}` (the `{artifact_key('cell-gif', name)}` "
              "artifact shows it)" for name, uri in gifs.items()]
    create_markdown_artifact(key="nightly-report", markdown="\n".join(lines),
                             description="Nightly ingest, training and gate summary")
