"""``malaria``: one command for everything a user does by hand.

It lives in flows/ because it is wiring: it starts servers from malaria.stack and runs the
flows. Prefect is imported only inside the commands that need it, after the local stack's
settings are in the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from malaria import config


def _stack_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from malaria.stack import StackConfig

    cfg = StackConfig.from_env()
    overrides = {name: getattr(args, name) for name in ("state_dir", "s3_port", "prefect_port")
                 if getattr(args, name, None) is not None}
    if overrides:
        from dataclasses import replace

        cfg = replace(cfg, **overrides)
    return cfg


def _use_local_stack_if_configured() -> None:
    from malaria.stack import use_local_stack_if_configured

    use_local_stack_if_configured()


def _print_status(status) -> None:  # type: ignore[no-untyped-def]
    for service in (status.s3, status.prefect):
        state = "healthy" if service.healthy else ("running" if service.alive else "stopped")
        print(f"{service.name:8s} {state:8s} pid={service.pid or '-':<8} {service.url}")
    print(f"S3 endpoint:   {status.s3_endpoint}  (bucket s3://{status.bucket})")
    print(f"Prefect API:   {status.prefect_api_url}")
    print(f"Prefect UI:    {status.ui_url}")


def cmd_stack(args: argparse.Namespace) -> int:
    from malaria.stack import stack_down, stack_status, stack_up

    cfg = _stack_config(args)
    if args.action == "up":
        _print_status(stack_up(cfg))
    elif args.action == "down":
        stack_down(cfg)
        print("stack stopped")
    else:
        status = stack_status(cfg)
        _print_status(status)
        return 0 if status.s3.healthy and status.prefect.healthy else 3
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from malaria import datasets

    if args.action == "download":
        url = args.url or os.environ.get("MALARIA_NIH_URL") or datasets.NIH_CELL_IMAGES_URL
        result = datasets.download_nih_dataset(Path(args.to), url=url, sha256=args.sha256)
        print(f"{result.path}: {dict(result.counts)} ({result.skipped} skipped)")
    elif args.action == "upload":
        _use_local_stack_if_configured()
        to = args.to or config.data_url()
        result = datasets.upload_tree(Path(args.source), to, concurrency=args.concurrency)
        print(f"uploaded {result.uploaded} files ({result.bytes / 1e6:.1f} MB) to {to} "
              f"in {result.seconds:.1f} s; skipped {result.skipped}")
    elif args.action == "synthetic":
        from malaria.synthetic import write_labelled_tree

        paths = write_labelled_tree(Path(args.to), args.n, slides=args.slides, seed=args.seed)
        print(f"wrote {len(paths)} synthetic cells under {args.to}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    _use_local_stack_if_configured()
    from flows.ingest import ingest_flow

    result = ingest_flow(data_url=args.data_url, chunk_size=args.chunk_size,
                         concurrency=args.concurrency)
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["balanced"] else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    """Work pools, deployments, the failure automation and a worker per pool."""
    from malaria.stack import stack_status

    _use_local_stack_if_configured()
    from deployments.local import deploy_local

    cfg = _stack_config(args)
    result = deploy_local(cfg, start_workers=not args.no_workers)
    print(f"work pools:  {', '.join(result['pools'])}")  # type: ignore[arg-type]
    print(f"deployments: {', '.join(result['deployments'])}")  # type: ignore[arg-type]
    print(f"nightly time zone (variable malaria_timezone): {result['timezone']}")
    print(f"failure automation: {result['automation']}")
    for pool, pid in result["workers"].items():  # type: ignore[attr-defined]
        print(f"worker for {pool}: pid {pid} (log {cfg.log_file(f'worker-{pool}')})")
    print(f"UI: {stack_status(cfg).ui_url}/deployments")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole story on one machine, through the Prefect server and its workers."""
    import time

    from malaria.registry import ModelRegistry
    from malaria.stack import stack_up
    from malaria.storage import get_csv, open_store

    started = time.monotonic()
    cfg = _stack_config(args)
    print("starting the local stack (SeaweedFS S3 + Prefect server)...", flush=True)
    status = stack_up(cfg)
    _use_local_stack_if_configured()
    data_url = config.data_url()

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
    print(f"Prefect UI:   {status.ui_url}  (runs, subflows, logs, artifacts, deployments)")
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
    csvs = sorted(i.key for i in store.list("predictions/"))
    print(f"Predictions:  {', '.join(store.uri(k) for k in csvs) or 'none'}")
    if any(k.endswith("summary.csv") for k in csvs):
        summary = get_csv(store, "predictions/summary.csv")
        for row in summary.to_dict("records"):
            parasitemia = row["parasitemia_pct"]
            shown = f"{float(parasitemia):.1f}%" if parasitemia not in ("", None) else "n/a"
            print(f"  slide {row['slide']}: {row['cells_scored']} cells, parasitemia {shown}")
    print(f"Took {time.monotonic() - started:.0f} s. The stack and workers keep running for "
          "browsing; `make down` stops them.")
    return 0 if nightly[1] == "COMPLETED" and scoring[1] == "COMPLETED" else 1


