"""The `malaria` command, on a local-folder bucket (no servers but the Prefect harness)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from malaria_cli.main import build_parser, main

# What a command learns about the stack; each test that runs one restores them afterwards.
STACK_VARIABLES = ("MALARIA_STATE_DIR", "MALARIA_S3_PORT", "MALARIA_PREFECT_PORT",
                   "MALARIA_DATA_URL", "MALARIA_CACHE_DIR", "AWS_ENDPOINT_URL",
                   "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_URL")


def _forget_stack_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in STACK_VARIABLES:
        monkeypatch.setenv(name, "")  # so that teardown restores the original value
        monkeypatch.delenv(name)


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


def test_stack_options_reach_every_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`--state-dir` and the port options, not MALARIA_STATE_DIR, decide which stack a
    command uses (the bug: `malaria demo --state-dir DIR` found no credentials)."""
    import os

    from malaria.core import settings
    from malaria_cli.common import apply_stack_options, use_local_stack_if_configured
    from malaria_dev.stack import StackConfig, s3_credentials
    from malaria_dev.stack.config import record_config
    from malaria_dev.stack.credentials import ensure_identities, write_env_file

    _forget_stack_variables(monkeypatch)
    # Free ports (gRPC ones included: a random high HTTP port + 10000 may not be a port at
    # all); nothing listens there, no servers in this test.
    cfg = StackConfig.with_free_ports(tmp_path / "state")
    ensure_identities(cfg)
    write_env_file(cfg)
    record_config(cfg)

    parser = build_parser()
    commands = [["stack", "up"], ["deploy"], ["demo"], ["ingest"], ["models", "list"],
                ["data", "upload", "src"], ["score", "--scans", "a", "--out", "b"],
                ["train", "--data", "d", "--out", "m.keras"], ["predict", "x.png"],
                ["evaluate", "--model", "m.keras", "--data", "d"]]
    for command in commands:
        args = parser.parse_args([*command, "--state-dir", "s", "--s3-port", "1234",
                                  "--prefect-port", "4321"])
        assert (args.state_dir, args.s3_port, args.prefect_port) == (Path("s"), 1234, 4321)
    with pytest.raises(SystemExit):
        parser.parse_args(["ingest", "--s3-port", "70000"])
    capsys.readouterr()

    # Only the folder given: the ports its stack was started with (no server: exit 3).
    assert main(["stack", "status", "--state-dir", str(cfg.state_dir)]) == 3
    out = capsys.readouterr().out
    assert cfg.s3_endpoint in out and cfg.prefect_api_url in out
    assert os.environ["MALARIA_STATE_DIR"] == str(cfg.state_dir)

    # The settings loading of ingest, score, models and data upload finds that stack.
    monkeypatch.delenv("MALARIA_STATE_DIR")
    apply_stack_options(parser.parse_args(["ingest", "--state-dir", str(cfg.state_dir)]))
    use_local_stack_if_configured()
    assert os.environ["AWS_ENDPOINT_URL"] == cfg.s3_endpoint
    assert os.environ["AWS_ACCESS_KEY_ID"] == s3_credentials(cfg)[0]
    assert os.environ["PREFECT_API_URL"] == cfg.prefect_api_url
    assert Path(settings.cache_dir()) == cfg.state_dir / "cache"

    # A port flag moves that port and its gRPC neighbour, and keeps the recorded others.
    apply_stack_options(parser.parse_args(["stack", "up", "--s3-port", "20000"]))
    moved = StackConfig.from_env()
    assert (moved.s3_port, moved.s3_grpc_port, moved.filer_port) == (20000, 30000,
                                                                      cfg.filer_port)
