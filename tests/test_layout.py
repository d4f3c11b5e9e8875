"""The import rules of DESIGN.md, read from the source: the parts stay apart.

    spotguard core (errors, protocol, imds, sizes,   imports no part, no torch, no boto3
                    lazy)
    spotguard.agent                                  core only; never torch, boto3, the hooks
    spotguard.trainer_hooks                          core only; never the agent
    spotguard.fleet, spotguard.units                 core only
    spotguard.drill                                  core + the parts' public modules
    spotguard.cli                                    anything (it is the top)

DESIGN.md's core is errors, protocol and imds; ``spotguard.sizes`` and ``spotguard.lazy`` count
as core too: small helpers on the standard library alone, which every part may use.

Imports inside functions count as much as those at the top: a lazy import is still a
dependency. So do imports by name: ``importlib.import_module("...")``, ``__import__("...")``
and the modules of a ``lazy_exports(__name__, {...})`` map (:mod:`spotguard.lazy`), where the
module path is a string literal (one computed at run time is not seen here; the run-time test
below imports every module of the agent and the hooks and looks at what got loaded). Also: no
module grows past the size a newcomer reads in one sitting.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Folder -> import package (pyproject.toml's package-dir).
PACKAGES = {
    "spotguard": "spotguard",
    "agent": "spotguard.agent",
    "trainer_hooks": "spotguard.trainer_hooks",
    "fleet": "spotguard.fleet",
    "systemd": "spotguard.units",
}
CORE = (
    "spotguard.errors",
    "spotguard.protocol",
    "spotguard.imds",
    "spotguard.sizes",
    "spotguard.lazy",
)
PARTS = ("spotguard.agent", "spotguard.trainer_hooks", "spotguard.fleet", "spotguard.units")
#: What the core and the agent never import: torch and boto3 (DESIGN.md), and what comes with
#: them (their own dependencies, the libraries built on torch).
HEAVY = (
    "torch",
    "torchdata",
    "lightning",
    "pytorch_lightning",
    "numpy",
    "boto3",
    "botocore",
    "s3transfer",
)
MAX_LINES = 400
#: Optional dependencies (the extras): a hooks module that needs one is skipped where it is
#: missing, and only there.
OPTIONAL = ("torch", "boto3", "pytorch_lightning", "lightning")
#: What must not be loaded once the agent (and the command line that starts it) is imported.
AGENT_NEVER = (*HEAVY, "requests", "spotguard.trainer_hooks")


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _absolute(name: str, level: int, package: str) -> str:
    """``name`` imported ``level`` packages up from ``package`` (``from ..x import``)."""
    if not level:
        return name
    anchor = package.split(".")
    anchor = anchor[: len(anchor) - level + 1]
    return ".".join([*anchor, name] if name else anchor)


def _called(node: ast.Call) -> str:
    """The called function's own name: ``f`` of ``f(...)`` and of ``mod.f(...)``."""
    if isinstance(node.func, ast.Name):
        return node.func.id
    return node.func.attr if isinstance(node.func, ast.Attribute) else ""


