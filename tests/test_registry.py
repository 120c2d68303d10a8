"""The model registry over moto S3 and a local folder, and the promotion gate."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from malaria.core import defaults
from malaria.core.layout import CHAMPION_KEY
from malaria.io.store import LocalStore, S3Store
from malaria.registry.gate import GateDecision, decide_promotion
from malaria.registry.provenance import code_revision, hash_manifest, new_version, package_versions
from malaria.registry.registry import ModelRegistry, RegistryError, UnknownVersion

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\nnot-really-but-bytes"


def _record(auc: float, accuracy: float) -> dict[str, Any]:
    """What the train flow hands over: metrics plus provenance (abridged)."""
    return {
        "metrics": {"roc_auc": auc, "accuracy": accuracy},
        "threshold": 0.42,
        "architecture": "compact",
        "input_size": 64,
        "slides": {"train": ["C1", "C2"], "val": ["C3"], "test": ["C4"]},
        "data_manifest_sha256": hash_manifest([("dataset/Parasitized/C1/a.png", "abc")]),
    }


def _model_file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "model.keras"
    path.write_bytes(content)
    return path


# ------------------------------------------------------------------------------- versions


def test_new_version_sorts_by_time_and_is_unique() -> None:
    moment = datetime(2026, 11, 27, 6, 15, 0, tzinfo=UTC)
    version = new_version(moment)
    assert re.fullmatch(r"20261127T061500Z-[0-9a-f]{6}", version)
    # Another zone and a naive UTC time name the same instant.
    assert new_version(moment.astimezone(timezone(timedelta(hours=2)))).startswith(
        "20261127T061500Z-"
    )
    assert new_version(moment.replace(tzinfo=None)).startswith("20261127T061500Z-")
    later = new_version(moment + timedelta(seconds=1))
    assert version < later
    assert len({new_version(moment) for _ in range(50)}) == 50


def test_provenance_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    versions = package_versions()
    assert set(versions) == {"tensorflow", "keras", "numpy", "python"}
    assert versions["numpy"] and versions["python"]
    monkeypatch.setenv("MALARIA_CODE_REVISION", "release-1.2.3")
    assert code_revision() == "release-1.2.3"
    monkeypatch.delenv("MALARIA_CODE_REVISION")
    revision = code_revision()  # this checkout is a git tree; an exported copy gives None
    assert revision is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", revision)
    # The manifest hash names the set of files, not the order they were listed in.
    rows = [("dataset/U/C1/a.png", "h1"), ("dataset/P/C2/b.png", "h2")]
    assert hash_manifest(rows) == hash_manifest(rows[::-1])
    assert hash_manifest(rows) != hash_manifest(rows[:1])


# ------------------------------------------------------------------------------- registry


def test_register_promote_list_rollback_round_trip(
    any_store: S3Store | LocalStore, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MALARIA_CODE_REVISION", "abc123")
    registry = ModelRegistry(any_store)
    assert registry.champion() is None and registry.list_versions() == []

    first = new_version(datetime(2026, 1, 1, tzinfo=UTC))
    second = new_version(datetime(2026, 1, 2, tzinfo=UTC))
    key = registry.register(first, _model_file(tmp_path, b"weights-1"), _record(0.97, 0.93),
                            {"roc": PNG, "confusion_matrix.png": PNG})
    assert key == f"models/{first}/metrics.json"
    registry.register(second, _model_file(tmp_path, b"weights-2"), _record(0.98, 0.95),
                      {"roc": PNG})

    record = registry.get(first)
    assert record["version"] == first
    assert record["threshold"] == 0.42 and record["slides"]["test"] == ["C4"]
    assert record["model"]["file"] == "model.keras" and record["model"]["bytes"] == 9
    assert record["plots"] == ["confusion_matrix.png", "roc.png"]
    assert record["code_revision"] == "abc123"
    assert set(record["packages"]) == {"tensorflow", "keras", "numpy", "python"}
    assert datetime.fromisoformat(record["created_at"]).tzinfo is not None
    assert any_store.get_bytes(f"models/{first}/roc.png") == PNG

    # Promote, then promote a better one; the champion points at it with a history.
    registry.promote(first, reason="first model")
    decision = decide_promotion({"roc_auc": 0.98, "accuracy": 0.95},
                                {"roc_auc": 0.97, "accuracy": 0.93})
    registry.promote(second, reason=decision.reason, decision=decision)
    champion = registry.champion()
    assert champion is not None and champion["version"] == second
    assert champion["decision"]["promote"] is True
    assert [(h["action"], h["version"]) for h in champion["history"]] == [
        ("promote", first), ("promote", second)]
    assert all(h["at"] and h["reason"] for h in champion["history"])
    assert registry.champion_version() == second
    # Promoting the serving version again changes nothing (a re-run flow adds no history).
    registry.promote(second, reason="again")
    assert registry.champion() == champion

    listed = registry.list_versions()
    assert [r["version"] for r in listed] == [first, second]  # oldest first
    assert [r["champion"] for r in listed] == [False, True]

    # Roll back to the first; with no earlier champion, a second rollback is refused.
    assert registry.rollback() == first
    assert registry.champion_version() == first
    assert registry.champion()["history"][-1]["action"] == "rollback"  # type: ignore[index]
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback()

    # The model file comes back intact, into a folder or to a chosen path.
    folder = tmp_path / "download"
    folder.mkdir()
    assert registry.download_model(second, folder).read_bytes() == b"weights-2"
    target = registry.download_model(first, tmp_path / "nested" / "serving.keras")
    assert target == tmp_path / "nested" / "serving.keras"
    assert target.read_bytes() == b"weights-1"


def test_rollback_walks_back_through_several_champions(
    any_store: S3Store | LocalStore, tmp_path: Path
) -> None:
    registry = ModelRegistry(any_store)
    with pytest.raises(RegistryError, match="no champion"):
        registry.rollback()
    versions = [f"v{i}" for i in range(3)]
    for version in versions:
        registry.register(version, _model_file(tmp_path, version.encode()), _record(0.95, 0.9),
                          {})
        registry.promote(version, reason="test")
    # v2 -> v1 -> v0: each rollback goes one further back, not back and forth.
    assert registry.rollback(reason="v2 misbehaves") == "v1"
    assert registry.champion()["reason"] == "v2 misbehaves"  # type: ignore[index]
    assert registry.rollback() == "v0"
    with pytest.raises(RegistryError):
        registry.rollback()
    # A new promotion after rollbacks starts from the version that serves.
    registry.promote("v2", reason="fixed")
    assert registry.rollback() == "v0"


def test_unknown_version_cannot_be_promoted_or_read(
    any_store: S3Store | LocalStore, tmp_path: Path
) -> None:
    registry = ModelRegistry(any_store)
    with pytest.raises(UnknownVersion, match="not registered"):
        registry.promote("20260101T000000Z-000000", reason="typo")
    with pytest.raises(UnknownVersion):
        registry.get("nope")
    with pytest.raises(UnknownVersion):
        registry.download_model("nope", tmp_path)
    assert not any_store.exists(CHAMPION_KEY)
    # Model and plots without metrics.json (a crash before the pointer) are not a version.
    any_store.put_bytes("models/half/model.keras", b"partial")
    assert registry.versions() == []
    with pytest.raises(UnknownVersion):
        registry.promote("half", reason="half-uploaded")


def test_register_refuses_overwrite_bad_names_and_missing_file(
    local_store: LocalStore, tmp_path: Path
) -> None:
    registry = ModelRegistry(local_store)
    model = _model_file(tmp_path, b"w")
    registry.register("v1", model, _record(0.95, 0.9), {})
    with pytest.raises(RegistryError, match="already registered"):
        registry.register("v1", model, _record(0.99, 0.99), {})
    assert registry.get("v1")["metrics"]["accuracy"] == 0.9  # untouched
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(RegistryError, match="invalid version"):
            registry.register(bad, model, {}, {})
    with pytest.raises(RegistryError, match="invalid plot name"):
        registry.register("v2", model, {}, {"../roc": PNG})
    with pytest.raises(RegistryError, match="invalid plot name"):
        registry.register("v2", model, {}, {"my roc": PNG})
    clashing = tmp_path / "metrics.json"  # a model file must not shadow the record
    clashing.write_bytes(b"w")
    with pytest.raises(RegistryError, match="model file name"):
        registry.register("v2", clashing, {}, {})
    with pytest.raises(RegistryError, match="does not exist"):
        registry.register("v2", tmp_path / "missing.keras", {}, {})
    assert registry.versions() == ["v1"]


class _RecordingStore(LocalStore):
    """A local store that remembers the order of writes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[str] = []

    def put_bytes(self, key: str, data: bytes, **kwargs: Any) -> None:
        self.writes.append(key)
        super().put_bytes(key, data, **kwargs)


