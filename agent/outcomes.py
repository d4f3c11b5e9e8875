"""What became of the processes the agent signalled: each is watched until it is gone (logged
with the exit code it reported over the socket, where it did) or the notice's deadline passes
(logged as an error: it would have been killed with its work unsaved)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from spotguard.agent.metrics import Metrics
from spotguard.agent.peers import Client
from spotguard.agent.targets import Target, is_running
from spotguard.protocol import Notice

__all__ = ["Outcomes"]

log = logging.getLogger("spotguard.agent.daemon")


@dataclass
class Watched:
    """A signalled process: a registered one (``client``) or one a selector picked."""

    pid: int
    notice_id: str
    signalled_at: float
    deadline: float
    who: Client | Target

    def running(self) -> bool:
        if isinstance(self.who, Client):
            return not self.who.closed
        return is_running(self.who)


class Outcomes:
    """The signalled processes, keyed by identity (pid and start time)."""

    def __init__(
        self,
        metrics: Metrics,
        watch_timeout: float,
        now: Callable[[], datetime],
        clock: Callable[[], float],
    ) -> None:
        self.metrics = metrics
        self.watch_timeout = watch_timeout
        self._now = now
        self._clock = clock
        self.watched: dict[str, Watched] = {}

    def sent(self, who: Client | Target, signal_name: str, notice: Notice, source: str) -> None:
        """Count and log a signal sent, and watch its receiver until the notice's deadline (or
        ``target_watch_timeout`` when the notice has none)."""
        fields = {"pid": who.pid, "notice_id": notice.id, "source": source}
        self.metrics.inc("spotguard_signals_sent_total")
        log.warning("sent %s to pid %s", signal_name, who.pid, extra=fields)
        now = self._clock()
        if notice.deadline:
            remaining = (notice.deadline - self._now()).total_seconds()
        else:
            remaining = self.watch_timeout
        self.watched[who.identity] = Watched(who.pid, notice.id, now, now + max(remaining, 0), who)

    def check(self) -> None:
        now = self._clock()
        for identity, entry in list(self.watched.items()):
            fields = {"pid": entry.pid, "notice_id": entry.notice_id}
            elapsed = now - entry.signalled_at
            if not entry.running():
                del self.watched[identity]
                code = entry.who.exit_code if isinstance(entry.who, Client) else None
                log.info(
                    "target %s exited %.1f s after the signal, exit code %s, %.1f s before "
                    "the deadline",
                    entry.pid,
                    elapsed,
                    "unknown (not reported)" if code is None else code,
                    entry.deadline - now,
                    extra={**fields, "exit_code": code},
                )
            elif now >= entry.deadline:
                del self.watched[identity]
                log.error(
                    "target %s still running at the deadline, %.1f s after the signal",
                    entry.pid,
                    elapsed,
                    extra=fields,
                )
        self.metrics.set("spotguard_targets_running", len(self.watched))
