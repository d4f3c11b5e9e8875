"""Ends a stopped torchrun agent whose node did not go away after all (run as a script).

:mod:`.launcher` stops torchrun's agent when its node's notice arrives, and the node is
expected to vanish within the notice's window. Should it not (a maintenance event rescheduled,
an interruption that did not happen), a stopped agent would hold the job's unit forever on a
node that trains nothing. So the worker that stops it also starts this script, detached, run
by its file path so that it imports nothing of spotguard or torch (a sleeping interpreter
of a few MiB):

``python thaw.py PID START_TICKS SECONDS``

It sleeps ``SECONDS`` (the notice's deadline plus its grace), then, if that very process (pid
*and* start time, so a recycled pid is never hit) is still stopped, sends it SIGTERM and then
SIGCONT: torchrun's agent leaves on the signal (which keeps the rendezvous open for the other
nodes), the unit ends, and systemd starts the job again, which joins as a new node. On a node
that went away, this script went with it.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil

__all__ = ["main", "start_ticks"]


def start_ticks(pid: int) -> int:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22): what
    tells a process from a later one with the same pid, and does not move with the clock."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
    return int(fields[19])  # fields after the name start at field 3


def main(argv: list[str]) -> int:
    pid, ticks, seconds = int(argv[0]), int(argv[1]), float(argv[2])
    time.sleep(seconds)
    try:
        if start_ticks(pid) != ticks or psutil.Process(pid).status() != psutil.STATUS_STOPPED:
            return 0  # gone, another process, or running again: nothing to end
        os.kill(pid, signal.SIGTERM)  # pending while it is stopped, handled as it resumes
        os.kill(pid, signal.SIGCONT)
    except (OSError, ValueError, psutil.Error):
        return 0
    print(f"spotguard: this node is still here {seconds:.0f} s after its notice: ended "
          f"torchrun's agent (pid {pid}), stopped since the notice, so that the job starts "
          "again here", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
