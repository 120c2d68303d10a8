"""The bucket layout, declared once. Every other module builds keys through these functions.

```
incoming/...                         raw labelled uploads (class from a folder name or labels/)
labels/<name>.csv                    optional labels for incoming/ objects (key,label[,slide])
labels/corrections/<name>.csv        a reviewer's verdicts on ingested cells (key,label,reason,reviewer)
labels/corrections/applied/<name>    a verdict file once applied (kept, never edited)
dataset/<class>/<slide>/<file>       validated, de-duplicated, sorted: the training set
quarantine/<reason>/<file>           rejected input, plus <file>.json with the reason
scans/<slide>/<file>                 new unlabelled cells to score
predictions/<slide>.csv              one row per cell; predictions/summary.csv per slide
models/<version>/...                 model file, metrics.json, plots, data manifest
models/<version>/lineage.csv         every cell it saw: key, ETag, class, slide, split
models/champion.json                 which version serves
manifests/<run>.csv                  what each run read and what became of it (audit trail)
manifests/<run>.summary.json         an ingest run's counts (what the nightly report shows)
state/ingest/<run>-<chunk>.csv       ingest ledger: one part per committed chunk
checkpoints/<run key>/...            training checkpoints, so a killed training resumes
reports/<run>/...                    pictures for people (GIFs of cells per class)
alerts/<time>-<flow run>.json        a failed or crashed pipeline run (flows/alerts.py)
state/scoring/...                    scoring leases, shard parts and done-markers
```
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from datetime import UTC, datetime

INCOMING = "incoming/"
LABELS = "labels/"
# Inside labels/, so ingest's labels loader must skip it (verdicts, not incoming labels).
LABEL_CORRECTIONS = f"{LABELS}corrections/"
LABEL_CORRECTIONS_APPLIED = f"{LABEL_CORRECTIONS}applied/"
DATASET = "dataset/"
QUARANTINE = "quarantine/"
SCANS = "scans/"
PREDICTIONS = "predictions/"
MODELS = "models/"
MANIFESTS = "manifests/"
INGEST_LEDGER = "state/ingest/"
# Beside the ledger, not in it: the ledger loads every object under its prefix.
INGEST_LOCK_KEY = "state/ingest.lock.json"
CHECKPOINTS = "checkpoints/"
REPORTS = "reports/"
ALERTS = "alerts/"

CHAMPION_KEY = f"{MODELS}champion.json"
# The per-slide summary beside the per-slide CSVs (a local output folder has it too).
PREDICTION_SUMMARY_FILE = "summary.csv"
PREDICTION_SUMMARY_KEY = f"{PREDICTIONS}{PREDICTION_SUMMARY_FILE}"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(name: str, *, max_length: int = 150) -> str:
    """A file name that is safe in any store and shell: ASCII letters, digits, ``._-``.

    Accents are folded (é -> e), anything else becomes ``_``. The original key is always
    kept in the manifest, so nothing is lost by renaming.
    """
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    cleaned = _UNSAFE.sub("_", folded).strip("._") or "unnamed"
    if len(cleaned) > max_length:
        stem, dot, ext = cleaned.rpartition(".")
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        keep = max_length - len(ext) - 10
        cleaned = f"{stem[:keep]}-{digest}.{ext}" if dot else f"{cleaned[:keep]}-{digest}"
    return cleaned


def dataset_class_prefix(class_name: str) -> str:
    return f"{DATASET}{class_name}/"


def dataset_key(class_name: str, slide: str, file_name: str) -> str:
    return f"{dataset_class_prefix(class_name)}{slide}/{file_name}"


def incoming_key(relative: str) -> str:
    """``incoming/<relative>``: the class folder (or labels/ entry) and file name."""
    return f"{INCOMING}{relative.lstrip('/')}"


def quarantine_key(reason: str, source_key: str) -> str:
    """Quarantined copies keep a readable name; a short hash of the source key keeps two
    rejected files with the same name from overwriting each other."""
    name = safe_file_name(source_key.rsplit("/", 1)[-1])
    tag = hashlib.sha256(source_key.encode()).hexdigest()[:10]
    return f"{QUARANTINE}{reason}/{tag}-{name}"


def quarantine_sidecar_key(reason: str, source_key: str) -> str:
    return quarantine_key(reason, source_key) + ".json"


def manifest_key(run_id: str) -> str:
    return f"{MANIFESTS}{run_id}.csv"


def manifest_summary_key(run_id: str) -> str:
    """The run's counts beside its manifest, for whoever started it elsewhere (nightly)."""
    return f"{MANIFESTS}{run_id}.summary.json"


def ingest_ledger_key(run_id: str, chunk_index: int) -> str:
    return f"{INGEST_LEDGER}{run_id}-{chunk_index:06d}.csv"


def scan_key(slide: str, file_name: str) -> str:
    return f"{SCANS}{slide}/{file_name}"


def prediction_key(slide: str) -> str:
    return f"{PREDICTIONS}{slide}.csv"


def prediction_history_prefix(predictions: str = PREDICTIONS) -> str:
    """Under which every slide's earlier predictions CSVs are kept, one folder per slide."""
    return f"{predictions}history/"


