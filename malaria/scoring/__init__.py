"""Bulk scoring of slide scans: ``scans/<slide>/<file>`` in, ``predictions/<slide>.csv`` out.

The steps live here, without Prefect; the one orchestrator is the score flow
(flows/score.py), which ``malaria score``, the ``bulk-scoring`` deployment and
``benchmarks.scoring`` all run. The rooms:

- ``paths``: where scans are read and predictions and bookkeeping written (:class:`ScoringPaths`);
- ``model``: which model scores (:func:`resolve_model`) and loading it once per process;
- ``due``: the listing, the scan fingerprint and the due rule (:func:`find_due_slides`);
- ``leases``: the lease objects that keep two runs off one slide (:class:`SlideLeases`);
- ``shards``: planning a slide into shards and scoring one shard into its part;
- ``infer``: fetch + decode + batched inference of a list of cells (:func:`score_cells`);
- ``output``: the prediction CSV, finalizing a slide, ``summary.csv``;
- ``report``: what a run did (:class:`ScoreReport`) and the per-slide shard tally.

When is a slide due?
    A slide (a folder under ``scans/``) is due when any of these holds:

    1. ``predictions/<slide>.csv`` is missing;
    2. there is no scoring marker for the slide made by the serving model version (a new
       champion makes every slide due again);
    3. the set of (key, ETag) of the objects under ``scans/<slide>/`` differs from the set the
       last scoring covered (a re-scan added, replaced or removed cells).

    The marker is ``state/scoring/done/<slide>/<fingerprint>@<version>.json``, written after
    the slide's CSV (pointer last). ``fingerprint`` is a SHA-256 of the sorted
    ``key<TAB>etag`` lines of the slide's objects, and it is in the marker's NAME, so finding
    the due slides costs listings only (scans/, predictions/, the markers), never a GET per
    slide. A due slide is re-scored whole: its CSV is one consistent scoring by one model.

Exactly once
    A due slide is cut into shards (a slide per shard; a slide of more than ``shard_size``
    cells into near-equal shards). Each shard writes its rows as one whole object,
    ``state/scoring/parts/<slide>/<fingerprint>@<version>/<start>-<end>.csv``; when every shard
    of the slide has its part, the parts are concatenated in key order into
    ``predictions/<slide>.csv`` (one whole PUT), then the marker is written and the parts are
    deleted. Every key is a function of (slide, cells, model, cell range), so:

    - a run killed at any point leaves only whole objects; the next run finds the slide still
      due (no marker), skips the shards whose parts exist and scores the rest: every cell ends
      up in the CSV exactly once (checked before the CSV is written);
    - a run with nothing due writes nothing (not even a lease);
    - two runs that did score the same slide would write the same keys with the same rows,
      never a duplicated row; the lease below only saves the wasted work.

Two runs at once: a lease object in the bucket
    ``state/scoring/leases/<slide>.json`` (owner token, host, pid, expiry). Chosen over a
    Prefect concurrency limit because it also guards runs on other work pools and Dask
    workers, works against any store and is testable without a server. A claim is a
    conditional write (create-if-absent, or replace-if-unchanged of a stale lease) where the
    server honours them (SeaweedFS and S3 do; probed once per endpoint), so exactly one
    claimant wins with no waiting; elsewhere it falls back to read - write - wait ``settle``
    - read back (the fallback's limit is in :mod:`malaria.scoring.leases`). After claiming,
    the slide is planned again, so a slide finished by another run meanwhile is not scored
    twice, and the lease is re-read just before the slide's CSV is written. A background
    thread renews held leases every ``ttl/3``; a lease whose expiry passed, or whose owner
    process on this host is gone (SIGKILL), is stale and may be taken over.

Per-slide summary: ``predictions/summary.csv``
    One row per scored slide (cells_scored, parasitized, parasitemia_pct, unreadable,
    mean_probability, model_version, scored_at, scan_fingerprint), rebuilt whole from the
    per-slide markers (each marker holds its slide's summary) whenever the set of
    (slide, fingerprint, version) it shows differs from the markers. One file is what a lab
    wants to open; rebuilding from the markers instead of editing the old file means two
    runs finishing together cannot lose each other's rows for good: the next run that sees a
    stale summary rewrites it. ``parasitemia_pct`` = 100 x parasitized / cells_scored
    (unreadable cells are not in the denominator: nothing is known about them).

Speed and memory
    Per shard, a pool of threads fetches objects and decodes them (one full decode that both
    validates and resizes, the same preprocessing as training), at most two batches ahead of
    the inference, which runs in large batches in the calling thread: a bounded
    producer/consumer pipeline, so memory holds two batches of images whatever the size of
    the run. A fetch thread asks the store for ``SCORE_KEYS_PER_FETCH`` (64) objects at once
    (``Store.get_many``), so the store's client can overlap them. The model is loaded once
    per process and kept in a module-level cache keyed by (registry, version). Inference is
    a ``tf.function`` around the Keras model with its batch norms folded into the
    convolutions (``malaria.model.predict.predict_probabilities``, as in evaluation),
    at the operating point the model was evaluated at (its threshold, and its test-time
    augmentation if it was evaluated with it); ONNX Runtime and XLA were measured against it
    and were slower here (see benchmarks/README.md).
"""
