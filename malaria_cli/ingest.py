"""`malaria ingest`: run the ingest flow once."""

from __future__ import annotations

import argparse
import json

from malaria.core.defaults import INGEST_CHUNK_SIZE, INGEST_CONCURRENCY
from malaria_cli.common import use_local_stack_if_configured


def cmd_ingest(args: argparse.Namespace) -> int:
    use_local_stack_if_configured()
    from flows.ingest import ingest_flow

    result = ingest_flow(data_url=args.data_url, chunk_size=args.chunk_size,
                         concurrency=args.concurrency)
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["balanced"] else 1


def add_ingest_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ingest = sub.add_parser("ingest", help="run the ingest flow once")
    ingest.add_argument("--data-url")
    ingest.add_argument("--chunk-size", type=int, default=INGEST_CHUNK_SIZE)
    ingest.add_argument("--concurrency", type=int, default=INGEST_CONCURRENCY)
    ingest.set_defaults(func=cmd_ingest)
