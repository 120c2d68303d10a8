"""Speed and accuracy measurements with their baselines (see benchmarks/README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Present while a speed benchmark runs; the accuracy benchmark's training waits for it to go.
BENCH_LOCK = Path("/tmp/malaria-bench.lock")


def emit(result: dict[str, Any], path: Path | None) -> None:
    """Print the result as JSON and, when asked, write it to ``path``."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