def prediction_history_key(slide: str, fingerprint: str, version: str,
                           predictions: str = PREDICTIONS) -> str:
    """Where a slide's earlier predictions CSV is kept when it is scored again (by another
    model, or after a re-scan): never overwritten, never deleted by the product."""
    return f"{prediction_history_prefix(predictions)}{slide}/{fingerprint}@{version}.csv"


def model_prefix(version: str) -> str:
    return f"{MODELS}{version}/"


def model_file_key(version: str, file_name: str) -> str:
    """A file of a registered version: the model, ``metrics.json``, a plot..."""
    return f"{model_prefix(version)}{file_name}"


def lineage_key(version: str) -> str:
    """The exact dataset a registered version saw: one row per cell (key, ETag, class,
    slide, split), so the model can be traced and re-trained from it."""
    return model_file_key(version, "lineage.csv")


def correction_applied_key(name: str, applied_at: datetime) -> str:
    """Where an applied verdict file is kept: the time keeps two files of one name apart."""
    moment = applied_at if applied_at.tzinfo else applied_at.replace(tzinfo=UTC)
    stamp = moment.astimezone(UTC).strftime("%Y-%m-%dT%H%M%S")
    return f"{LABEL_CORRECTIONS_APPLIED}{stamp}-{safe_file_name(name)}"


def checkpoint_prefix(run_key: str) -> str:
    """Checkpoints of one training identity (same data and settings), so a killed run
    resumes from them."""
    return f"{CHECKPOINTS}{run_key}/"


def report_prefix(run_id: str) -> str:
    return f"{REPORTS}{run_id}/"


def report_key(run_id: str, file_name: str) -> str:
    return f"{report_prefix(run_id)}{file_name}"


def alert_key(at: datetime, flow_run_id: str) -> str:
    """``alerts/2026-11-27T061500-<run>.json``: sorts by time; the run id keeps two failures in
    the same second apart. A naive time is taken as UTC."""
    moment = at if at.tzinfo else at.replace(tzinfo=UTC)
    stamp = moment.astimezone(UTC).strftime("%Y-%m-%dT%H%M%S")
    return f"{ALERTS}{stamp}-{safe_file_name(flow_run_id or 'unknown')}.json"


# Scoring bookkeeping (see malaria.scoring): leases, per-shard partial results, and a marker
# per scored slide whose NAME says which cells (fingerprint) and model version it covers, so
# finding due slides needs listings only. ``state`` lets a one-off run keep the same layout
# under another folder.
SCORING_STATE = "state/scoring/"
LOCAL_SCORING_STATE = "_scoring/"  # the same bookkeeping inside a local output folder


def scoring_marker_prefix(slide: str, state: str = SCORING_STATE) -> str:
    return f"{state}done/{slide}/"


def scoring_marker_key(slide: str, fingerprint: str, version: str,
                       state: str = SCORING_STATE) -> str:
    return f"{scoring_marker_prefix(slide, state)}{fingerprint}@{version}.json"


def scoring_parts_prefix(slide: str, state: str = SCORING_STATE) -> str:
    return f"{state}parts/{slide}/"


def scoring_part_key(slide: str, fingerprint: str, version: str, start: int, end: int,
                     state: str = SCORING_STATE) -> str:
    return f"{scoring_parts_prefix(slide, state)}{fingerprint}@{version}/{start:07d}-{end:07d}.csv"


def scoring_lease_key(slide: str, state: str = SCORING_STATE) -> str:
    return f"{state}leases/{slide}.json"


# Retention (malaria.registry.retention): the ledger parts merged into one. Named after the
# newest merged part, minus its ".csv": it sorts right before that part and after every
# older one, so rows replay in their original order, and parts written later sort after it.
def ingest_ledger_compacted_key(newest_part_key: str) -> str:
    return f"{newest_part_key.removesuffix('.csv')}-compacted.csv"


def checkpoint_group(key: str) -> str | None:
    """``checkpoints/<run key>/`` of a key under it, else None."""
    return _first_folder(CHECKPOINTS, key)


def report_group(key: str) -> str | None:
    """``reports/<run>/`` of a key under it, else None."""
    return _first_folder(REPORTS, key)


def _first_folder(prefix: str, key: str) -> str | None:
    if not key.startswith(prefix):
        return None
    name, sep, _ = key[len(prefix):].partition("/")
    return f"{prefix}{name}/" if sep and name else None


# Checkpoint sets (malaria.model.checkpoints): each upload goes to its own set folder, then
# the pointer names it; a set without a pointer (a crash mid-upload) is never resumed from.
CHECKPOINT_POINTER_FILE = "LATEST.json"


def checkpoint_pointer_key(prefix: str) -> str:
    """``checkpoints/<run key>/LATEST.json`` for ``prefix`` = ``checkpoint_prefix(run key)``:
    the last complete set (its epoch, and each file's size and SHA-256), written last."""
    return f"{prefix}{CHECKPOINT_POINTER_FILE}"


def checkpoint_set_prefix(prefix: str, set_id: str) -> str:
    """``checkpoints/<run key>/sets/<set id>/``: one uploaded checkpoint set."""
    return f"{prefix}sets/{set_id}/"
