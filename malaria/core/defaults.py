"""Every default the product uses, declared once: the CLI, the flows, the deployments and the
benchmarks read them from here, so a figure measured with a default is the product's."""

from __future__ import annotations

from typing import Final

# ---- promotion gate: a candidate is promoted only above the floors and not worse than the
# champion's figure minus the tolerance (on the same held-out slides).
GATE_MIN_AUC = 0.90
GATE_MIN_ACCURACY = 0.85
GATE_TOLERANCE = 0.005

# ---- training
# cellnet with stain-density (HED) jitter in training: in the slide-grouped CV (1 view, 0.5)
# +0.0059 accuracy and +0.0017 AUC over cellnet, parasitemia -0.16 pp (benchmarks/README.md,
# "HED stain jitter, threshold rules, ensembles"). Identity at inference.
DEFAULT_ARCH = "cellnet-hed"
TRAIN_EPOCHS = 30
TRAIN_BATCH_SIZE = 128
TRAIN_SEED = 0
TRAIN_LEARNING_RATE = 4e-3  # peak, after warm-up (tuned on validation slides)
TRAIN_LABEL_SMOOTHING = 0.1  # robustness to the known label noise
TRAIN_PATIENCE: int | None = 8  # epochs without a better val_loss before stopping
TRAIN_WARMUP_EPOCHS = 1.0  # linear warm-up to the peak rate, then cosine decay
TRAIN_MIN_LR_FRACTION = 0.02  # the cosine's floor, as a fraction of the peak
TRAIN_WEIGHT_DECAY = 1e-4  # AdamW, decoupled
# "auto": float32 unless the device runs bfloat16 natively and a timed probe says it pays
# (malaria.model.precision); never a fixed precision the CPU may lack.
TRAIN_PRECISION = "auto"
# Test-time views averaged per cell (malaria.core.views: True = all 8 symmetries of the
# square, False = 1, a number that many). Off: in the slide-grouped CV, 8 views moved AUC by
# +0.001 and neither accuracy nor per-slide parasitemia at the chosen threshold, for 4x the
# scoring cost (benchmarks/README.md, "Test-time views"). The threshold is chosen on
# probabilities at this setting, and the scorer reads it from the model's record.
TEST_TIME_AUGMENTATION: bool | int = False
# The training budget (wall clock of the fit), everywhere: `malaria train`, the train flow,
# the nightly. Issue 15's target; a 2-core CPU with BF16 fits ~27 of the 30 epochs in it and
# one without (float32) ~15, which the CV's "15 epochs" row measures (benchmarks/README.md).
TRAIN_MAX_MINUTES: float | None = 15.0
NIGHTLY_TRAIN_MINUTES = TRAIN_MAX_MINUTES
VAL_FRACTION = 0.15
TEST_FRACTION = 0.2
# The decision threshold rule (Final: a type checker reads it as the literal, one of
# malaria.evaluation.threshold.ThresholdRule). "fixed": DEFAULT_THRESHOLD, the point the
# class-balanced loss targets, not refitted on the 15 validation slides; in the CV it beat
# Youden's J on validation for every model tried (cellnet +0.0038 accuracy, cellnet-hed
# +0.0018, parasitemia -0.07 / -0.41 pp), as the validation slides' own mix moved the fitted
# threshold as far as 0.16.
THRESHOLD_RULE: Final = "fixed"
THRESHOLD_MIN_SENSITIVITY = 0.96  # the "min_sensitivity" rule's floor (screening)
DEFAULT_THRESHOLD = 0.5  # the "fixed" rule's threshold; also a model without a recorded one

# ---- ingest
INGEST_CHUNK_SIZE = 500
INGEST_CONCURRENCY = 16

# ---- scoring
SCORE_SHARD_SIZE = 2000
SCORE_BATCH_SIZE = 256
SCORE_CONCURRENCY = 16
# One shard at a time: its pipeline already overlaps fetching with inference, and on two
# cores a second pipeline's model competes with the first (measured 2026-11-30, 8,000
# cells, 4 alternating pairs: 1 shard 451 cells/s around the flow call, 2 shards 426).
SCORE_PARALLEL_SHARDS = 1
SCORE_KEYS_PER_FETCH = 64  # keys a fetch thread asks the store for at once (Store.get_many)
SCORE_LEASE_TTL_S = 900.0
SCORE_LEASE_SETTLE_S = 1.0
# A re-scored slide whose parasitemia moves by more than this many percentage points is
# listed in the run's report and raises an event (malaria.slide.parasitemia-changed).
SCORE_PARASITEMIA_SHIFT_PP = 2.0

