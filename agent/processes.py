"""Which process is which: an identity that survives PID reuse, agent restarts and clock steps.

A PID alone names whoever holds it now. The agent pins a process by its PID *and* its start
time, read as clock ticks since boot from ``/proc/<pid>/stat`` (field 22), plus the boot id:

* ticks since boot never move: psutil's ``create_time()`` adds the boot time the kernel derives
  from the wall clock (``btime``), so a stepped clock (NTP at boot, a VM resumed) changed every
  identity: a registrant without pidfds was then dropped as gone, and after an agent restart a
  process already signalled for a notice was signalled again;
* the boot id keeps identities saved in ``agent-state.json`` from matching a process of another
  boot that happens to have the same PID and tick count.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

__all__ = ["boot_clock", "boot_id", "current_identity", "identity", "is_alive", "start_ticks"]

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def boot_clock() -> float:
    """Seconds since boot, the clock of :func:`start_ticks` divided by ``TICKS_PER_SECOND``."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id(proc: Path = PROC) -> str:
    """This boot's random id (``unknown`` where the kernel does not expose it); it cannot
    change while the agent runs, so a successful read is kept (a failed one is not: an
    ``unknown`` kept would change every identity at the next restart)."""
    if proc in _BOOT_IDS:
        return _BOOT_IDS[proc]
    try:
        read = (proc / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"
    if not read:
        return "unknown"
    _BOOT_IDS[proc] = read
    return read


_BOOT_IDS: dict[Path, str] = {}


def start_ticks(pid: int, proc: Path = PROC) -> int:
    """When ``pid`` started, in clock ticks since boot. Raises :class:`ProcessLookupError` when
    there is no such process, :class:`OSError` when it cannot be told (no file descriptor left,
    say): unknown is not gone, or a live process would be signalled again."""
    try:
        data = (proc / str(pid) / "stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(pid) from None
    try:
        # The command name (field 2) may hold spaces and parentheses: split after the last ")".
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):  # a kernel thread mid-exit, an empty read: gone
        raise ProcessLookupError(pid) from None


def identity(pid: int, proc: Path = PROC, *, ticks: int | None = None) -> str:
    """``pid@start ticks@boot id`` (``ticks``: already read with :func:`start_ticks`);
    :class:`ProcessLookupError` when ``pid`` does not exist, :class:`OSError` when unknown."""
    if ticks is None:
        ticks = start_ticks(pid, proc)
    return f"{pid}@{ticks}@{boot_id(proc)}"


def is_alive(process_identity: str, proc: Path = PROC) -> bool:
    """Whether the process ``process_identity`` names still runs (that very process); raises
    :class:`OSError` when that cannot be told now."""
    pid, _, _ = process_identity.partition("@")
    try:
        return identity(int(pid), proc) == process_identity
    except (ProcessLookupError, ValueError):
        return False


def current_identity(saved: str) -> str | None:
    """The identity to keep for one saved in ``agent-state.json``: itself, or for one saved by
    an earlier version (``pid@psutil create time``) the current form of that process while it
    runs (an agent upgraded during a notice must not signal it a second time: the signalled
    sets are compared by identity), else ``None``."""
    pid, _, rest = saved.partition("@")
    if "@" in rest:
        return saved
    try:
        if f"{psutil.Process(int(pid)).create_time():.2f}" == f"{float(rest):.2f}":
            return identity(int(pid))
    except (psutil.Error, ValueError, OSError):
        pass
    return None
