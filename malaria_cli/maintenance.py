"""`malaria prune [--dry-run]`: apply the retention policy (malaria.registry.retention) to
the bucket and the local caches."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from malaria.core import settings
from malaria_cli.common import stack_options, use_local_stack_if_configured


def cmd_prune(args: argparse.Namespace) -> int:
    use_local_stack_if_configured()
    from malaria.io.store import open_store
    from malaria.registry import retention
    from malaria.registry.registry import ModelRegistry

    policy = retention.RetentionPolicy(**{f.name: getattr(args, f.name)
                                          for f in fields(retention.RetentionPolicy)})
    store = open_store(settings.data_url(args.data_url))
    verb = "would delete" if args.dry_run else "deleted"
    pruning = retention.plan_bucket(store, policy)
    for kind, counts in pruning.summary().items():
        print(f"{kind:12s} keep {counts['keep']:4d}, {verb} {counts['delete']:4d} "
              f"({counts['bytes_freed'] / 1e6:.1f} MB)")
    for group, reason in pruning.keep:
        if reason != f"among the newest {policy.keep(group.kind)}":
            print(f"  kept {group.name}: {reason}")
    if not args.dry_run:
        retention.apply(store, pruning)
    merged = retention.compact_ledger(store, policy, dry_run=args.dry_run)
    print(f"ledger       {'would merge' if args.dry_run else 'merged'} {merged} parts"
          if merged else f"ledger       at most {policy.max_ledger_parts} parts: left as is")
    if not args.no_cache:
        champion = ModelRegistry(store).champion_version()
        cache = retention.plan_cache(Path(settings.cache_dir()), policy,
                                     keep_versions=[champion] if champion else [])
        print(f"local cache  {verb} {len(cache.delete)} entries "
              f"({cache.bytes_freed / 1e6:.1f} MB) under {settings.cache_dir()}")
        if not args.dry_run:
            retention.apply_cache(cache)
    return 0


def add_maintenance_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from malaria.registry.retention import RetentionPolicy

    prune = sub.add_parser("prune", help="delete old checkpoints, reports, alerts and cache "
                                         "entries; compact the ingest ledger")
    prune.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")
    prune.add_argument("--data-url")
    prune.add_argument("--no-cache", action="store_true", help="leave the local caches alone")
    defaults = RetentionPolicy()
    for f in fields(RetentionPolicy):
        prune.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name,
                           type=type(getattr(defaults, f.name)),
                           default=getattr(defaults, f.name))
    stack_options(prune)
    prune.set_defaults(func=cmd_prune)