def test_pointers_are_written_last(tmp_path: Path) -> None:
    store = _RecordingStore(tmp_path / "bucket")
    registry = ModelRegistry(store)
    registry.register("v1", _model_file(tmp_path, b"w"), _record(0.95, 0.9),
                      {"roc": PNG, "learning_curves": PNG})
    assert store.writes[-1] == "models/v1/metrics.json"
    assert set(store.writes[:-1]) == {"models/v1/model.keras", "models/v1/roc.png",
                                      "models/v1/learning_curves.png"}
    store.writes.clear()
    decision = decide_promotion({"roc_auc": 0.95, "accuracy": 0.9}, None)
    registry.record_decision("v1", decision)
    registry.promote("v1", reason=decision.reason, decision=decision)
    assert store.writes == ["models/v1/gate.json", CHAMPION_KEY]
    assert registry.get_decision("v1")["promote"] is True  # type: ignore[index]
    assert json.loads(store.get_bytes(CHAMPION_KEY))["decision"]["reason"] == decision.reason


def test_download_detects_a_corrupted_model(local_store: LocalStore, tmp_path: Path) -> None:
    registry = ModelRegistry(local_store)
    registry.register("v1", _model_file(tmp_path, b"good weights"), _record(0.95, 0.9), {})
    local_store.put_bytes("models/v1/model.keras", b"bad weights!")
    out = tmp_path / "out.keras"
    with pytest.raises(RegistryError, match="corrupted"):
        registry.download_model("v1", out)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


