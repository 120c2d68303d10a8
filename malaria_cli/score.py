"""The `malaria score` command: runs the score flow once (flows/score.py), on folders or URLs.

Prefect is imported inside the command, never while the command line is built: Prefect reads
its settings when imported, and the local stack's settings must come first. Without
``PREFECT_API_URL`` the flow runs against Prefect's ephemeral local API.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from malaria.core import layout
from malaria.core.defaults import SCORE_BATCH_SIZE, SCORE_CONCURRENCY, SCORE_SHARD_SIZE


def cmd_score(args: argparse.Namespace) -> int:
    """Score once through the score flow (the same code the bulk-scoring deployment runs)."""
    if (args.scans is None) != (args.out is None):
        raise SystemExit("malaria score: give both --scans and --out, or neither (the "
                         "bucket's scans/ -> predictions/)")
    if args.force and not args.slide:
        raise SystemExit("malaria score: --force re-scores the slides named with --slide")
    bucket = args.scans is None
    if bucket or any(str(u).startswith("s3://")
                     for u in (args.scans, args.out, args.registry or "")):
        from malaria_cli.common import use_local_stack_if_configured

        use_local_stack_if_configured()
    # Before Prefect is imported: the domain's malaria.* warnings reach the run's log too.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "malaria")
    from flows.score import score_flow

    model = str(Path(args.model).expanduser().resolve()) if args.model else None
    result = score_flow(scans_url=None if bucket else str(args.scans),
                        out_url=None if bucket else str(args.out), model_path=model,
                        registry_url=args.registry, threshold=args.threshold, tta=args.tta,
                        shard_size=args.shard_size, batch_size=args.batch_size,
                        concurrency=args.concurrency, slides=args.slide, force=args.force)
    print(result["line"])
    for summary in sorted(result["summary"], key=lambda row: row["slide"]):
        print(f"  slide {summary['slide']}: {summary['cells_scored']} cells, parasitemia "
              f"{summary['parasitemia_pct']}%, {summary['unreadable']} unreadable")
    print(f"CSVs in {args.out or layout.PREDICTIONS} (summary.csv: one row per slide)")
    return 0


def add_score_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``malaria score [--scans URL_OR_DIR --out URL_OR_DIR] [--slide S]... [--force]
    [--model FILE]``."""
    parser = subparsers.add_parser(
        "score", help="score slide scans once: a CSV per slide and summary.csv",
        description="Score every due slide under --scans (<slide>/<file>) into --out "
        "(<slide>.csv, summary.csv) by running the score flow; without them, the bucket's "
        "scans/ into predictions/. Re-running scores only new or changed slides; --slide "
        "limits the run to named slides and --force re-scores them even when up to date.")
    parser.add_argument("--scans", help="s3://bucket/prefix or a folder holding "
                        "<slide>/<cell image> (default: scans/ of $MALARIA_DATA_URL or the "
                        "local stack)")
    parser.add_argument("--out", help="s3://bucket/prefix or a folder (default: "
                        "predictions/ of the same bucket)")
    parser.add_argument("--slide", action="append", metavar="SLIDE",
                        help="only this slide (repeat for more)")
    parser.add_argument("--force", action="store_true",
                        help="re-score the --slide slides even when they are up to date "
                        "(the CSV replaced is kept in the history when another model or "
                        "scan made it)")
    parser.add_argument("--model", help="a .keras model file (default: the registry's "
                        "champion)")
    parser.add_argument("--registry", help="where models/ live when --model is not given "
                        "(default $MALARIA_DATA_URL or the local stack)")
    parser.add_argument("--threshold", type=float,
                        help="decision threshold (default: the champion's, or 0.5)")
    parser.add_argument("--tta", type=int, help="views averaged per cell, 1-8 (default: as "
                        "the model was evaluated)")
    parser.add_argument("--shard-size", type=int, default=SCORE_SHARD_SIZE)
    parser.add_argument("--batch-size", type=int, default=SCORE_BATCH_SIZE)
    parser.add_argument("--concurrency", type=int, default=SCORE_CONCURRENCY,
                        help="concurrent object fetches per shard")
    parser.set_defaults(func=cmd_score)
