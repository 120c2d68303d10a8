"""The `malaria` command, on a local-folder bucket (no servers but the Prefect harness)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from malaria_cli.main import main


def test_synthetic_upload_ingest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 prefect_harness: None) -> None:
    monkeypatch.setenv("MALARIA_STATE_DIR", str(tmp_path / "no-stack"))
    cells, bucket = tmp_path / "cells", tmp_path / "bucket"
    assert main(["data", "synthetic", "--to", str(cells), "--n", "24", "--slides", "3"]) == 0
    assert len(list(cells.glob("*/*.png"))) == 24
    assert main(["data", "upload", str(cells), "--to", bucket.as_uri()]) == 0
    assert len(list((bucket / "incoming").glob("*/*.png"))) == 24
    # Not capsys: a flow run inside capsys leaves log handlers on a stream closed afterwards.
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["ingest", "--data-url", bucket.as_uri()]) == 0
    out = stdout.getvalue()
    assert '"accepted": 24' in out and '"balanced": true' in out
    assert len(list((bucket / "dataset").glob("*/*/*.png"))) == 24


def test_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "upload", str(tmp_path / "missing"), "--to", tmp_path.as_uri()]) == 1
    err = capsys.readouterr().err
    assert err.startswith("malaria: error:") and "Traceback" not in err


def test_building_the_command_line_does_not_import_prefect() -> None:
    # Prefect reads its settings (API URL) when imported; `malaria demo` must start the stack
    # and load its settings first, or the flows would run on a throwaway server.
    import subprocess
    import sys

    code = ("import sys; from malaria_cli.main import build_parser; build_parser(); "
            "assert 'prefect' not in sys.modules, 'prefect imported too early'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
