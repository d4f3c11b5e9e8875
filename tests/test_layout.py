"""The import rules of DESIGN.md, read from the source: the parts stay apart.

    spotguard core (errors, protocol, imds, sizes,   imports no part, no torch, no boto3
                    lazy)
    spotguard.agent                                  core only; never torch, boto3, the hooks
    spotguard.trainer_hooks                          core only; never the agent
    spotguard.fleet, spotguard.units                 core only
    spotguard.drill                                  core + the parts' public modules
    spotguard.cli                                    anything (it is the top)

Imports inside functions count as much as those at the top: a lazy import is still a
dependency. Also: no module grows past the size a newcomer reads in one sitting.
"""

from __future__ import annotations

import ast
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
HEAVY = ("torch", "boto3", "botocore", "lightning", "pytorch_lightning", "numpy")
MAX_LINES = 400


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


def _imports(module: str, path: Path) -> set[str]:
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
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
    }
    for (module, source), expected in cases.items():
        path = tmp_path / "x.py"
        path.write_text(source + "\n")
        problems = _violations(module, path)
        assert problems, (module, source)
        assert expected in problems[0], (module, source, problems)
    allowed = tmp_path / "ok.py"
    allowed.write_text("from spotguard.errors import StoreError\nimport json\n")
    assert _violations("spotguard.trainer_hooks.x", allowed) == []


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