# ----------------------------------------------------------------------------------- gate


def test_gate_refuses_a_worse_candidate() -> None:
    decision = decide_promotion({"roc_auc": 0.975, "accuracy": 0.96},
                                {"roc_auc": 0.99, "accuracy": 0.97})
    assert isinstance(decision, GateDecision) and decision.promote is False
    assert "AUC 0.9750" in decision.reason and "0.9900" in decision.reason
    assert "accuracy 0.9600" in decision.reason and decision.reason.startswith("Not promoted")


def test_gate_promotes_a_better_candidate() -> None:
    candidate = {"roc_auc": 0.995, "accuracy": 0.975}
    champion = {"roc_auc": 0.99, "accuracy": 0.97}
    decision = decide_promotion(candidate, champion)
    assert decision.promote is True and decision.reason.startswith("Promoted:")
    assert decision.candidate == candidate and decision.champion == champion
    assert json.loads(json.dumps(decision.to_dict()))["promote"] is True


def test_gate_tolerance_edges() -> None:
    champion = {"roc_auc": 0.990, "accuracy": 0.970}
    # Equal, and slightly worse within the tolerance: promoted (retraining noise).
    assert decide_promotion(dict(champion), champion).promote
    assert decide_promotion({"roc_auc": 0.985, "accuracy": 0.965}, champion).promote
    # Just beyond the tolerance on either metric: refused.
    assert not decide_promotion({"roc_auc": 0.9849, "accuracy": 0.97}, champion).promote
    assert not decide_promotion({"roc_auc": 0.99, "accuracy": 0.9649}, champion).promote
    assert decide_promotion({"roc_auc": 0.9849, "accuracy": 0.97}, champion,
                            tolerance=0.01).promote


def test_gate_floors_and_the_first_model() -> None:
    first = decide_promotion({"roc_auc": 0.95, "accuracy": 0.90}, None)
    assert first.promote and "first model" in first.reason and first.champion is None
    assert "AUC 0.9500" in first.reason
    # Below the floor with no champion, and below the floor even when the champion is worse.
    low_auc = decide_promotion({"roc_auc": 0.85, "accuracy": 0.90}, None)
    assert not low_auc.promote and "floor 0.9000" in low_auc.reason
    assert not decide_promotion({"roc_auc": 0.95, "accuracy": 0.80}, None).promote
    assert not decide_promotion({"roc_auc": 0.89, "accuracy": 0.9},
                                {"roc_auc": 0.80, "accuracy": 0.8}).promote
    assert decide_promotion({"roc_auc": 0.95, "accuracy": 0.9}, None, min_auc=0.96,
                            min_accuracy=0.5).promote is False


def test_gate_refuses_missing_or_undefined_metrics_and_accepts_auc_alias() -> None:
    assert not decide_promotion({"accuracy": 0.99}, None).promote
    assert not decide_promotion({"roc_auc": None, "accuracy": 0.99}, None).promote
    assert not decide_promotion({"roc_auc": float("nan"), "accuracy": 0.99}, None).promote
    no_reference = decide_promotion({"roc_auc": 0.99, "accuracy": 0.99}, {"accuracy": 0.9})
    assert not no_reference.promote and "champion has no AUC" in no_reference.reason
    # The benchmark JSON calls it "auc".
    assert decide_promotion({"auc": 0.99, "accuracy": 0.97}, {"auc": 0.99,
                                                              "accuracy": 0.97}).promote


