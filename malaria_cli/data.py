"""`malaria data`: images onto disk and into the bucket."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from malaria.core import layout, settings
from malaria_cli.common import stack_options, use_local_stack_if_configured


def announce_upload(to: str, prefix: str, files: int, slides: list[str]) -> None:
    """Tell Prefect what landed (new scans start ``bulk-scoring`` through an automation;
    deployments/prefect.yaml), when a Prefect API is configured. The upload is done
    already: a problem here is a warning, never a failed command."""
    if files == 0:
        return
    try:
        from tasks.events import (
            api_configured,
            emit_cells_uploaded,
            emit_scans_uploaded,
            flush_events,
        )

        if not api_configured():
            return
        if prefix == layout.SCANS:
            emit_scans_uploaded(to, files, prefix, slides)
        else:
            emit_cells_uploaded(to, files, prefix)
        flush_events()
    except Exception as error:
        print(f"warning: could not announce the upload to Prefect: "
              f"{settings.redact(str(error))}")


def cmd_data(args: argparse.Namespace) -> int:
    from malaria_dev import datasets

    if args.action == "download":
        url = args.url or os.environ.get("MALARIA_NIH_URL") or datasets.NIH_CELL_IMAGES_URL
        result = datasets.download_nih_dataset(Path(args.to), url=url, sha256=args.sha256)
        print(f"{result.path}: {dict(result.counts)} ({result.skipped} skipped)")
    elif args.action == "upload":
        use_local_stack_if_configured()
        to = args.to or settings.data_url()
        source = Path(args.source)
        prefix = layout.SCANS if args.scans else layout.INCOMING
        result = datasets.upload_tree(source, to, prefix=prefix,
                                      concurrency=args.concurrency)
        print(f"uploaded {result.uploaded} files ({result.bytes / 1e6:.1f} MB) to {to} "
              f"{prefix} in {result.seconds:.1f} s; skipped {result.skipped}")
        slides = sorted(p.name for p in source.iterdir()
                        if p.is_dir() and not p.name.startswith(".")) if args.scans else []
        announce_upload(to, prefix, result.uploaded, slides)
    elif args.action == "synthetic":
        from malaria_dev.synthetic import write_labelled_tree

        paths = write_labelled_tree(Path(args.to), args.n, slides=args.slides, seed=args.seed)
        print(f"wrote {len(paths)} synthetic cells under {args.to}")
    return 0


def add_data_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    data = sub.add_parser("data", help="get images onto disk and into the bucket")
    data_sub = data.add_subparsers(dest="action", required=True)
    download = data_sub.add_parser("download", help="fetch and unpack NIH cell_images.zip")
    download.add_argument("--to", required=True)
    download.add_argument("--url", help="archive URL (default: NIH, or $MALARIA_NIH_URL)")
    download.add_argument("--sha256", help="expected SHA-256 of the archive")
    upload = data_sub.add_parser(
        "upload", help="put a class-folder tree into incoming/ (or, with --scans, a "
        "slide-folder tree into scans/)")
    upload.add_argument("source")
    upload.add_argument("--scans", action="store_true",
                        help="SOURCE holds <slide>/<cell image>: new scans to score")
    upload.add_argument("--to", help="s3://bucket[/prefix] or file:///dir "
                        "(default $MALARIA_DATA_URL or the local stack)")
    upload.add_argument("--concurrency", type=int, default=16)
    stack_options(upload)
    synthetic = data_sub.add_parser("synthetic", help="write synthetic labelled cells")
    synthetic.add_argument("--to", required=True)
    synthetic.add_argument("--n", type=int, default=400)
    synthetic.add_argument("--slides", type=int, default=8)
    synthetic.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=cmd_data)
