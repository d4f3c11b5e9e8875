"""Stop intake: every way the news "this instance is going away" reaches a training process.

* a **signal**: SIGUSR1 from the agent, SIGTERM from the OS. Handlers only set a flag: no I/O,
  no collective, no save inside a handler; the save happens at the next step boundary;
* the agent's **notice file** (the only channel inside a container), watched by a thread;
* **IMDS itself**, polled by a thread where no agent runs (``imds_endpoint``);
* a **rebalance recommendation**: not a stop, an early periodic save (training goes on).

Leaving with the exit code on a node with a notice (not after a bare signal), a worker stops
torchrun's agent above it, so that a node going away neither restarts its workers nor rejoins
the rendezvous (:mod:`.launcher`).

It also keeps the process's **registration** with the agent (a connection to
``<state_dir>/agent.sock``: :mod:`.agent_link`; notices pushed down it stop training like the
file does, and the exit code is told before leaving) and knows the **deadline**: from the
notice when there is one, else ``default_budget`` seconds from the signal (the ranks take
the earliest of theirs).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from stat import S_ISREG
from types import FrameType
from typing import Any

from spotguard.errors import ImdsError, ProtocolError
from spotguard.imds.client import ImdsClient
from spotguard.imds.parsers import (
    REBALANCE_PATH,
    SPOT_ACTION_PATH,
    evaluate_rebalance,
    evaluate_spot_action,
)
from spotguard.protocol import NOTICE_GRACE_SECONDS, Notice, notice_path, read_notice
from spotguard.trainer_hooks._internals.agent_link import AgentLink, trusted_uids
from spotguard.trainer_hooks._internals.launcher import stop_torchrun_agent
from spotguard.trainer_hooks.settings import GuardSettings

__all__ = ["StopIntake"]

log = logging.getLogger("spotguard.trainer_hooks")

NOTICE_GRACE = timedelta(seconds=NOTICE_GRACE_SECONDS)


class StopIntake:
    """Signals, notices and the agent registration of one process."""

    def __init__(self, settings: GuardSettings, state_dir: Path) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.reason: str | None = None
        #: A rebalance recommendation asked for an early periodic save (cleared by the saver).
        self.early_save = False
        #: Wall-clock times (``time.time()``) of the preemption path on this rank.
        self.events: dict[str, float] = {}
        self._notice_deadline: datetime | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._watchers: list[threading.Thread] = []
        self._closing = threading.Event()
        self._link: AgentLink | None = None
        #: When this process itself was told to stop (``time.monotonic()``).
        self._own_stop_at: float | None = None
        self._stale_told: set[str] = set()
        #: The notice that this node is going away, once it arrived.
        self._node_notice: Notice | None = None

    # -- set-up and tear-down -------------------------------------------------------------

    def install(self, rank: int) -> None:
        """Handle the signals, register with the agent (as ``rank``), start the watchers."""
        if threading.current_thread() is threading.main_thread():
            for name in self.settings.signals:
                signum = signal.Signals[name]
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        else:
            log.warning("not in the main thread: signals cannot be handled, relying on notices")
        signal_name = self.settings.signals[0] if self.settings.signals else "SIGUSR1"
        self._link = AgentLink(self.state_dir, signal_name, rank, self._on_agent_notice)
        self._link.start()
        self._closing.clear()
        self._watchers = [
            threading.Thread(target=self._watch_notice, name="spotguard-notice", daemon=True)
        ]
        if self.settings.imds_endpoint:
            self._watchers.append(
                threading.Thread(
                    target=self._watch_imds,
                    args=(self.settings.imds_endpoint,),
                    name="spotguard-imds",
                    daemon=True,
                )
            )
        for watcher in self._watchers:
            watcher.start()

    def reinstall_signal_handlers(self) -> None:
        """Take the signals back from a framework that replaced our handlers."""
        if threading.current_thread() is threading.main_thread():
            for name in self.settings.signals:
                signal.signal(signal.Signals[name], self._on_signal)

    def stop_watchers(self) -> None:
        self._closing.set()
        for watcher in self._watchers:
            watcher.join()
        self._watchers = []

    def close(self, exit_code: int | None, step: int | None = None) -> None:
        """Give the signals back and leave the agent (telling it the exit code and step when
        they are known); leaving with the exit code on a node that is going away, stop
        torchrun's agent first (:mod:`.launcher`). The watchers must be stopped already."""
        if exit_code is not None and exit_code == self.settings.exit_code:
            notice = self._leaving_notice()
            if notice is not None:
                stop_torchrun_agent(notice, notice_path(self.state_dir))
        for signum, handler in self._previous_handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous_handlers.clear()
        if self._link is not None:
            self._link.close(exit_code, step)
            self._link = None

    # -- stop requests --------------------------------------------------------------------

    def _leaving_notice(self) -> Notice | None:
        """This node's notice that it is going away: the one this process saw, or one the
        agent has written since (this process may have stopped for another rank first)."""
        if self._node_notice is not None:
            return self._node_notice
        try:
            notice = self._read_notice_file()
        except ProtocolError:
            return None
        if notice is None or not notice.signals_targets:
            return None
        if (
            notice.deadline is not None
            and datetime.now(timezone.utc) > notice.deadline + NOTICE_GRACE
        ):
            return None  # a leftover
        return notice

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the save happens at the next step boundary, never in a handler, and a
        # second signal during the save changes nothing.
        self.request_stop(signal.Signals(signum).name)

    def request_stop(self, reason: str, *, own: bool = True) -> None:
        """Stop at the next step boundary. ``own``: this process was told (a signal, a
        notice), not merely following another rank: its budget runs from now."""
        if own and self._own_stop_at is None:
            self._own_stop_at = time.monotonic()
        if self.reason is None:
            self.events.setdefault("stop_requested", time.time())
            self.reason = reason

    @property
    def stop_requested(self) -> bool:
        return self.reason is not None

    def _watch_notice(self) -> None:
        path = notice_path(self.state_dir)
        seen: tuple[int, int] | None = None
        while not self._closing.wait(self.settings.notice_poll_interval):
            try:
                stat = path.lstat()
            except OSError:
                continue
            if (stat.st_mtime_ns, stat.st_size) == seen:
                continue
            seen = (stat.st_mtime_ns, stat.st_size)
            try:
                notice = self._read_notice_file()
            except ProtocolError as exc:
                log.warning("ignoring the notice file: %s", exc)
                continue
            if notice is not None:
                self._on_notice(notice, "notice file")

    def _read_notice_file(self) -> Notice | None:
        """The notice file, if the agent wrote it: a regular file of a trusted uid (root,
        this user, the owner of a state dir only they control: see ``trusted_uids``); a
        file anyone else could place must not stop training."""
        path = notice_path(self.state_dir)
        try:
            stat = path.lstat()
        except OSError:
            return None
        if not S_ISREG(stat.st_mode) or stat.st_uid not in trusted_uids(self.state_dir):
            raise ProtocolError(f"{path} is not a regular file of the agent's (uid {stat.st_uid})")
        return read_notice(self.state_dir)

    def _watch_imds(self, endpoint: str) -> None:
        """Poll IMDS from the training process itself, for nodes where no agent runs."""
        watches = (
            (SPOT_ACTION_PATH, evaluate_spot_action),
            (REBALANCE_PATH, evaluate_rebalance),
        )
        client = ImdsClient(endpoint, timeout=1.0)
        failures = 0
        try:
            while not self._closing.wait(self.settings.imds_poll_interval):
                for path, evaluate in watches:
                    try:
                        notice = evaluate(client.get(path), datetime.now(timezone.utc))
                    except ImdsError as exc:
                        failures += 1
                        if failures in (1, 60) or failures % 600 == 0:  # not one line a poll
                            log.warning("IMDS gave no usable answer (%d times): %s", failures, exc)
                        break
                    failures = 0
                    if notice is not None:
                        self._on_notice(notice, "IMDS")
        finally:
            client.close()

    def _on_agent_notice(self, notice: Notice) -> None:
        self._on_notice(notice, "the agent")

    def _on_notice(self, notice: Notice, source: str) -> None:
        now = datetime.now(timezone.utc)
        if notice.deadline is not None and now > notice.deadline + NOTICE_GRACE:
            if notice.id not in self._stale_told:  # a leftover, not news: told once
                self._stale_told.add(notice.id)
                log.warning("%s holds %s, whose deadline passed more than %.0f s ago: "
                            "ignored", source, notice.id, NOTICE_GRACE.total_seconds())  # fmt: skip
            return
        if notice.signals_targets:
            if notice.deadline is not None:
                self._notice_deadline = notice.deadline
            if self.reason is None:
                log.warning("%s says %s: stopping at the next step", source, notice.kind)
            self._node_notice = notice
            self.request_stop(f"{source}:{notice.kind}")
        elif not self.early_save:
            log.info("rebalance recommendation: checkpointing early, training goes on")
            self.early_save = True

    def own_seconds_left(self) -> float | None:
        """Seconds this process has by what it was told: its node's notice deadline, else
        ``default_budget`` from the moment a bare signal arrived; ``None`` when it was told
        nothing itself (it follows another rank, whose time governs: see ``GuardCore``)."""
        left = self._notice_seconds_left()
        if left is not None:
            return left
        if self._own_stop_at is None:
            return None
        return self.settings.default_budget - (time.monotonic() - self._own_stop_at)

    def _notice_seconds_left(self) -> float | None:
        """Seconds until the instance goes away by this node's notice; ``None`` without one."""
        try:
            notice = self._read_notice_file()
        except ProtocolError:
            notice = None
        deadline = self._notice_deadline
        if notice is not None and notice.deadline is not None and notice.signals_targets:
            deadline = notice.deadline  # the agent writes it before it signals
        if deadline is None:
            return None
        return (deadline - datetime.now(timezone.utc)).total_seconds()
