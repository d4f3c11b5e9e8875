"""The wheel of the spotguard under test, built once per test session (``spotguard fleet
package``'s own code), for every test whose Terraform needs a ``spotguard_wheel_path``."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from spotguard.fleet.package import BuiltWheel

_BUILT: list[BuiltWheel] = []


def built_wheel() -> BuiltWheel:
    """Build on first use (a few seconds), then the same file; removed at exit."""
    if not _BUILT:
        folder = Path(tempfile.mkdtemp(prefix="spotguard-test-wheel-"))
        atexit.register(shutil.rmtree, folder, True)
        _BUILT.append(BuiltWheel.build(folder))
    return _BUILT[0]


def with_wheel(work: Path) -> Path:
    """Put the wheel into ``work/dist``, where ``examples/basic`` finds it; returns its path."""
    (work / "dist").mkdir(exist_ok=True)
    target = work / "dist" / built_wheel().path.name
    shutil.copy2(built_wheel().path, target)
    return target