# ---- ingest: time bounds and the single-writer lock (malaria.ingest.lock)
# A chunk (<= INGEST_CHUNK_SIZE objects, <= 256 MB) takes seconds at the measured 100-230
# images/s; the timeout is ~60x that, so only a stalled store or endpoint reaches it.
INGEST_CHUNK_TIMEOUT_S = 300.0
INGEST_STATE_TIMEOUT_S = 600.0  # loading every ledger part and labels file (one GET each)
INGEST_REPORT_TIMEOUT_S = 300.0  # uploading the manifest and writing the artifacts
INGEST_LOCK_TTL_S = 600.0  # a lock not renewed for this long is stale (its run died)
INGEST_LOCK_SETTLE_S = 1.0  # claim, wait this long, read back: a rival's write has landed
INGEST_LOCK_POLL_S = 5.0  # how often a waiting run looks at the lock again
INGEST_LOCK_WAIT_S = 1800.0  # how long a second run waits for the lock before it stops
# A whole run: waiting for the lock plus two hours of chunks (~1M images at the measured
# rate). A run that reaches it loses at most its last chunk: the next run resumes from the
# ledger.
INGEST_RUN_TIMEOUT_S = INGEST_LOCK_WAIT_S + 2 * 3600.0

# ---- time limits: a stalled endpoint or a hung step fails the run (and frees the worker
# slot that failure-alert needs) instead of holding it for hours. Generous against measured
# run times; each S3 request has its own, much shorter, limits (malaria.io.s3_clients).
SCORE_FLOW_TIMEOUT_S = 6 * 3600
SCORE_STEP_TIMEOUT_S = 30 * 60  # resolve the model, find due slides, drift check
SCORE_SHARD_TIMEOUT_S = 30 * 60  # one shard of SCORE_SHARD_SIZE cells (~1 min on 2 cores)
TRAIN_FLOW_TIMEOUT_S = 12 * 3600
TRAIN_LOAD_TIMEOUT_S = 3 * 3600  # list, download and decode the dataset
TRAIN_FIT_TIMEOUT_S = 10 * 3600  # the fit itself, when no minutes budget bounds it
TRAIN_EVALUATE_TIMEOUT_S = 2 * 3600
TRAIN_REGISTER_TIMEOUT_S = 30 * 60
TRAIN_GATE_TIMEOUT_S = 2 * 3600  # scores the champion on the test slides, then promotes
REPORT_TIMEOUT_S = 15 * 60  # artifacts, GIFs
NIGHTLY_FLOW_TIMEOUT_S = 8 * 3600  # ingest + NIGHTLY_TRAIN_MINUTES of training + reports
ALERT_FLOW_TIMEOUT_S = 5 * 60  # it must end: it shares the worker slot with scoring

# ---- promotion gate, paired test (malaria.evaluation.paired): candidate and champion are
# scored on the same test cells and the slides are resampled with replacement; the candidate
# must not be worse than the champion by more than GATE_TOLERANCE at the lower end of the
# GATE_CONFIDENCE interval of the difference (a one-sided 97.5% non-inferiority test).
GATE_BOOTSTRAP_RESAMPLES = 2000
GATE_BOOTSTRAP_SEED = 20240501  # fixed: the same cells give the same decision every time
GATE_CONFIDENCE = 0.95
# ---- approval: a flow run with require_approval waits this long for a person to answer
# (the pause holds the worker slot). It must fit in TRAIN_FLOW_TIMEOUT_S and, for the
# nightly, in what NIGHTLY_FLOW_TIMEOUT_S leaves after ingest and training.
APPROVAL_TIMEOUT_S = 4 * 3600
APPROVAL_POLL_S = 10  # how often the paused run asks the server whether it was resumed

# ---- retention (`malaria gc`, the weekly-gc deployment; malaria.registry.retention). A
# checkpoint set, a run's reports or an alert goes only when it is beyond the newest KEEP
# of its kind AND older than its MAX_AGE: a burst of runs cannot push out last week's, and
# a quiet month cannot empty a kind. Lineage and records are never candidates at all.
GC_KEEP_CHECKPOINTS = 3
GC_CHECKPOINT_MAX_AGE_DAYS = 30.0
GC_KEEP_REPORTS = 14
GC_REPORT_MAX_AGE_DAYS = 30.0
GC_KEEP_ALERTS = 200
GC_ALERT_MAX_AGE_DAYS = 90.0
# Longer than a training fit may run between two epochs' uploads: a set written to within
# it may belong to a run in progress, whatever its age or rank.
GC_ACTIVE_GRACE_S = 24 * 3600.0
GC_MAX_LEDGER_PARTS = 200  # past this many ledger parts, they are merged into one
GC_CACHE_MAX_AGE_DAYS = 30.0  # decoded images untouched this long leave the local cache
GC_KEEP_CACHED_MODELS = 3  # downloaded models kept locally, besides the champion
# How long gc waits for an ingest run to let go of the ingest lock before it leaves the
# ledger for next time (it never fails the rest of the collection).
GC_LOCK_WAIT_S = 600.0
GC_FLOW_TIMEOUT_S = 2 * 3600  # listing and deleting; a stalled store fails the run
