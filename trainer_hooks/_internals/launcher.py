"""Keep torchrun's agent on a node that is going away from restarting its workers.

Under torchrun (``TORCHELASTIC_RUN_ID`` is set) a worker that exits 75 is a *failed* worker to
torch's elastic agent: it restarts the worker group after a new rendezvous, on this node too.
On a node that was told it is going away, that is wrong twice over: the node rejoins the
rendezvous it is about to vanish from (the survivors' new group then counts it and breaks when
it goes), and its new workers load a checkpoint to train for seconds. And an agent that gives
up instead (no restarts left) closes the rendezvous for every node.

So a worker of a node with a notice stops (SIGSTOP) the torchrun agent above it right before
it exits, after the emergency save: a stopped agent neither sees its workers exit nor restarts
them, and never rejoins. Not earlier: a stopped agent's rendezvous heartbeat goes stale, and
a node waiting to join would then make the other nodes' agents restart their workers in the
middle of the save. The other nodes' agents restart theirs and re-form without this node. The
instance then goes away with the agent stopped (a shutdown's SIGTERM, followed by systemd's
SIGCONT, ends it with a signal, which leaves the rendezvous open).

Only a notice does this, never a bare signal: torchrun's own agent SIGTERMs its workers when
it restarts them (a node joined), and that node stays. Should the node stay after all (an
event rescheduled), :mod:`.thaw`, started detached by local rank 0, ends the stopped agent once
the notice's deadline and grace are past and the agent no longer holds the notice, so that
systemd starts the job again and it rejoins.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from spotguard.protocol import NOTICE_GRACE_SECONDS, SPOT_NOTICE_SECONDS, Notice
from spotguard.trainer_hooks._internals import thaw

__all__ = ["stop_torchrun_agent"]

log = logging.getLogger("spotguard.trainer_hooks")

#: Set by torchrun (torch's elastic launcher) in every worker's environment.
RUN_ID_VARIABLE = "TORCHELASTIC_RUN_ID"
#: The module ``torchrun`` runs (the console script, or ``python -m torch.distributed.run``).
_LAUNCHER_MODULE = "torch.distributed.run"
#: How long a SIGSTOP may take to show in /proc before it counts as ignored.
STOP_CHECK_SECONDS = 1.0
#: The thaw scripts started (kept: this process exits long before they end).
_THAWS: list[subprocess.Popen[bytes]] = []


def _is_torchrun(argv: list[str]) -> bool:
    """Whether ``argv`` runs torch's elastic launcher: the ``torchrun`` script (run by its
    interpreter: ``python .../bin/torchrun``) or ``python [flags] -m torch.distributed.run``."""
    if any(Path(arg).name == "torchrun" for arg in argv[:2]):
        return True
    module = argv.index(_LAUNCHER_MODULE) if _LAUNCHER_MODULE in argv else 0
    return module > 0 and argv[module - 1] == "-m"


def torchrun_agent() -> psutil.Process | None:
    """The torchrun agent this process runs under: the nearest ancestor that is torch's
    launcher (a shell or wrapper may sit between); ``None`` outside torchrun."""
    if RUN_ID_VARIABLE not in os.environ:
        return None
    try:
        for ancestor in psutil.Process().parents():
            if _is_torchrun(ancestor.cmdline()):
                return ancestor
    except psutil.Error:
        return None
    return None


def _stopped(pid: int) -> bool:
    """Whether ``pid`` shows as stopped within :data:`STOP_CHECK_SECONDS`. The kernel drops a
    SIGSTOP to the first process of a PID namespace (torchrun as a container's entrypoint)
    without an error: only /proc tells."""
    give_up = time.monotonic() + STOP_CHECK_SECONDS
    while True:
        if thaw.proc_stat(pid)[0] == "T":
            return True
        if time.monotonic() > give_up:
            return False
        time.sleep(0.005)


def stop_torchrun_agent(notice: Notice, notice_file: Path) -> int | None:
    """Stop (SIGSTOP) the torchrun agent above this worker, whose node has ``notice`` (as
    ``notice_file`` holds it); on local rank 0, also start the thaw that ends the agent should
    the node still be here once the notice is over. The agent's pid, or ``None`` when there is
    none or it could not be stopped (said in the log: it then restarts workers on this node)."""
    agent = torchrun_agent()
    if agent is None:
        if RUN_ID_VARIABLE in os.environ:
            log.warning("under torchrun but no torchrun agent among this process's ancestors: "
                        "it may restart workers on this node")  # fmt: skip
        return None
    try:
        ticks = thaw.proc_stat(agent.pid)[1]
        agent.send_signal(signal.SIGSTOP)
        stopped = _stopped(agent.pid)
    except (OSError, ValueError, IndexError, psutil.Error) as exc:
        log.error("cannot stop torchrun's agent (pid %d): %s; it will restart workers on this "
                  "node and rejoin the rendezvous", agent.pid, exc)  # fmt: skip
        return None
    if not stopped:
        log.error("torchrun's agent (pid %d) ignored SIGSTOP (the first process of a PID "
                  "namespace does: start the container with an init, e.g. docker run --init); "
                  "it will restart workers on this node and rejoin the rendezvous",
                  agent.pid)  # fmt: skip
        return None
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return agent.pid  # local rank 0 starts the one thaw of this node
    now = datetime.now(timezone.utc)
    deadline = notice.deadline
    left = SPOT_NOTICE_SECONDS if deadline is None else (deadline - now).total_seconds()
    seconds = max(left + NOTICE_GRACE_SECONDS, 0.0)
    # -I: not the script's folder on sys.path (its neighbours are this package's modules)
    _THAWS.append(subprocess.Popen(
        [sys.executable, "-I", thaw.__file__, str(agent.pid), str(ticks), f"{seconds:.1f}",
         str(notice_file), notice.id],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
    ))  # fmt: skip
    log.warning("this node is going away: stopped torchrun's agent (pid %d) so that it neither "
                "restarts workers here nor rejoins the rendezvous (ended after %.0f s and the "
                "notice's end should the node still be here)", agent.pid, seconds)  # fmt: skip
    return agent.pid
