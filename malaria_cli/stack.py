"""`malaria stack | deploy | demo`: the local stack, the deployments, the whole story."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from malaria.core import layout, settings
from malaria_cli.common import stack_config, stack_options, use_local_stack_if_configured


def _print_status(status) -> None:  # type: ignore[no-untyped-def]
    for service in (status.s3, status.prefect):
        state = "healthy" if service.healthy else ("running" if service.alive else "stopped")
        print(f"{service.name:8s} {state:8s} pid={service.pid or '-':<8} {service.url}")
    print(f"S3 endpoint:   {status.s3_endpoint}  (bucket s3://{status.bucket})")
    print(f"Prefect API:   {status.prefect_api_url}")
    print(f"Prefect UI:    {status.ui_url}")


def cmd_stack(args: argparse.Namespace) -> int:
    from malaria_dev.stack import stack_down, stack_status, stack_up

    cfg = stack_config()
    if args.action == "up":
        _print_status(stack_up(cfg))
        print(f"UI login:      the PREFECT_API_AUTH_STRING in {cfg.env_file}")
    elif args.action == "down":
        stack_down(cfg)
        print("stack stopped")
    else:
        status = stack_status(cfg)
        _print_status(status)
        return 0 if status.s3.healthy and status.prefect.healthy else 3
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """Work pools, deployments, the failure and notification automations, a worker per
    pool."""
    from malaria_dev.stack import stack_status

    cfg = stack_config()
    # The stack's Prefect API URL and S3 settings, before Prefect is imported (none: the
    # environment names the server).
    use_local_stack_if_configured()
    from deployments.local import deploy_local

    result = deploy_local(cfg, start_workers=not args.no_workers)
    print(f"work pools:  {', '.join(result['pools'])}")  # type: ignore[arg-type]
    print(f"deployments: {', '.join(result['deployments'])}")  # type: ignore[arg-type]
    print(f"nightly time zone (variable malaria_timezone): {result['timezone']}")
    print(f"failure automation: {result['automation']}")
    # Names only: the webhook URL lives in the block and is never printed.
    notifications = result["notifications"]
    print("webhook notifications (server-side automations): "
          + (", ".join(notifications) if notifications  # type: ignore[arg-type]
             else "none (set MALARIA_ALERT_WEBHOOK_URL and deploy again)"))
    print("bulk-scoring triggers (automations): "
          f"{', '.join(result['scoring_triggers']) or 'none'}")  # type: ignore[arg-type]
    for pool, pid in result["workers"].items():  # type: ignore[attr-defined]
        print(f"worker for {pool}: pid {pid} (log {cfg.log_file(f'worker-{pool}')})")
    print(f"UI: {stack_status(cfg).ui_url}/deployments")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole story on one machine, through the Prefect server and its workers."""

    from malaria.io.store import get_csv, open_store
    from malaria.registry.registry import ModelRegistry
    from malaria_dev.stack import load_stack_env, stack_up

    started = time.monotonic()
    cfg = stack_config()
    print("starting the local stack (SeaweedFS S3 + Prefect server)...", flush=True)
    status = stack_up(cfg)
    load_stack_env(cfg)
    data_url = settings.data_url()

    from deployments.local import deploy_local, run_and_wait, upload_demo_data

    uploaded = upload_demo_data(
        data_url, labelled=args.n, slides=args.slides, seed=args.seed,
        real_data=Path(args.data) if args.data else None,
        scan_slides={301: 0.02, 302: 0.10, 303: 0.30}, cells_per_scan=args.scan_cells)
    print(f"uploaded {uploaded['labelled']} labelled cells and {uploaded['bad']} bad files to "
          f"incoming/, {uploaded['scan_cells']} new scan cells on {uploaded['scan_slides']} "
          f"slides to scans/", flush=True)
    deployed = deploy_local(cfg)
    print(f"deployed {', '.join(deployed['deployments'])}; workers for "  # type: ignore[arg-type]
          f"{', '.join(deployed['pools'])}", flush=True)  # type: ignore[arg-type]

    print("running nightly-retrain through the server (ingest -> train -> gate -> report)...",
          flush=True)
    # A few hundred synthetic cells: smaller batches give the short run enough steps.
    nightly = run_and_wait("nightly/nightly-retrain",
                           {"epochs": args.epochs, "max_minutes": args.minutes,
                            "batch_size": 32})
    print(f"  {nightly[0]}: {nightly[1]} {nightly[2]}", flush=True)
    print("running bulk-scoring through the server...", flush=True)
    scoring = run_and_wait("score/bulk-scoring")
    print(f"  {scoring[0]}: {scoring[1]} {scoring[2]}", flush=True)

    store = open_store(data_url)
    registry = ModelRegistry(store)
    champion = registry.champion_version()
    print()
    print(f"Prefect UI:   {status.ui_url}  (runs, subflows, logs, artifacts, deployments; "
          f"log in with the PREFECT_API_AUTH_STRING in {cfg.env_file})")
    print(f"Bucket:       {data_url} at {status.s3_endpoint}")
    if champion:
        m = registry.get(champion)["metrics"]
        print(f"Champion:     {champion}: accuracy {m['accuracy']:.4f}, AUC {m['roc_auc']:.4f}, "
              f"sensitivity {m['sensitivity']:.4f}, specificity {m['specificity']:.4f} "
              "on held-out slides")
    versions = registry.versions()
    latest = versions[-1] if versions else None
    decision = registry.get_decision(latest) if latest else None
    if decision:
        print(f"Gate ({latest}): {decision.get('reason')}")
    csvs = sorted(i.key for i in store.list(layout.PREDICTIONS))
    print(f"Predictions:  {', '.join(store.uri(k) for k in csvs) or 'none'}")
    if layout.PREDICTION_SUMMARY_KEY in csvs:
        summary = get_csv(store, layout.PREDICTION_SUMMARY_KEY)
        for row in summary.to_dict("records"):
            parasitemia = row["parasitemia_pct"]
            shown = f"{float(parasitemia):.1f}%" if parasitemia not in ("", None) else "n/a"
            print(f"  slide {row['slide']}: {row['cells_scored']} cells, parasitemia {shown}")
    print(f"Took {time.monotonic() - started:.0f} s. The stack and workers keep running for "
          f"browsing; `malaria stack down --state-dir {cfg.state_dir}` stops them.")
    return 0 if nightly[1] == "COMPLETED" and scoring[1] == "COMPLETED" else 1



def add_stack_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stack = sub.add_parser("stack", help="local SeaweedFS S3 + Prefect server")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack_options(stack)
    stack.set_defaults(func=cmd_stack)

    deploy = sub.add_parser("deploy", help="work pools, deployments, automation, workers")
    deploy.add_argument("--no-workers", action="store_true")
    stack_options(deploy)
    deploy.set_defaults(func=cmd_deploy)

    demo = sub.add_parser("demo", help="the whole story on the local stack")
    demo.add_argument("--n", type=int, default=400, help="synthetic labelled cells")
    demo.add_argument("--slides", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--data", default=os.environ.get("DATA") or None,
                      help="a class-folder tree of real images instead of synthetic ones")
    demo.add_argument("--epochs", type=int, default=12)
    demo.add_argument("--minutes", type=float, default=3.0, help="training time budget")
    demo.add_argument("--scan-cells", type=int, default=150, help="cells per new scan")
    stack_options(demo)
    demo.set_defaults(func=cmd_demo)
