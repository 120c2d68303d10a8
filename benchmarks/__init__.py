"""Speed and accuracy measurements with their baselines (see benchmarks/README.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Present while a speed benchmark runs; the accuracy benchmark's training waits for it to go.
BENCH_LOCK = Path("/tmp/malaria-bench.lock")

# How the flow benchmarks reach a Prefect API (recorded in their JSON).
PREFECT_API = ("prefect_test_harness: a throwaway Prefect server (SQLite) in a subprocess on "
               "127.0.0.1, started before the timed region; the flow functions run "
               "in-process against it, as a worker runs them")


def emit(result: dict[str, Any], path: Path | None) -> None:
    """Print the result as JSON and, when asked, write it to ``path``."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


@contextmanager
def prefect_api() -> Iterator[str]:
    """A Prefect API for the flows a benchmark times (see :data:`PREFECT_API`); yields its
    URL, which child processes get as ``PREFECT_API_URL``."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())
