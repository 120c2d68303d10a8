"""The layers, enforced: every import of every .py file (inside functions too) is read with
``ast`` and checked against the rules below.

```
malaria_cli, malaria_dev, deployments   may import anything
flows/    wiring only          -> never deployments/ or the CLI
tasks/    thin Prefect wrappers -> never flows/, deployments/ or the CLI
malaria/  the domain           -> never Prefect, flows/, tasks/, deployments/, the CLI, dev tools
pure modules (PURE below)      -> compute on values: no I/O, not even through another module
```

A pure module may import another first-party module only when that one (and everything it
imports in turn) is free of I/O as well, so I/O cannot come in through a side door.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("malaria", "tasks", "flows", "deployments", "malaria_cli", "malaria_dev",
           "benchmarks")

# Modules that compute on values. A folder (ending in "/") makes every module in it pure,
# new ones included. malaria/core/settings.py reads environment variables only (no network,
# no store, no process), which is configuration rather than I/O, so core/ is pure as a whole.
PURE = (
    "malaria/core/",
    "malaria/evaluation/",
    "malaria/registry/gate.py",
)
IO_MODULES = ("malaria.io", "boto3", "botocore", "obstore", "httpx", "requests", "socket",
              "urllib.request", "subprocess")
FIRST_PARTY = ("malaria",)  # followed transitively for the pure rule


@dataclass(frozen=True)
class Rule:
    name: str
    applies_to: tuple[str, ...]  # paths relative to the root: a folder ends in "/"
    forbidden: tuple[str, ...]  # module names; a submodule of one is forbidden too
    transitive: bool = False  # also follow first-party imports


RULES = (
    Rule("malaria/ is the domain: it never imports Prefect, flows, tasks, deployments, "
         "the CLI or dev tooling", ("malaria/",),
         ("prefect", "prefect_dask", "flows", "tasks", "deployments", "malaria_cli",
          "malaria_dev")),
    Rule("tasks/ are thin wrappers: they never import flows, deployments or the CLI",
         ("tasks/",), ("flows", "deployments", "malaria_cli")),
    Rule("flows/ are wiring: they never import deployments or the CLI", ("flows/",),
         ("deployments", "malaria_cli")),
    Rule("pure modules compute on values: they never import I/O", PURE, IO_MODULES,
         transitive=True),
)


@dataclass(frozen=True)
class Import:
    module: str
    line: int


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    module: str
    rule: str
    via: str = ""  # for a transitive import: where the I/O comes in

    def __str__(self) -> str:
        through = f" (through {self.via})" if self.via else ""
        return f"{self.path}:{self.line}: imports {self.module}{through}; rule: {self.rule}"


def _package_of(relative: Path) -> list[str]:
    parts = list(relative.with_suffix("").parts)
    return parts if relative.name == "__init__.py" else parts[:-1]


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every module ``path`` imports, at any depth (functions, ``if TYPE_CHECKING`` blocks,
    ``importlib.import_module("...")`` and ``__import__("...")`` with a literal name).
    ``from a import b`` yields both ``a`` and ``a.b``: ``b`` may be a submodule."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _package_of(path.relative_to(root))
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package[: len(package) - node.level + 1]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base:
                found.append(Import(base, node.lineno))
            found += [Import(f"{base}.{alias.name}" if base else alias.name, node.lineno)
                      for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (name in ("import_module", "__import__") and isinstance(first, ast.Constant)
                    and isinstance(first.value, str)):
                found.append(Import(first.value, node.lineno))
    return found


def matches(module: str, names: Iterable[str]) -> str | None:
    """The forbidden name ``module`` is or lies under, if any."""
    return next((n for n in names if module == n or module.startswith(n + ".")), None)


def python_files(root: Path, sources: Iterable[str] = SOURCES) -> Iterator[Path]:
    for source in sources:
        folder = root / source
        if folder.is_dir():
            yield from sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _applies(relative: str, patterns: Iterable[str]) -> bool:
    return any(relative.startswith(p) if p.endswith("/") else relative == p for p in patterns)


def module_files(module: str, root: Path) -> list[Path]:
    """The files that importing ``module`` runs: each package's __init__ and the module."""
    parts = module.split(".")
    files = []
    for depth in range(1, len(parts) + 1):
        base = root.joinpath(*parts[:depth])
        if (base / "__init__.py").is_file():
            files.append(base / "__init__.py")
        elif base.with_suffix(".py").is_file():
            files.append(base.with_suffix(".py"))
    return files