def _retrain_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from malaria.retraining import RetrainConfig

    return RetrainConfig(arch=args.arch, input_size=args.input_size, epochs=args.epochs,
                         max_minutes=args.minutes, seed=args.seed, batch_size=args.batch_size,
                         tta=not args.no_tta)


def cmd_train(args: argparse.Namespace) -> int:
    from malaria.retraining import model_card_path, train_local

    def progress(epoch: int, metrics: dict) -> None:  # type: ignore[type-arg]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"epoch {epoch}: {shown}", flush=True)

    out = Path(args.out)
    card = train_local(Path(args.data), out, _retrain_config(args),
                       cache_dir=Path(config.cache_dir()), on_epoch=progress)
    m = card["metrics"]
    print(f"saved {out} ({card['model_bytes'] / 1e6:.2f} MB) and {model_card_path(out)}")
    print(f"held-out slides {card['slides']['test']}: accuracy {m['accuracy']:.4f}, "
          f"AUC {m['roc_auc']:.4f}, sensitivity {m['sensitivity']:.4f}, specificity "
          f"{m['specificity']:.4f} at threshold {card['threshold']:.3f} (from validation slides)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from malaria.retraining import evaluate_local, metrics_table

    report = evaluate_local(Path(args.model), Path(args.data),
                            cache_dir=Path(config.cache_dir()), tta=args.tta)
    print(metrics_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def _champion_model_file() -> Path:
    """Download the serving model and its threshold from the bucket into the cache."""
    from malaria.registry import ModelRegistry
    from malaria.retraining import MODEL_FILE, model_card_path
    from malaria.storage import open_store

    _use_local_stack_if_configured()
    registry = ModelRegistry(open_store(config.data_url()))
    version = registry.champion_version()
    if version is None:
        raise RuntimeError("no champion model in the bucket: train one or pass --model FILE")
    path = Path(config.cache_dir()) / "models" / version / MODEL_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        registry.download_model(version, path)
    model_card_path(path).write_text(json.dumps(registry.get(version), default=str))
    return path


def cmd_predict(args: argparse.Namespace) -> int:
    from malaria.retraining import predict_files

    model = Path(args.model) if args.model else _champion_model_file()
    failed = 0
    for result in predict_files(model, [Path(p) for p in args.images]):
        if result.error:
            failed += 1
            print(f"{result.path}\terror\t{result.error}")
        else:
            print(f"{result.path}\t{result.probability:.4f}\t{result.label}")
    return 1 if failed else 0


def cmd_models(args: argparse.Namespace) -> int:
    from malaria.registry import ModelRegistry
    from malaria.storage import open_store

    _use_local_stack_if_configured()
    registry = ModelRegistry(open_store(args.data_url or config.data_url()))
    if args.action == "list":
        for record in registry.list_versions():
            m = record.get("metrics", {})
            mark = "*" if record.get("champion") else " "
            print(f"{mark} {record['version']}  {record.get('architecture', '?'):14s} "
                  f"acc {m.get('accuracy', float('nan')):.4f}  "
                  f"auc {m.get('roc_auc', float('nan')):.4f}")
    elif args.action == "show":
        version = args.version or registry.champion_version()
        if version is None:
            raise RuntimeError("no version given and no champion")
        print(json.dumps({"record": registry.get(version),
                          "gate": registry.get_decision(version)}, indent=2, default=str))
    elif args.action == "promote":
        if not args.version:
            raise RuntimeError("promote needs a VERSION")
        registry.promote(args.version, reason=f"promoted by hand: {args.reason}")
        print(f"champion is now {args.version}")
    else:
        print(f"champion is now {registry.rollback(reason=args.reason)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="malaria", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def stack_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", type=Path, help="state folder (default .malaria)")
        p.add_argument("--s3-port", type=int)
        p.add_argument("--prefect-port", type=int)

    stack = sub.add_parser("stack", help="local SeaweedFS S3 + Prefect server")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack_options(stack)
    stack.set_defaults(func=cmd_stack)

    data = sub.add_parser("data", help="get images onto disk and into the bucket")
    data_sub = data.add_subparsers(dest="action", required=True)
    download = data_sub.add_parser("download", help="fetch and unpack NIH cell_images.zip")
    download.add_argument("--to", required=True)
    download.add_argument("--url", help="archive URL (default: NIH, or $MALARIA_NIH_URL)")
    download.add_argument("--sha256", help="expected SHA-256 of the archive")
    upload = data_sub.add_parser("upload", help="put a class-folder tree into incoming/")
    upload.add_argument("source")
    upload.add_argument("--to", help="s3://bucket[/prefix] or file:///dir "
                        "(default $MALARIA_DATA_URL or the local stack)")
    upload.add_argument("--concurrency", type=int, default=16)
    synthetic = data_sub.add_parser("synthetic", help="write synthetic labelled cells")
    synthetic.add_argument("--to", required=True)
    synthetic.add_argument("--n", type=int, default=400)
    synthetic.add_argument("--slides", type=int, default=8)
    synthetic.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=cmd_data)

    ingest = sub.add_parser("ingest", help="run the ingest flow once")
    ingest.add_argument("--data-url")
    ingest.add_argument("--chunk-size", type=int, default=500)
    ingest.add_argument("--concurrency", type=int, default=16)
    ingest.set_defaults(func=cmd_ingest)

    def training_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--arch", default="cellnet",
                       help="cellnet (default), seed-augmented, seed-baseline, ...")
        p.add_argument("--input-size", type=int)
        p.add_argument("--epochs", type=int, default=30)
        p.add_argument("--minutes", type=float, help="training time budget")
        p.add_argument("--batch-size", type=int, default=128)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-tta", action="store_true", help="no test-time augmentation")

    train = sub.add_parser("train", help="train on a local folder with class subfolders")
    train.add_argument("--data", required=True)
    train.add_argument("--out", required=True, help="model file, e.g. model.keras")
    training_options(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="metrics of a model file on a labelled folder")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--json", help="write the metrics here")
    evaluate.add_argument("--tta", action="store_true", help="test-time augmentation")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="probability and class for each image")
    predict.add_argument("images", nargs="+")
    predict.add_argument("--model", help="model file (default: the champion in the bucket)")
    predict.set_defaults(func=cmd_predict)

    models = sub.add_parser("models", help="the model registry in the bucket")
    models.add_argument("action", choices=["list", "show", "promote", "rollback"])
    models.add_argument("version", nargs="?")
    models.add_argument("--reason", default="operator decision")
    models.add_argument("--data-url")
    models.set_defaults(func=cmd_models)

    from flows.score_command import add_score_command

    add_score_command(sub)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a clear message, never a secret-bearing traceback dump
        print(f"malaria: error: {config.redact(str(error))}", file=sys.stderr)
        if os.environ.get("MALARIA_DEBUG"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
