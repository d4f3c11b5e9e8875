"""What a benchmark run measured: the commit, the versions, the machine.

Why: a figure in bench/README.md is only worth keeping while it describes the product as it
is; with the commit printed above every run, a stale figure is visible as one. Every script
prints :func:`describe` first.
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

__all__ = ["describe"]

_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        result = subprocess.run(
            ["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip()


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def describe() -> str:
    """One line: UTC time, commit (``+changes`` when the tree differs from it), Python, torch,
    boto3, CPU count and load average."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+changes"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
        f"Python {platform.python_version()}, torch {_version('torch')}, "
        f"boto3 {_version('boto3')}, {os.cpu_count()} CPUs, load average {load}"
    )


if __name__ == "__main__":
    print(describe())
