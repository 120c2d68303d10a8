"""`malaria train | evaluate | predict | models`: models on files and in the registry."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from malaria.core import defaults, settings
from malaria.core.views import views_of
from malaria.evaluation.threshold import rule_origin
from malaria.io.atomic import write_atomic
from malaria_cli.common import use_local_stack_if_configured

if TYPE_CHECKING:
    from malaria.model.config import RetrainConfig

# Training options: command-line name -> RetrainConfig field. Their parser default is None,
# so --from-lineage can tell the options given (they override the recorded settings) from
# those left out (the recorded setting stands).
_TRAINING_OPTIONS = {"arch": "arch", "input_size": "input_size", "epochs": "epochs",
                     "minutes": "max_minutes", "batch_size": "batch_size", "seed": "seed"}


def _given_options(args: argparse.Namespace) -> dict[str, Any]:
    given = {field: getattr(args, name) for name, field in _TRAINING_OPTIONS.items()
             if getattr(args, name) is not None}
    if args.tta is not None:
        given["tta"] = args.tta
    return given


def _retrain_config(args: argparse.Namespace) -> RetrainConfig:
    from malaria.model.config import RetrainConfig

    # The defaults are RetrainConfig's own (malaria.core.defaults), as the flow's.
    return RetrainConfig(**_given_options(args))


def cmd_train(args: argparse.Namespace) -> int:
    from malaria.model.local import model_card_path, train_local
    from malaria.model.precision import describe_precision

    def progress(epoch: int, metrics: dict) -> None:  # type: ignore[type-arg]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"epoch {epoch}: {shown}", flush=True)

    out = Path(args.out)
    if args.from_lineage:
        card = _train_from_lineage(args, out, progress)
    else:
        card = train_local(Path(args.data), out, _retrain_config(args),
                           cache_dir=Path(settings.cache_dir()), on_epoch=progress)
    m = card["metrics"]
    print(describe_precision(card["training"]["precision_policy"]))
    print(f"saved {out} ({card['model_bytes'] / 1e6:.2f} MB) and {model_card_path(out)}")
    print(f"held-out slides {card['slides']['test']}: accuracy {m['accuracy']:.4f}, "
          f"AUC {m['roc_auc']:.4f}, sensitivity {m['sensitivity']:.4f}, specificity "
          f"{m['specificity']:.4f} at threshold {card['threshold']:.3f} "
          f"({rule_origin(card.get('threshold_rule'))})")
    return 0


def _train_from_lineage(args: argparse.Namespace, out: Path,
                        progress: Any) -> dict[str, Any]:
    """Train on exactly the cells a registered version saw, with its recorded settings
    except the training options given on the command line."""
    import dataclasses

    from malaria.io.store import open_store
    from malaria.registry.lineage import recorded_config, retrain_from_lineage
    from malaria.registry.registry import ModelRegistry

    use_local_stack_if_configured()
    store = open_store(args.data_url or settings.data_url())
    version = args.from_lineage
    config = dataclasses.replace(recorded_config(ModelRegistry(store).get(version)),
                                 **_given_options(args))
    card = retrain_from_lineage(store, version, out, cache_dir=Path(settings.cache_dir()),
                                config=config, on_epoch=progress)
    same = card["retrained_from"]["same_data"]
    print(f"re-trained on the {card['lineage']['rows']} cells of model {version}, on its "
          f"split; data manifest {'equal to' if same else 'DIFFERENT from'} the original's")
    return card


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
        record, decision = registry.get(version), registry.get_decision(version)
        if args.json:
            print(json.dumps({"record": record, "gate": decision}, indent=2, default=str))
        else:
            champion = registry.champion_version() == version
            print("\n".join(describe_version(record, decision, champion=champion)))
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
            previous = registry.champion_version()
            registry.promote(args.version, reason=f"promoted by hand: {args.reason}")
            print(f"champion is now {args.version}")
            _announce_champion(args.version, f"promoted by hand: {args.reason}", previous,
                               args.data_url or settings.data_url())
        else:
            previous = registry.champion_version()
            version = registry.rollback(reason=args.reason)
            print(f"champion is now {version}")
            _announce_champion(version, f"rolled back: {args.reason}", previous,
                               args.data_url or settings.data_url())
    return 0


def _announce_champion(version: str, reason: str, previous: str | None, data_url: str) -> None:
    """A new champion starts bulk-scoring through the deployment's trigger, as the gate's
    does; without a Prefect API there is nobody to tell (and nothing is started for it)."""
    from tasks.events import api_configured, emit_model_promoted, flush_events

    if api_configured():
        emit_model_promoted(version, reason, data_url=data_url, previous=previous,
                            source="manual")
        flush_events()


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "?"


def describe_version(record: Mapping[str, Any], decision: Mapping[str, Any] | None, *,
                     champion: bool = False) -> list[str]:
    """``malaria models show``: a version's record as lines for a person (``--json`` gives
    the whole record). What an older record lacks is said to be "not recorded"."""
    from malaria.core.labels import CLASS_NAMES

    m = record.get("metrics") or {}
    lines = [f"model {record.get('version')}{'  (champion)' if champion else ''}",
             f"  created     {record.get('created_at', 'not recorded')}",
             f"  model       {record.get('architecture', '?')} at {record.get('input_size', '?')}"
             f" px, threshold {_number(record.get('threshold'), 3)} "
             f"({rule_origin(record.get('threshold_rule'))})",
             "  test slides " + "  ".join(f"{name} {_number(m.get(key))}" for name, key in (
                 ("accuracy", "accuracy"), ("AUC", "roc_auc"), ("sensitivity", "sensitivity"),
                 ("specificity", "specificity")))]
    if decision is None:
        lines.append("  gate        no decision recorded")
    else:
        verdict = "promoted" if decision.get("promote") else "not promoted"
        lines.append(f"  gate        {verdict}: {decision.get('reason', '')}")
    if record.get("retrained_from"):
        lines.append(f"  retrained   from the lineage of {record['retrained_from']}")
    provenance = record.get("provenance") or {}
    lines.append(f"  flow run    {provenance.get('flow_run_id') or 'none (not a flow run)'}"
                 if provenance else "  flow run    not recorded")
    code = provenance.get("code") or {}
    if code:
        dirty = {True: ", uncommitted changes", False: ", clean"}.get(code.get("dirty"), "")
        lines.append(f"  code        {code.get('revision') or 'no revision'} "
                     f"(from {code.get('source')}{dirty}), malaria-screening "
                     f"{code.get('package') or '?'}")
    else:
        lines.append(f"  code        {record.get('code_revision') or 'not recorded'}")
    packages = provenance.get("packages") or record.get("packages") or {}
    lines.append("  packages    " + (", ".join(f"{name} {version or '-'}" for name, version
                                                in sorted(packages.items()))
                                     or "not recorded"))
    lineage = record.get("lineage")
    if not isinstance(lineage, Mapping):
        lines.append("  lineage     not recorded (registered before lineages were kept)")
        return lines
    lines.append(f"  lineage     {lineage.get('key')}: {lineage.get('rows')} cells, "
                 f"sha256 {lineage.get('sha256')}")
    splits, slides = lineage.get("splits") or {}, lineage.get("slides") or {}
    lines.append("              split  slides  " + "  ".join(f"{n:>11s}" for n in CLASS_NAMES))
    for part in ("train", "val", "test"):
        counts = splits.get(part) or {}
        lines.append(f"              {part:5s}  {slides.get(part, '?')!s:>6s}  "
                     + "  ".join(f"{counts.get(n, 0):>11d}" for n in CLASS_NAMES))
    return lines


def add_model_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def training_options(p: argparse.ArgumentParser) -> None:
        # Default None: see _TRAINING_OPTIONS. The help names the default that applies.
        p.add_argument("--arch", help=f"{defaults.DEFAULT_ARCH} (default), seed-augmented, "
                       "seed-baseline, ...")
        p.add_argument("--input-size", type=int, help="default: the architecture's")
        p.add_argument("--epochs", type=int, help=f"default {defaults.TRAIN_EPOCHS}")
        p.add_argument("--minutes", type=float,
                       help="training time budget in minutes (default "
                       f"{defaults.TRAIN_MAX_MINUTES or 'none'})")
        p.add_argument("--batch-size", type=int, help=f"default {defaults.TRAIN_BATCH_SIZE}")
        p.add_argument("--seed", type=int, help=f"default {defaults.TRAIN_SEED}")
        p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                       help="evaluate, threshold and record (for scoring) probabilities "
                       "averaged over the 8 symmetries of the square (default: "
                       f"{views_of(defaults.TEST_TIME_AUGMENTATION)} view(s))")

    train = sub.add_parser("train", help="train on a local folder with class subfolders, or "
                           "again on the cells a registered version saw")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a folder with class subfolders")
    source.add_argument("--from-lineage", metavar="VERSION",
                        help="train on exactly the cells VERSION saw (its lineage.csv: same "
                        "objects, same ETags, same split), with its recorded settings unless "
                        "training options are given")
    train.add_argument("--data-url", help="the bucket, with --from-lineage (default: "
                       "MALARIA_DATA_URL)")
    train.add_argument("--out", required=True, help="model file, e.g. model.keras")
    training_options(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="metrics of a model file on a labelled folder")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--json", help="write the metrics here")
    evaluate.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                          help="test-time augmentation over the 8 symmetries, or none "
                          "(default: as the model was evaluated, from its card)")
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
    models.add_argument("--json", action="store_true",
                        help="show: the whole record and gate decision as JSON")
    models.set_defaults(func=cmd_models)
