"""``spotguard install-units``: put the unit files shipped in the package where systemd looks.

A node that installed spotguard with pip has no checkout to copy ``systemd/`` from; the unit
files travel in the package (``spotguard.units``). Copying is idempotent: a file whose content
is already there is left alone, and only the paths written are printed, so a provisioning
script can tell whether ``systemctl daemon-reload`` is needed.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from pathlib import Path

__all__ = ["UNIT_FILES", "install_units"]

UNIT_FILES = ("spotguard-agent.service", "spotguard-training@.service")


def install_units(dest: Path) -> list[Path]:
    """Copy the unit files into ``dest``; returns the files that changed."""
    source = resources.files("spotguard.units")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in UNIT_FILES:
        content = source.joinpath(name).read_bytes()
        target = dest / name
        if target.exists() and target.read_bytes() == content:
            continue
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        written.append(target)
    return written
