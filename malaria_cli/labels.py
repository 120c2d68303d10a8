"""`malaria labels review | apply`: a person's look at doubtful labels, and their verdicts.

``review`` lists the cells a registered model (the champion unless --version) contradicts
most confidently; with --out it writes ``review.csv`` (key,label,reason,reviewer to fill
in) and a thumbnail per cell. ``apply FILE`` checks the file's columns and uploads it to
``labels/corrections/``; the next ingest run (nightly, or ``malaria ingest``) applies it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from malaria.core import settings
from malaria_cli.common import stack_options, use_local_stack_if_configured


def _store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from malaria.io.store import open_store

    use_local_stack_if_configured()
    return open_store(args.data_url or settings.data_url())


def cmd_review(args: argparse.Namespace) -> int:
    from malaria.ingest.review import cells_to_review, write_review
    from malaria.registry.registry import ModelRegistry

    store = _store(args)
    registry = ModelRegistry(store)
    version = args.version or registry.champion_version()
    if version is None:
        raise RuntimeError("no champion model in the bucket: name one with --version")
    cells = cells_to_review(registry.get(version), args.limit)
    if not cells:
        print(f"model {version} lists no cells to review")
        return 0
    print(f"cells model {version} contradicts most confidently (worst first):")
    print(f"{'P(parasitized)':>14}  {'labelled':11}  {'slide':8}  key")
    for cell in cells:
        shown = "?" if math.isnan(cell.probability) else f"{cell.probability:.3f}"
        print(f"{shown:>14}  {cell.label:11}  {cell.slide:8}  {cell.key}")
    if args.out:
        path = write_review(store, cells, Path(args.out))
        print(f"wrote {path} and its thumbnails: fill in label (a class or 'exclude'), "
              f"reason and reviewer, then `malaria labels apply {path}`")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from malaria.ingest.verdicts import parse_verdicts, upload_verdicts

    path = Path(args.file)
    data = path.read_bytes()
    key = upload_verdicts(_store(args), data, args.name or path.name)
    verdicts = parse_verdicts(data).verdicts
    problems = [v for v in verdicts if v.problem]
    print(f"uploaded {len(verdicts)} verdicts to {key}; the next ingest run applies them "
          "and records each in its manifest")
    for verdict in problems:  # ingest will reject these rows too: say so now
        print(f"  line {verdict.line}: will be rejected ({verdict.problem}): {verdict.detail}")
    return 0


def add_labels_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    labels = sub.add_parser("labels", help="review doubtful labels and upload verdicts")
    actions = labels.add_subparsers(dest="action", required=True)
    review = actions.add_parser("review", help="the cells a model contradicts most")
    review.add_argument("--out", type=Path, help="write review.csv and thumbnails here")
    review.add_argument("--limit", type=int, help="at most N cells")
    review.add_argument("--version", help="a registered model (default: the champion)")
    review.add_argument("--data-url")
    review.set_defaults(func=cmd_review)
    stack_options(review)  # on each action: options go after it on the command line
    apply = actions.add_parser("apply", help="upload a verdict file (key,label,reason,"
                               "reviewer) for the next ingest run")
    apply.add_argument("file", type=Path)
    apply.add_argument("--name", help="its name under labels/corrections/ (default: the "
                       "file's name)")
    apply.add_argument("--data-url")
    apply.set_defaults(func=cmd_apply)
    stack_options(apply)
