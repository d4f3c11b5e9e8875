"""Ends a stopped torchrun agent whose node did not go away after all (run as a script).

:mod:`.launcher` stops torchrun's agent when a worker of a node that was told it is going away
leaves, and the node is expected to vanish. Should it not (a maintenance event rescheduled, an
interruption that did not happen), a stopped agent would hold the job's unit forever on a node
that trains nothing. So local rank 0 also starts this script, detached, run by its file path
with the standard library alone (no spotguard, no torch, no psutil: nothing that could fail
to import, and a sleeping interpreter of a few MiB)::

    python -I thaw.py PID START_TICKS SECONDS NOTICE_FILE NOTICE_ID

It sleeps ``SECONDS`` (until the notice's deadline plus its grace), then waits for as long as
``NOTICE_FILE`` still holds that notice (the agent keeps a maintenance notice until the
event's window is over: a reboot may come at any time in it), checking every
:data:`RECHECK_SECONDS`. Then, if that very process (pid *and* start time: a recycled pid is
never hit) is still stopped, it sends SIGTERM and then SIGCONT: torchrun's agent leaves on the
signal (which keeps the rendezvous open for the other nodes), the unit ends, and systemd starts
the job again, which joins as a new node. On a node that went away, this script went with it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

__all__ = ["main", "proc_stat"]

#: How often the notice file is read again once the deadline and grace are past.
RECHECK_SECONDS = 30.0


def proc_stat(pid: int) -> tuple[str, int]:
    """``pid``'s state letter (``T``: stopped) and start time in clock ticks since boot
    (``/proc/<pid>/stat`` fields 3 and 22; the start time does not move with the clock and
    tells a process from a later one with the same pid)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
    return fields[0], int(fields[19])  # the fields after the name start at field 3


def _holds(notice_file: str, notice_id: str) -> bool:
    """Whether the notice file still holds that notice (unreadable or gone: it does not)."""
    try:
        with open(notice_file) as handle:
            notice = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(notice, dict) and notice.get("id") == notice_id


def main(argv: list[str]) -> int:
    pid, ticks, seconds = int(argv[0]), int(argv[1]), float(argv[2])
    notice_file, notice_id = argv[3], argv[4]
    time.sleep(seconds)
    while _holds(notice_file, notice_id):
        time.sleep(RECHECK_SECONDS)
    try:
        state, started = proc_stat(pid)
        if started != ticks or state != "T":
            return 0  # gone, another process, or running again: nothing to end
        os.kill(pid, signal.SIGTERM)  # pending while it is stopped, handled as it resumes
        os.kill(pid, signal.SIGCONT)
    except (OSError, ValueError, IndexError):
        return 0
    print(f"spotguard: this node is still here after its notice: ended torchrun's agent "
          f"(pid {pid}), stopped since then, so that the job starts again here",
          file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