def _io_inside(path: Path, root: Path, forbidden: tuple[str, ...],
               seen: set[Path]) -> tuple[str, str] | None:
    """(module, "file:line") of the first forbidden import reachable from ``path``."""
    if path in seen:
        return None
    seen.add(path)
    relative = path.relative_to(root).as_posix()
    for imported in imports_of(path, root):
        hit = matches(imported.module, forbidden)
        if hit:
            return imported.module, f"{relative}:{imported.line}"
        if matches(imported.module, FIRST_PARTY):
            for file in module_files(imported.module, root):
                found = _io_inside(file, root, forbidden, seen)
                if found:
                    return found
    return None


def check(root: Path, rules: Iterable[Rule] = RULES,
          sources: Iterable[str] = SOURCES) -> list[Violation]:
    """Every violation, one per rule and line (``from a import b`` names a and a.b)."""
    violations: list[Violation] = []
    for path in python_files(root, sources):
        relative = path.relative_to(root).as_posix()
        for rule in rules:
            if not _applies(relative, rule.applies_to):
                continue
            reported: set[int] = set()
            for imported in imports_of(path, root):
                if imported.line in reported:
                    continue
                if matches(imported.module, rule.forbidden):
                    reported.add(imported.line)
                    violations.append(Violation(relative, imported.line, imported.module,
                                                rule.name))
                elif rule.transitive and matches(imported.module, FIRST_PARTY):
                    seen: set[Path] = {path}
                    for file in module_files(imported.module, root):
                        found = _io_inside(file, root, rule.forbidden, seen)
                        if found:
                            reported.add(imported.line)
                            violations.append(Violation(relative, imported.line,
                                                        imported.module, rule.name,
                                                        via=f"{found[0]} at {found[1]}"))
                            break
    return violations


# ----------------------------------------------------------------------------------- tests


def test_the_layers_hold() -> None:
    violations = check(ROOT)
    assert not violations, "layer violations:\n" + "\n".join(map(str, violations))


@pytest.mark.parametrize("pattern", PURE)
def test_every_pure_module_listed_exists(pattern: str) -> None:
    # A renamed module must not drop out of the rule silently.
    target = ROOT / pattern
    assert target.is_dir() if pattern.endswith("/") else target.is_file(), pattern


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_checker_catches_each_kind_of_violation(tmp_path: Path) -> None:
    """The checker itself, on a synthetic tree with one violation per rule."""
    for package in ("malaria", "malaria/core", "malaria/io", "tasks", "flows"):
        _write(tmp_path, f"{package}/__init__.py", "")
    _write(tmp_path, "malaria/io/store.py", "import boto3\n")
    _write(tmp_path, "malaria/core/helper.py", "from malaria.io import store\n")
    _write(tmp_path, "malaria/core/clean.py", "import math\nfrom . import names\n")
    _write(tmp_path, "malaria/core/names.py", "X = 1\n")
    _write(tmp_path, "malaria/core/sneaky.py", "from .helper import X\n")  # I/O via helper
    _write(tmp_path, "malaria/domain.py",
           "def run():\n    from prefect import flow\n    return flow\n")
    _write(tmp_path, "malaria/dynamic.py",
           "import importlib\nimportlib.import_module('malaria_dev.stack')\n")
    _write(tmp_path, "tasks/work.py", "from flows.train import train_flow\n")
    _write(tmp_path, "flows/train.py", "import malaria_cli.main\n")
    rules = (*RULES[:3], Rule(RULES[3].name, ("malaria/core/",), IO_MODULES,
                              transitive=True))

    found = {(v.path, v.line, v.module) for v in check(tmp_path, rules)}

    assert found == {
        ("malaria/domain.py", 2, "prefect"),
        ("malaria/dynamic.py", 2, "malaria_dev.stack"),
        ("tasks/work.py", 1, "flows.train"),
        ("flows/train.py", 1, "malaria_cli.main"),
        ("malaria/core/helper.py", 1, "malaria.io"),
        ("malaria/core/sneaky.py", 1, "malaria.core.helper"),
    }
    messages = [str(v) for v in check(tmp_path, rules)]
    assert any(m.startswith("flows/train.py:1: imports malaria_cli.main; rule: flows/")
               for m in messages)
    assert any("through malaria.io at malaria/core/helper.py:1" in m for m in messages)


def test_the_checker_passes_a_clean_tree(tmp_path: Path) -> None:
    _write(tmp_path, "malaria/__init__.py", "")
    _write(tmp_path, "malaria/core/__init__.py", "")
    _write(tmp_path, "malaria/core/labels.py", "import re\nfrom dataclasses import dataclass\n")
    _write(tmp_path, "tasks/work.py", "from prefect import task\nfrom malaria.core import labels\n")
    _write(tmp_path, "flows/run.py", "from tasks.work import x\n")
    assert check(tmp_path) == []
