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
it restarts them (a node joined), and that node stays. Should the node stay after all (an
event rescheduled), :mod:`.thaw`, started detached, ends the stopped agent once the notice's
deadline and grace are past, so that systemd starts the job again and it rejoins.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import psutil

from spotguard.protocol import NOTICE_GRACE_SECONDS, SPOT_NOTICE_SECONDS
from spotguard.trainer_hooks._internals import thaw

__all__ = ["stop_torchrun_agent"]

log = logging.getLogger("spotguard.trainer_hooks")

#: Set by torchrun (torch's elastic launcher) in every worker's environment.
RUN_ID_VARIABLE = "TORCHELASTIC_RUN_ID"
#: The thaw scripts started (kept: this process exits long before they end).
_THAWS: list[subprocess.Popen[bytes]] = []
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


def _first_to_stop(pid: int, ticks: int) -> bool:
    """Whether this worker is the first of its node to stop that agent (every worker with the
    notice stops it, one starts the thaw): a file created exclusively, named by the agent's
    identity; ``True`` when it cannot be made (a second thaw is harmless)."""
    marker = Path(tempfile.gettempdir()) / f"spotguard-stopped-torchrun-{pid}-{ticks}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


def stop_torchrun_agent(deadline: datetime | None) -> int | None:
    """Stop (SIGSTOP) the torchrun agent above this worker, and have it ended after the notice
    (``deadline``, when the node is due to go; ``None``: a spot notice's two minutes from now)
    and its grace should the node still be here; the agent's pid, or ``None`` when there is
    none or it could not be stopped (said in the log: the agent then restarts workers here,
    which costs a restart, not the run)."""
    agent = torchrun_agent()
    if agent is None:
        if RUN_ID_VARIABLE in os.environ:
            log.warning("under torchrun but no torchrun agent among this process's ancestors: "
                        "it may restart workers on this node")  # fmt: skip
        return None
    try:
        ticks = thaw.start_ticks(agent.pid)
        agent.send_signal(signal.SIGSTOP)
    except (OSError, ValueError, psutil.Error) as exc:
        log.warning("cannot stop torchrun's agent (pid %d): %s; it may restart workers on "
                    "this node", agent.pid, exc)  # fmt: skip
        return None
    if not _first_to_stop(agent.pid, ticks):
        return agent.pid  # another worker of this node stopped it and started the thaw
    now = datetime.now(timezone.utc)
    left = SPOT_NOTICE_SECONDS if deadline is None else (deadline - now).total_seconds()
    seconds = max(left + NOTICE_GRACE_SECONDS, 0.0)
    # -I: not the script's folder on sys.path (its neighbours are this package's modules)
    _THAWS.append(subprocess.Popen(
        [sys.executable, "-I", thaw.__file__, str(agent.pid), str(ticks), f"{seconds:.1f}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
    ))  # fmt: skip
    log.warning("this node is going away: stopped torchrun's agent (pid %d) so that it neither "
                "restarts workers here nor rejoins the rendezvous (ended in %.0f s should the "
                "node still be here)", agent.pid, seconds)  # fmt: skip
    return agent.pid
