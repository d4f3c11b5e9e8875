"""``spotguard fleet wait-clear``: hold the training job's (re)start while a notice that stops
training is active.

The training unit restarts the job after exit 75 (``Restart=on-failure``) and runs this first
(``ExecStartPre=``). On a node that is going away (spot interruption, Auto Scaling
termination), the notice stays until the node is gone, so the job never starts again here and
the fleet's replacement resumes it. After a scheduled maintenance event that does not reboot
the node (``system-maintenance``), the agent drops the notice once the event is over, and the
job starts again on the same node and resumes from its emergency checkpoint; before this gate,
``RestartPreventExitStatus=75`` left such a node running and paid for with nothing on it.

The rule is the trainer's own: a notice of a signalling kind is active until its deadline is
more than :data:`~spotguard.protocol.NOTICE_GRACE_SECONDS` past; a rebalance recommendation
never holds the job (it does not stop training). A notice file that cannot be read is
"unknown", not "clear": the gate keeps waiting and says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from spotguard.errors import ConfigError, ProtocolError
from spotguard.protocol import NOTICE_GRACE_SECONDS, SIGNALLING_KINDS, read_notice

__all__ = ["stopping_notice", "wait_until_clear"]


def stopping_notice(state_dir: Path, now: datetime) -> str | None:
    """Why the job must not start now (a notice that stops training is active, or the notice
    file cannot be read), or ``None``. ``spotguard fleet job-end`` takes an exit 75 for a
    preemption by the same rule."""
    try:
        notice = read_notice(state_dir)
    except ProtocolError as exc:
        return f"the notice file is unreadable ({exc}); waiting for the agent to rewrite it"
    if notice is None or notice.kind not in SIGNALLING_KINDS:
        return None
    if notice.deadline and (now - notice.deadline).total_seconds() > NOTICE_GRACE_SECONDS:
        return None  # a leftover: the trainer would ignore it too
    return f"{notice.kind} notice {notice.id} is active ({notice.action})"


def wait_until_clear(
    state_dir: Path,
    *,
    interval: float = 5.0,
    say: Callable[[str], None] = print,
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Return once no notice holds the job; says why it waits, once per reason. Returns the
    number of checks that held it (0: it was clear at once). :class:`ConfigError` for an
    ``interval`` that is not > 0 (``--interval`` on the command line)."""
    if interval <= 0:
        raise ConfigError(f"interval (--interval): must be > 0 seconds, got {interval!r}")
    held, last = 0, None
    while (reason := stopping_notice(state_dir, clock())) is not None:
        if reason != last:
            say(f"spotguard fleet wait-clear: holding the job: {reason}")
            last = reason
        held += 1
        sleep(interval)
    if held:
        say("spotguard fleet wait-clear: no active notice: starting the job")
    return held
