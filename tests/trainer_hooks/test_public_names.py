"""What a newcomer reads first is where things are: every name a public module of the hooks
exports is defined in a public module (never in ``_internals``), and the checkpoint layout's
names are defined once, in :mod:`spotguard.protocol`."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import spotguard.trainer_hooks
from spotguard import protocol
from spotguard.trainer_hooks import manifest

REPO = Path(__file__).resolve().parents[2]


def _public_modules() -> list[str]:
    found = [spotguard.trainer_hooks.__name__]
    for info in pkgutil.walk_packages(
        spotguard.trainer_hooks.__path__, f"{spotguard.trainer_hooks.__name__}."
    ):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(info.name)
    return found


@pytest.mark.parametrize("name", _public_modules())
def test_public_names_are_defined_in_public_modules(name):
    module = importlib.import_module(name)
    private = {
        export: owner
        for export in module.__all__
        if (owner := getattr(getattr(module, export), "__module__", None)) is not None
        and any(part.startswith("_") for part in owner.split("."))
    }
    assert private == {}, f"{name} exports names defined in private modules"


def test_the_layout_names_are_defined_once_in_the_protocol():
    """The fleet's job-end and the CLI read the store's layout through the protocol; the
    hooks use the same names, not copies of their own."""
    for name in ("STEP_DIR_PATTERN", "step_dir", "parse_step_dir"):
        assert hasattr(protocol, name)
        assert not hasattr(manifest, name), f"manifest.py defines {name} again"


def test_spot_checkpoint_is_typed_against_a_real_lightning_callback(tmp_path):
    """mypy sees ``SpotCheckpoint``'s base (not ``Any``): a misspelt method is an error.
    torch is left out of the check (``follow_imports = skip``): it is slow to analyse, and the
    base's own methods are what matters here."""
    pytest.importorskip("mypy")
    pytest.importorskip("lightning.pytorch")
    tree = tmp_path / "tree" / "spotguard"
    tree.mkdir(parents=True)
    for entry in (REPO / "spotguard").iterdir():
        (tree / entry.name).symlink_to(entry)
    for part in ("agent", "trainer_hooks", "fleet"):
        (tree / part).symlink_to(REPO / part)
    snippet = tmp_path / "uses_spot.py"
    snippet.write_text(
        "from spotguard.trainer_hooks.lightning import SpotCheckpoint\n"
        "SpotCheckpoint('/tmp/x').no_such_method()\n"
    )
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n[mypy-torch.*]\nfollow_imports = skip\n")
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", "/dev/null",
         "--no-error-summary", str(snippet)],
        cwd=tmp_path, env={**os.environ, "MYPYPATH": str(tree.parent)}, capture_output=True,
        text=True, timeout=110, check=False,
    )  # fmt: skip
    own = [line for line in checked.stdout.splitlines() if line.startswith("uses_spot.py")]
    assert own == [
        'uses_spot.py:2: error: "SpotCheckpoint" has no attribute "no_such_method"  [attr-defined]'
    ], checked.stdout[-2000:]
