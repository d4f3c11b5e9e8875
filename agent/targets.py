"""Processes that do not use spotguard, picked by the explicit selectors, and signalling them
without hitting a stranger.

Training processes that use spotguard register through the socket
(:mod:`spotguard.agent.registry`). For the others, a process becomes a target in one of two
ways, each explicit: its command line matches a regex in ``target_patterns``, or it runs in a
systemd unit whose name matches a glob in ``target_units`` (read from its cgroup).

Every target is pinned by pid *and* start time, checked again right before the signal, so a
recycled PID is never hit. The agent never signals itself, and never "all python processes".
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["Target", "TargetFinder", "is_running", "send_signal"]

log = logging.getLogger(__name__)

#: psutil reports start times rounded to the clock tick; allow that much slack.
CREATE_TIME_SLACK = 0.05


@dataclass(frozen=True)
class Target:
    pid: int
    create_time: float
    signal: str
    #: Why it is a target: ``pattern:<regex>`` or ``unit:<glob>``.
    source: str

    @property
    def identity(self) -> str:
        """Stable across agent restarts; distinct for a recycled PID."""
        return f"{self.pid}@{self.create_time:.2f}"


def _same_process(process: psutil.Process, create_time: float) -> bool:
    try:
        return abs(process.create_time() - create_time) <= CREATE_TIME_SLACK
    except psutil.Error:
        return False


def is_running(target: Target) -> bool:
    """Whether that very process (not a successor with the same PID) is still alive."""
    try:
        process = psutil.Process(target.pid)
        return _same_process(process, target.create_time) and (
            process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def send_signal(target: Target) -> None:
    """Signal the target if it is still the process we found; raises ``psutil.Error`` if not."""
    process = psutil.Process(target.pid)
    if not _same_process(process, target.create_time):
        raise psutil.NoSuchProcess(target.pid, msg="PID now belongs to another process")
    process.send_signal(signal.Signals[target.signal])


def units_of(pid: int, proc_root: Path = Path("/proc")) -> list[str]:
    """The systemd unit names (``*.service``, ``*.scope``) on the process's cgroup path."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    units: list[str] = []
    for line in text.splitlines():
        _, _, path = line.partition(":")
        _, _, path = path.partition(":")
        units.extend(part for part in path.split("/") if part.endswith((".service", ".scope")))
    return units


class TargetFinder:
    """Finds the selected processes. Cheap enough to run every poll while a notice is active."""

    def __init__(
        self,
        *,
        patterns: tuple[str, ...] = (),
        units: tuple[str, ...] = (),
        default_signal: str = "SIGUSR1",
        proc_root: Path = Path("/proc"),
    ) -> None:
        self.patterns = [re.compile(pattern) for pattern in patterns]
        self.units = units
        self.default_signal = default_signal
        self.proc_root = proc_root
        self._own_pid = os.getpid()

    @property
    def selects(self) -> bool:
        """Whether any selector is configured (else there is nothing to look for)."""
        return bool(self.patterns or self.units)

    def find(self) -> list[Target]:
        """Processes matched by the selectors, topmost only.

        A data-loader worker inherits its parent's command line and cgroup; signalling it
        would kill it (SIGUSR1's default action) under the trainer's feet. So a matched process
        whose parent also matched is left to its parent.
        """
        matched: dict[int, tuple[Target, int]] = {}
        for process in psutil.process_iter(["pid", "ppid", "cmdline", "create_time"]):
            pid = process.info["pid"]
            if pid == self._own_pid or process.info["create_time"] is None:
                continue
            source = self._match(pid, process.info["cmdline"] or [])
            if source:
                target = Target(pid, process.info["create_time"], self.default_signal, source)
                matched[pid] = (target, process.info["ppid"])
        return [target for target, ppid in matched.values() if ppid not in matched]

    def _match(self, pid: int, cmdline: list[str]) -> str | None:
        command = " ".join(cmdline)
        for pattern in self.patterns:
            if command and pattern.search(command):
                return f"pattern:{pattern.pattern}"
        if self.units:
            for unit in units_of(pid, self.proc_root):
                for glob in self.units:
                    if fnmatch.fnmatchcase(unit, glob):
                        return f"unit:{glob}"
        return None
