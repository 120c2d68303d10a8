"""``malaria``: one command for everything a user does by hand.

Each group of commands has its own module in this package; this one builds the parser.
Prefect is imported only inside the commands that need it, after the local stack's
settings (--state-dir and the port options included) are in the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from malaria.core import settings
from malaria_cli.common import apply_stack_options, stack_options
from malaria_cli.data import add_data_command
from malaria_cli.ingest import add_ingest_command
from malaria_cli.labels import add_labels_commands
from malaria_cli.maintenance import add_maintenance_commands
from malaria_cli.models import add_model_commands
from malaria_cli.score import add_score_command
from malaria_cli.stack import add_stack_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="malaria", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_stack_commands(sub)
    add_data_command(sub)
    add_ingest_command(sub)
    add_labels_commands(sub)
    add_model_commands(sub)
    add_score_command(sub)
    add_maintenance_commands(sub)
    # Every command that reads the bucket, the Prefect server or the state folder's cache
    # takes the stack options (stack, deploy, demo and data upload add their own).
    for name in ("ingest", "train", "evaluate", "predict", "models", "score"):
        stack_options(sub.choices[name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The project's own loggers (lease losses, decode errors) reach the Prefect UI too.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "malaria")
    args = build_parser().parse_args(argv)
    # Before anything reads settings: the flags become MALARIA_* variables, seen by this
    # process and by every process it starts.
    apply_stack_options(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a clear message, never a secret-bearing traceback dump
        print(f"malaria: error: {settings.redact(str(error))}", file=sys.stderr)
        if os.environ.get("MALARIA_DEBUG"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
