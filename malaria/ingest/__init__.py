"""Ingest: validate labelled uploads under ``incoming/``, de-duplicate them by content and sort
them into ``dataset/<class>/<slide>/<file>``; everything else goes to ``quarantine/<reason>/``.

The steps live here, without Prefect; the one orchestrator is the ingest flow
(flows/ingest.py), which ``malaria ingest``, the nightly flow and ``benchmarks.ingest`` run.
The rooms: ``manifest`` (the outcome of each object, the run's manifest and counts), ``ledger``
(what earlier runs ingested, and the labels files), ``chunk`` (cutting the listing into
chunks, and validating, de-duplicating and committing one chunk) and ``lock`` (the single
writer lock in the bucket).

How a run works, and why:
- The listing is streamed and cut into chunks (``chunk_size`` objects or ``chunk_bytes``,
  whichever comes first), so memory holds one chunk of images, however large the bucket.
- Chunks are committed one after another (each one concurrent inside): de-duplication
  decisions then depend only on the key order, so a run is deterministic.
- What has been ingested is recorded in a ledger in the bucket (``state/ingest/``), one small
  CSV per committed chunk, written after the chunk's objects (pointer last). A re-run loads
  it and reports every object whose (key, ETag) it holds as ``already_ingested`` without
  downloading it. A run killed half-way re-does at most its last chunk, and rewriting the
  same objects under the same keys changes nothing.
- One run writes at a time, whoever started it: a run holds the ingest lock in the bucket
  (``lock``) from before it loads the ledger until its last write, and checks it still
  holds it before each chunk writes. A second run waits for it (bounded), then stops having
  written nothing.
- A chunk changes the shared ledger only after its ledger part is written, so a
  retried chunk (a Prefect retry after an error or a timeout) decides exactly as its first
  attempt did.
- A name that cannot become a key (an incoming key with an empty, ``.`` or ``..`` segment;
  a slide with a path separator or that is ``.``/``..``) sends that one object to
  quarantine (``unsafe_key``, ``unsafe_slide``) before anything is written; the rest of the
  chunk and the run go on.
- Memory for the ledger is a few dozen bytes per object ever ingested (two 64-bit digests per
  row in dicts); the images themselves are never held beyond one chunk.

Invariant of every run: listed = accepted + duplicate + quarantined + already_ingested.
"""
