"""Keep torchrun's agent on a node that is going away from restarting its workers.

Under torchrun (``TORCHELASTIC_RUN_ID`` is set) a worker that exits 75 is a *failed* worker to
torch's elastic agent: it restarts the worker group after a new rendezvous, on this node too.
On a node that was told it is going away, that is wrong twice over: the node rejoins the
rendezvous it is about to vanish from (the survivors' new group then counts it and breaks when
it goes), and its new workers load a checkpoint to train for seconds. And an agent that gives
up instead (no restarts left) closes the rendezvous for every node.

So when this node's notice arrives, the worker stops (SIGSTOP) the torchrun agent above it,
before any worker leaves: a stopped agent neither sees its workers exit nor restarts them, and
never rejoins. Its workers go on, save and exit 75 as everywhere; the other nodes' agents
restart theirs and re-form without this node once its rendezvous heartbeat is stale. The
instance then goes away with the agent stopped (a shutdown's SIGTERM, followed by systemd's
SIGCONT, ends it with a signal, which leaves the rendezvous open).

Only a notice does this, never a bare signal: torchrun's own agent SIGTERMs its workers when
it restarts them (a node joined), and that node stays.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import psutil

__all__ = ["stop_torchrun_agent"]

log = logging.getLogger("spotguard.trainer_hooks")

#: Set by torchrun (torch's elastic launcher) in every worker's environment.
RUN_ID_VARIABLE = "TORCHELASTIC_RUN_ID"
#: The module ``torchrun`` runs (the console script, or ``python -m torch.distributed.run``).
_LAUNCHER_MODULE = "torch.distributed.run"


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


def stop_torchrun_agent() -> int | None:
    """Stop (SIGSTOP) the torchrun agent above this worker; its pid, or ``None`` when there
    is none or it could not be stopped (said in the log: the agent then restarts workers
    here, which costs a restart, not the run)."""
    agent = torchrun_agent()
    if agent is None:
        if RUN_ID_VARIABLE in os.environ:
            log.warning("under torchrun but no torchrun agent among this process's ancestors: "
                        "it may restart workers on this node")  # fmt: skip
        return None
    try:
        agent.send_signal(signal.SIGSTOP)
    except psutil.Error as exc:
        log.warning("cannot stop torchrun's agent (pid %d): %s; it may restart workers on "
                    "this node", agent.pid, exc)  # fmt: skip
        return None
    log.warning("this node is going away: stopped torchrun's agent (pid %d) so that it neither "
                "restarts workers here nor rejoins the rendezvous", agent.pid)  # fmt: skip
    return agent.pid
