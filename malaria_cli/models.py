"""`malaria train | evaluate | predict | models`: models on files and in the registry."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from malaria.core import defaults, settings
from malaria.io.atomic import write_atomic
from malaria_cli.common import use_local_stack_if_configured


def _retrain_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from malaria.model.config import RetrainConfig

    return RetrainConfig(arch=args.arch, input_size=args.input_size, epochs=args.epochs,
                         max_minutes=args.minutes, seed=args.seed, batch_size=args.batch_size,
                         tta=not args.no_tta)


def cmd_train(args: argparse.Namespace) -> int:
    from malaria.model.local import model_card_path, train_local
    from malaria.model.precision import describe_precision

    def progress(epoch: int, metrics: dict) -> None:  # type: ignore[type-arg]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"epoch {epoch}: {shown}", flush=True)

    out = Path(args.out)
    card = train_local(Path(args.data), out, _retrain_config(args),
                       cache_dir=Path(settings.cache_dir()), on_epoch=progress)
    m = card["metrics"]
    print(describe_precision(card["training"]["precision_policy"]))
    print(f"saved {out} ({card['model_bytes'] / 1e6:.2f} MB) and {model_card_path(out)}")
    print(f"held-out slides {card['slides']['test']}: accuracy {m['accuracy']:.4f}, "
          f"AUC {m['roc_auc']:.4f}, sensitivity {m['sensitivity']:.4f}, specificity "
          f"{m['specificity']:.4f} at threshold {card['threshold']:.3f} (from validation slides)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from malaria.model.candidate import metrics_table
    from malaria.model.local import evaluate_local

    report = evaluate_local(Path(args.model), Path(args.data),
                            cache_dir=Path(settings.cache_dir()), tta=args.tta)
    print(metrics_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def _champion_model_file() -> Path:
    """The serving model, downloaded once into the cache, with its card beside it."""
    from malaria.io.store import open_store
    from malaria.model.local import model_card_path
    from malaria.model.serving import registered_model_file
    from malaria.registry.registry import ModelRegistry

    use_local_stack_if_configured()
    registry = ModelRegistry(open_store(settings.data_url()))
    version = registry.champion_version()
    if version is None:
        raise RuntimeError("no champion model in the bucket: train one or pass --model FILE")
    path = registered_model_file(registry, version)
    write_atomic(model_card_path(path), json.dumps(registry.get(version), default=str))
    return path


def cmd_predict(args: argparse.Namespace) -> int:
    from malaria.model.local import predict_files

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
    from malaria.io.store import open_store
    from malaria.registry.registry import ModelRegistry

    use_local_stack_if_configured()
    registry = ModelRegistry(open_store(args.data_url or settings.data_url()))
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
    else:
        # promote and rollback change champion.json by compare-and-swap, as the train flow
        # does: a concurrent promotion is redone on top of ours, never lost. A server without
        # conditional writes leaves a window: say so rather than race silently.
        if not registry.champion_writes_are_atomic():
            print("warning: this storage server ignores conditional writes; make sure no "
                  "training run is promoting a model right now", file=sys.stderr)
        if args.action == "promote":
            if not args.version:
                raise RuntimeError("promote needs a VERSION")
            registry.promote(args.version, reason=f"promoted by hand: {args.reason}")
            print(f"champion is now {args.version}")
        else:
            print(f"champion is now {registry.rollback(reason=args.reason)}")
    return 0


def add_model_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def training_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--arch", default=defaults.DEFAULT_ARCH,
                       help=f"{defaults.DEFAULT_ARCH} (default), seed-augmented, "
                       "seed-baseline, ...")
        p.add_argument("--input-size", type=int)
        p.add_argument("--epochs", type=int, default=defaults.TRAIN_EPOCHS)
        p.add_argument("--minutes", type=float, default=defaults.TRAIN_MAX_MINUTES,
                       help="training time budget")
        p.add_argument("--batch-size", type=int, default=defaults.TRAIN_BATCH_SIZE)
        p.add_argument("--seed", type=int, default=defaults.TRAIN_SEED)
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