def _text(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _argument(node: ast.Call, position: int, keyword: str) -> ast.expr | None:
    """The call's argument at ``position``, or given as ``keyword=``."""
    if len(node.args) > position:
        return node.args[position]
    return next((given.value for given in node.keywords if given.arg == keyword), None)


def _by_name(node: ast.Call, maps: dict[str, ast.expr], package: str) -> list[str]:
    """The modules an ``import_module``/``__import__``/``lazy_exports`` call imports, when they
    are string literals (a map given by name: the module-level dict assigned to that name)."""
    called = _called(node)
    if called in ("import_module", "__import__"):
        name = _text(_argument(node, 0, "name"))
        if name is None:
            return []
        # import_module(".x", __package__) or import_module(".x", "some.package")
        anchor = _text(_argument(node, 1, "package")) if called == "import_module" else None
        dots = len(name) - len(name.lstrip("."))
        return [_absolute(name[dots:], dots, anchor or package)]
    if called == "lazy_exports":
        where = _argument(node, 1, "where")
        if isinstance(where, ast.Name):
            where = maps.get(where.id, where)
        if isinstance(where, ast.Dict):
            return [name for name in map(_text, where.values) if name is not None]
    return []


def _imports(module: str, path: Path) -> set[str]:
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    maps: dict[str, ast.expr] = {
        target.id: node.value
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module or "", node.level, package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            names.update(_by_name(node, maps, package))
    return names


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _part_of(module: str) -> str:
    if module == "spotguard.__main__":
        return "spotguard.cli"  # `python -m spotguard` is the command line
    for part in (*PARTS, "spotguard.drill", "spotguard.cli"):
        if _under(module, (part,)):
            return part
    return "core"


def _violations(module: str, path: Path) -> list[str]:
    part = _part_of(module)
    found = []
    for name in sorted(_imports(module, path)):
        if not _under(name, ("spotguard",)):
            if part in ("core", "spotguard.agent") and _under(name, HEAVY):
                found.append(f"{module} imports {name}: the core and the agent stay small")
            continue
        target = _part_of(name)
        if target == part or (target == "core" and not _under(name, ("spotguard.drill",))):
            if target == "core" and name != "spotguard" and not _under(name, CORE):
                found.append(f"{module} imports {name}, which is not in the core")
            continue
        if part == "spotguard.cli":
            continue  # the top may use everything
        if part == "spotguard.drill" and target in PARTS:
            if any(piece.startswith("_") for piece in name.split(".")):
                found.append(f"{module} imports {name}: the drill uses public APIs only")
            continue
        found.append(f"{module} ({part}) imports {name} ({target})")
    return found


def test_every_package_folder_is_read():
    expected = {
        "spotguard.protocol",
        "spotguard.agent.daemon",
        "spotguard.trainer_hooks.store",
        "spotguard.drill.runner",
        "spotguard.cli",
        "spotguard.fleet.render",
    }
    assert expected <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_import_rules(module):
    assert _violations(module, MODULES[module]) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_readable_in_one_sitting(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines: split it by job"


def test_the_rules_catch_what_they_forbid(tmp_path):
    """The checker itself: each forbidden edge, written into a scratch module, is reported."""
    cases = {
        ("spotguard.agent.x", "from spotguard.trainer_hooks import SpotGuard"): "trainer_hooks",
        ("spotguard.trainer_hooks.x", "import spotguard.agent.daemon"): "spotguard.agent",
        ("spotguard.protocol", "import torch"): "torch",
        ("spotguard.agent.x", "def f():\n    import boto3"): "boto3",
        ("spotguard.trainer_hooks.x", "from spotguard.drill import run_drill"): "drill",
        ("spotguard.drill.x", "from spotguard.trainer_hooks._internals import core"): "public",
        ("spotguard.trainer_hooks._internals.x", "from ...agent import config"): "agent",
        ("spotguard.agent.x", "import torchdata"): "torchdata",
        ("spotguard.agent.x", "from s3transfer import manager"): "s3transfer",
        # Imports by name: importlib, __import__, lazy_exports (a map given inline or by name).
        (
            "spotguard.agent.x",
            'import importlib\nimportlib.import_module("spotguard.trainer_hooks.store")',
        ): "trainer_hooks",
        ("spotguard.agent.x", 'from importlib import import_module\nimport_module("boto3")'): (
            "boto3"
        ),
        ("spotguard.agent.x", 'def f():\n    return __import__("torch")'): "torch",
        (
            "spotguard.trainer_hooks.x",
            "from spotguard.lazy import lazy_exports\n"
            '__getattr__ = lazy_exports(__name__, {"AgentConfig": "spotguard.agent.config"})',
        ): "spotguard.agent",
        (
            "spotguard.trainer_hooks.x",
            'from spotguard.lazy import lazy_exports\n_LAZY = {"Agent": "spotguard.agent.daemon"}\n'
            "__getattr__ = lazy_exports(__name__, _LAZY)",
        ): "spotguard.agent",
        (
            "spotguard.trainer_hooks._internals.x",
            'import importlib\nimportlib.import_module("...agent.config", __package__)',
        ): "spotguard.agent",
        (
            "spotguard.trainer_hooks.x",
            'import importlib\nimportlib.import_module(".config", "spotguard.agent")',
        ): "spotguard.agent",
        (
            "spotguard.trainer_hooks.x",
            'import importlib\nimportlib.import_module(name="spotguard.agent.config")',
        ): "spotguard.agent",
        (
            "spotguard.trainer_hooks.x",
            "from spotguard.lazy import lazy_exports\n"
            '_LAZY: dict[str, str] = {"Agent": "spotguard.agent.daemon"}\n'
            "__getattr__ = lazy_exports(__name__, _LAZY)",
        ): "spotguard.agent",
    }
    for (module, source), expected in cases.items():
        path = tmp_path / "x.py"
        path.write_text(source + "\n")
        problems = _violations(module, path)
        assert problems, (module, source)
        assert expected in problems[0], (module, source, problems)
    allowed = tmp_path / "ok.py"
    allowed.write_text(
        "from spotguard.errors import StoreError\nimport json\nimport importlib\n"
        'importlib.import_module("spotguard.protocol")\nimportlib.import_module(name)\n'
        'getattr(json, "loads")\n'
    )
    assert _violations("spotguard.trainer_hooks.x", allowed) == []


#: Run in a fresh interpreter: imports every agent module, then (the agent's modules dropped)
#: every hooks module, and prints what each phase loaded that it must not have.
RUNTIME_CHECK = """
import importlib, importlib.util, json, pkgutil, sys

def loaded(prefixes):
    return sorted({name for name in sys.modules for prefix in prefixes
                   if name == prefix or name.startswith(prefix + ".")})

def walk(package, missing, skipped):
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        try:
            importlib.import_module(info.name)
        except ImportError as exc:
            if (exc.name or "").partition(".")[0] in missing or (exc.name is None and missing):
                skipped.append(info.name)
            else:
                raise

optional, agent_never = sys.argv[1].split(","), sys.argv[2].split(",")
missing = {name for name in optional if importlib.util.find_spec(name) is None}
skipped = []
import spotguard.cli
spotguard.cli.build_parser()  # `spotguard agent` starts here
walk("spotguard.agent", missing, skipped)
agent = loaded(agent_never)
for name in loaded(["spotguard.agent"]):
    del sys.modules[name]
del sys.modules["spotguard"].agent
walk("spotguard.trainer_hooks", missing, skipped)
print(json.dumps({"agent": agent, "hooks": loaded(["spotguard.agent"]), "skipped": skipped}))
"""


def test_the_parts_do_not_load_each_other_at_run_time():
    """What the source check cannot see (a module path computed at run time, an import
    inside a dependency): import them all and look at ``sys.modules``. The agent and the
    command line that starts it load neither torch, boto3 nor the hooks; the hooks never load
    the agent."""
    done = subprocess.run(
        [sys.executable, "-c", RUNTIME_CHECK, ",".join(OPTIONAL), ",".join(AGENT_NEVER)],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["agent"] == [], "the agent loaded these"
    assert found["hooks"] == [], "the trainer hooks loaded the agent"


def test_every_package_folder_ships_in_the_wheel():
    """A folder with an ``__init__.py`` that pyproject.toml does not list is left out of the
    wheel: editable installs (and so every other test) would never notice."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert set(config["package-dir"]) == set(PACKAGES.values())
    on_disk = {
        ".".join((package, *init.parent.relative_to(REPO / folder).parts))
        for folder, package in PACKAGES.items()
        for init in (REPO / folder).rglob("__init__.py")
    }
    assert on_disk - listed == set(), "missing from [tool.setuptools] packages"
