"""``spotguard install-units``: copy the unit files shipped in the package where systemd looks.

A node that installed spotguard with pip has no checkout to copy ``systemd/`` from; the unit
files travel in the package (``spotguard.units``). Copying is idempotent: a file whose content
is already there is left alone, and only the paths written are printed, so a provisioning
script can tell whether ``systemctl daemon-reload`` is needed.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from spotguard.protocol import write_atomic

__all__ = ["UNIT_FILES", "install_units", "register"]

UNIT_FILES = (
    "spotguard-agent.service",
    "spotguard-training@.service",
    "spotguard-rendezvous.service",
)


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
        write_atomic(target, content, 0o644)
        written.append(target)
    return written


def register(commands: Any) -> None:
    units = commands.add_parser(
        "install-units", help="copy the shipped systemd unit files (prints what changed)"
    )
    units.add_argument("--dest", type=Path, default=Path("/etc/systemd/system"))
    units.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        for path in install_units(args.dest):
            print(f"installed {path}")
    except OSError as exc:
        print(
            f"spotguard install-units: cannot write to {args.dest}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    return 0
