"""What the commands share: the local stack's options and settings.

One mechanism: ``main`` calls ``apply_stack_options`` right after parsing, which puts
``--state-dir``, ``--s3-port`` and ``--prefect-port`` into the environment
(MALARIA_STATE_DIR, MALARIA_S3_PORT, MALARIA_PREFECT_PORT) before anything reads settings.
Every later reader (``StackConfig.from_env``, the settings module, Prefect workers and flow
runs started from here) then sees the same stack.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from malaria_dev.stack import StackConfig

# Option destination -> the variable it sets.
STACK_OPTION_VARIABLES = {
    "state_dir": "MALARIA_STATE_DIR",
    "s3_port": "MALARIA_S3_PORT",
    "prefect_port": "MALARIA_PREFECT_PORT",
}


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"a port is between 1 and 65535, not {port}")
    return port


def stack_options(parser: argparse.ArgumentParser) -> None:
    """--state-dir, --s3-port, --prefect-port: which local stack a command uses (the other
    ports: MALARIA_*_PORT variables). Adding them twice to one parser is a no-op."""
    try:
        parser.add_argument("--state-dir", type=Path,
                            help="the local stack's state folder (default $MALARIA_STATE_DIR "
                                 "or .malaria)")
    except argparse.ArgumentError:  # the command's own module already added them
        return
    parser.add_argument("--s3-port", type=port_number,
                        help="the local stack's S3 port (default $MALARIA_S3_PORT, the port "
                             "the state folder's stack was started with, or 8333)")
    parser.add_argument("--prefect-port", type=port_number,
                        help="the local Prefect server's port (default $MALARIA_PREFECT_PORT, "
                             "the recorded one, or 4200)")


def apply_stack_options(args: argparse.Namespace) -> None:
    """Put the stack options given on the command line into os.environ (see the module
    docstring). The state folder goes in as an absolute path: workers run elsewhere."""
    for dest, variable in STACK_OPTION_VARIABLES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "state_dir":
            value = Path(value).expanduser().resolve()
        os.environ[variable] = str(value)


def stack_config(args: argparse.Namespace | None = None) -> StackConfig:
    """The local stack the command line and environment name (``args``: applied first, for
    a caller that did not come through ``main``)."""
    from malaria_dev.stack import StackConfig

    if args is not None:
        apply_stack_options(args)
    return StackConfig.from_env()


def use_local_stack_if_configured() -> None:
    from malaria_dev.stack import use_local_stack_if_configured

    use_local_stack_if_configured()
