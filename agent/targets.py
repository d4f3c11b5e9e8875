"""Processes that do not use spotguard, picked by the explicit selectors, and signalling them
without hitting a stranger.

Training processes that use spotguard register through the socket
(:mod:`spotguard.agent.registry`). For the others, a process becomes a target in one of two
ways, each explicit: its command line matches a regex in ``target_patterns``, or it runs in a
systemd unit whose name matches a glob in ``target_units`` (read from its cgroup).

Every target is pinned by pid *and* start time (:mod:`spotguard.agent.processes`), checked
again right before the signal, so a recycled PID is never hit. The agent never signals itself,
and never "all python processes".
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

from spotguard.agent.processes import identity, is_alive

__all__ = ["Target", "TargetFinder", "is_running", "send_signal"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    pid: int
    #: ``pid@start ticks@boot id``: stable across agent restarts and clock steps, distinct for
    #: a recycled PID.
    identity: str
    signal: str
    #: Why it is a target: ``pattern:<regex>`` or ``unit:<glob>``.
    source: str


def is_running(target: Target) -> bool:
    """Whether that very process (not a successor with the same PID) is still alive."""
    try:
        return is_alive(target.identity) and (
            psutil.Process(target.pid).status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False
    except OSError:  # cannot tell now: still watched
        return True


def send_signal(target: Target) -> None:
    """Signal the target if it is still the process we found; raises ``psutil.Error`` if not."""
    if not is_alive(target.identity):
        raise psutil.NoSuchProcess(target.pid, msg="PID now belongs to another process")
    psutil.Process(target.pid).send_signal(signal.Signals[target.signal])


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
        for process in psutil.process_iter(["pid", "ppid", "cmdline"]):
            pid = process.info["pid"]
            if pid == self._own_pid:
                continue
            source = self._match(pid, process.info["cmdline"] or [])
            if source:
                try:
                    who = identity(pid)
                except OSError:  # gone meanwhile, or cannot be told now: next time
                    continue
                matched[pid] = (Target(pid, who, self.default_signal, source), process.info["ppid"])
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
