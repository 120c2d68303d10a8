"""The `malaria score` command: one-off scoring in this process, without Prefect.

Kept apart from flows/score.py so that building the command line never imports Prefect
(Prefect reads its settings when imported; the local stack's settings must come first).
"""

from __future__ import annotations

import argparse

from malaria.scoring.pipeline import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_SHARD_SIZE,
    ShardResult,
    score,
)


def cmd_score(args: argparse.Namespace) -> int:
    """Score once, in this process, without Prefect (same library code as the flow)."""
    if any(str(u).startswith("s3://") for u in (args.scans, args.out, args.registry or "")):
        from malaria_dev.stack import use_local_stack_if_configured

        use_local_stack_if_configured()

    def progress(result: ShardResult) -> None:
        state = "resumed" if result.resumed else f"{result.cells_per_s:.0f} cells/s"
        print(f"  shard {result.name}: {result.cells} cells ({state})", flush=True)

    report = score(args.scans, args.out, model_path=args.model, registry_url=args.registry,
                   threshold=args.threshold, tta=args.tta, shard_size=args.shard_size,
                   batch_size=args.batch_size, concurrency=args.concurrency,
                   on_shard=progress)
    print(report.line())
    for summary in report.slides:
        print(f"  slide {summary.slide}: {summary.cells_scored} cells, parasitemia "
              f"{summary.parasitemia_pct}%, {summary.unreadable} unreadable")
    print(f"CSVs in {args.out} (summary.csv: one row per slide)")
    return 0


def add_score_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``malaria score --scans URL_OR_DIR --out URL_OR_DIR [--model FILE]``."""
    parser = subparsers.add_parser(
        "score", help="score slide scans once: a CSV per slide and summary.csv",
        description="Score every due slide under --scans (<slide>/<file>) into --out "
        "(<slide>.csv, summary.csv). Re-running scores only new or changed slides.")
    parser.add_argument("--scans", required=True,
                        help="s3://bucket/prefix or a folder holding <slide>/<cell image>")
    parser.add_argument("--out", required=True, help="s3://bucket/prefix or a folder")
    parser.add_argument("--model", help="a .keras model file (default: the registry's "
                        "champion)")
    parser.add_argument("--registry", help="where models/ live when --model is not given "
                        "(default $MALARIA_DATA_URL or the local stack)")
    parser.add_argument("--threshold", type=float,
                        help="decision threshold (default: the champion's, or 0.5)")
    parser.add_argument("--tta", type=int, help="views averaged per cell, 1-8 (default: as "
                        "the model was evaluated)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="concurrent object fetches per shard")
    parser.set_defaults(func=cmd_score)
