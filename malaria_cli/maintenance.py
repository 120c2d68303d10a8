"""`malaria gc [--dry-run]` (alias `malaria prune`): apply the retention policy
(malaria.registry.retention) to the bucket, the ingest ledger and the local caches. The
weekly `gc` flow (flows/maintenance.py) runs the same ``run_gc``."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from malaria.core import defaults, settings
from malaria.registry.retention import RetentionPolicy
from malaria_cli.common import stack_options, use_local_stack_if_configured

# The shorthands set every kind at once; a per-kind option given too wins over them.
_KEEP_FIELDS = ("keep_checkpoints", "keep_reports", "keep_alerts")
_AGE_FIELDS = ("checkpoint_max_age_days", "report_max_age_days", "alert_max_age_days",
               "cache_max_age_days")


def policy_from_args(args: argparse.Namespace) -> RetentionPolicy:
    chosen: dict[str, object] = {}
    for f in fields(RetentionPolicy):
        value = getattr(args, f.name, None)
        if value is None and f.name in _KEEP_FIELDS:
            value = args.keep
        if value is None and f.name in _AGE_FIELDS:
            value = args.max_age_days
        if value is not None:
            chosen[f.name] = value
    return RetentionPolicy(**chosen)  # type: ignore[arg-type]  # argparse typed each


def cmd_gc(args: argparse.Namespace) -> int:
    use_local_stack_if_configured()
    from malaria.io.store import open_store
    from malaria.registry import retention

    policy = policy_from_args(args)
    store = open_store(settings.data_url(args.data_url))
    report = retention.run_gc(store, policy, dry_run=args.dry_run,
                              cache_dir=None if args.no_cache else Path(settings.cache_dir()),
                              lock_wait_s=args.lock_wait_s)
    if args.dry_run:
        print("dry run: nothing was changed")
    for line in report.lines():
        print(line)
    return 0


def add_maintenance_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gc = sub.add_parser(
        "gc", aliases=["prune"],
        help="delete old checkpoints, reports, alerts and cache entries (never a model's "
             "lineage or a reported result); compact the ingest ledger",
        description="A checkpoint set, a run's reports or an alert goes only when it is "
                    "beyond the newest --keep-* of its kind AND older than its --*-max-age-"
                    "days. models/, dataset/, manifests/, predictions/ and labels/ are never "
                    "touched, nor a checkpoint set any registered model was trained from.")
    gc.add_argument("--dry-run", action="store_true",
                    help="say what would go and why; change nothing")
    gc.add_argument("--data-url")
    gc.add_argument("--no-cache", action="store_true", help="leave the local caches alone")
    gc.add_argument("--keep", type=int, metavar="N",
                    help="keep the newest N checkpoint sets, report runs and alerts")
    gc.add_argument("--max-age-days", type=float, metavar="DAYS",
                    help="keep anything younger than DAYS (every kind, and cached images)")
    gc.add_argument("--lock-wait-s", type=float, default=defaults.GC_LOCK_WAIT_S,
                    help="how long to wait for a running ingest before leaving the ledger "
                         "for next time (default %(default)s)")
    policy_defaults = RetentionPolicy()
    for f in fields(RetentionPolicy):
        default = getattr(policy_defaults, f.name)
        gc.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(default),
                        default=None, help=f"default {default:g}")
    stack_options(gc)
    gc.set_defaults(func=cmd_gc)
