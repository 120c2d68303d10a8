"""What the commands share: the local stack's options and settings."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from malaria_dev.stack import StackConfig


def stack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, help="state folder (default .malaria)")
    parser.add_argument("--s3-port", type=int)
    parser.add_argument("--prefect-port", type=int)


def stack_config(args: argparse.Namespace) -> StackConfig:
    from malaria_dev.stack import StackConfig

    cfg = StackConfig.from_env()
    overrides = {name: getattr(args, name) for name in ("state_dir", "s3_port", "prefect_port")
                 if getattr(args, name, None) is not None}
    if overrides:
        from dataclasses import replace

        cfg = replace(cfg, **overrides)
    return cfg


def use_local_stack_if_configured() -> None:
    from malaria_dev.stack import use_local_stack_if_configured

    use_local_stack_if_configured()