def test_gate_defaults_are_the_product_defaults() -> None:
    parameters = inspect.signature(decide_promotion).parameters
    fields = {f.name: f.default for f in dataclasses.fields(GateDecision)}
    for name, value in (("min_auc", defaults.GATE_MIN_AUC),
                        ("min_accuracy", defaults.GATE_MIN_ACCURACY),
                        ("tolerance", defaults.GATE_TOLERANCE)):
        assert parameters[name].default == value and fields[name] == value
    decision = decide_promotion({"roc_auc": 0.99, "accuracy": 0.99}, None)
    assert (decision.min_auc, decision.min_accuracy, decision.tolerance) == (
        defaults.GATE_MIN_AUC, defaults.GATE_MIN_ACCURACY, defaults.GATE_TOLERANCE)


GATE_NAMES = {"min_auc": defaults.GATE_MIN_AUC, "min_accuracy": defaults.GATE_MIN_ACCURACY,
              "tolerance": defaults.GATE_TOLERANCE}


def _literal_gate_defaults(path: Path) -> list[str]:
    """``name: float = 0.90``-style restatements of a gate floor: in a signature, a
    dataclass field, or an argparse ``default=``."""
    found = []

    def flag(name: str, node: ast.expr | None, line: int) -> None:
        if (isinstance(node, ast.Constant) and isinstance(node.value, float)
                and name in GATE_NAMES and node.value == GATE_NAMES[name]):
            found.append(f"{path.relative_to(ROOT)}:{line}: {name} = {node.value}")

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args.posonlyargs + node.args.args
            for arg, default in zip(args[len(args) - len(node.args.defaults):],
                                    node.args.defaults, strict=True):
                flag(arg.arg, default, default.lineno)
            for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True):
                flag(arg.arg, default, default.lineno if default else node.lineno)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            flag(node.target.id, node.value, node.lineno)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            option = str(node.args[0].value).lstrip("-").replace("-", "_")
            for keyword in node.keywords:
                if keyword.arg == "default":
                    flag(option, keyword.value, node.lineno)
    return found


def test_gate_floors_are_declared_once() -> None:
    """0.90 / 0.85 / 0.005 live in malaria.core.defaults; everything else reads them."""
    own = ROOT / "malaria" / "core" / "defaults.py"
    found = [hit for folder in ("malaria", "tasks", "flows", "malaria_cli", "benchmarks",
                                "deployments")
             for path in sorted((ROOT / folder).rglob("*.py")) if path != own
             for hit in _literal_gate_defaults(path)]
    assert not found, "gate floors restated:\n" + "\n".join(found)


def test_the_gate_shows_the_parasitemia_error_beside_its_decision() -> None:
    from malaria.registry.gate import decide_promotion

    candidate = {"roc_auc": 0.99, "accuracy": 0.96, "parasitemia_error_mean": 2.5,
                 "parasitemia_error_max": 7.25}
    champion = {"roc_auc": 0.99, "accuracy": 0.96, "parasitemia_error_mean": 3.0,
                "parasitemia_error_max": 9.0}
    decision = decide_promotion(candidate, champion)
    assert decision.promote
    assert "mean 2.50 pp, max 7.25 pp (champion: mean 3.00 pp, max 9.00 pp)" in decision.reason
    older = decide_promotion({"roc_auc": 0.99, "accuracy": 0.96}, None)
    assert older.promote and "parasitemia" not in older.reason


def test_a_version_whose_promotion_never_reached_champion_json_is_finished_by_a_rerun(
        tmp_path: Path) -> None:
    """A crash between gate.json and champion.json, or during a person's approval, leaves a
    version the re-run must finish, not a reason to register the same model again."""
    registry = ModelRegistry(LocalStore(tmp_path / "bucket"))
    identity = {"config": {"arch": "cellnet", "seed": 1}, "data_manifest_sha256": "ab" * 32}
    metrics = {**_record(0.99, 0.95), **identity}
    registry.register("v1", _model_file(tmp_path, b"m1"), metrics, {})
    assert registry.registered_as(metrics) == "v1"  # not gated yet

    promote = decide_promotion({"roc_auc": 0.99, "accuracy": 0.95}, None)
    assert promote.promote
    registry.record_decision("v1", promote)  # ... and the run dies before champion.json
    assert registry.registered_as(metrics) == "v1"

    registry.promote("v1", reason=promote.reason, decision=promote)
    assert registry.registered_as(metrics) is None  # served: a later run registers its own

    registry.register("v2", _model_file(tmp_path, b"m2"), metrics, {})
    pending = {**dataclasses.asdict(promote), "promote": False,
               "approval": {"required": True, "status": "pending"}}
    registry.record_decision("v2", pending)
    assert registry.registered_as(metrics) == "v2"  # still waiting for a person
    registry.record_decision("v2", {**pending, "approval": {"status": "rejected"}})
    assert registry.registered_as(metrics) is None  # refused: final
