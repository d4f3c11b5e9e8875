"""Stop intake: every way the news "this instance is going away" reaches a training process.

* a **signal**: SIGUSR1 from the agent, SIGTERM from the OS. Handlers only set a flag: no I/O,
  no collective, no save inside a handler; the save happens at the next step boundary;
* the agent's **notice file** (the only channel inside a container), watched by a thread;
* **IMDS itself**, polled by a thread where no agent runs (``imds_endpoint``);
* a **rebalance recommendation**: not a stop, an early periodic save (training goes on).

It also keeps the process's **registration** with the agent (``<state_dir>/targets/<pid>.json``
while running, an exit record when leaving) and knows the **deadline**: from the notice when
there is one (the ranks take the earliest of theirs), else ``default_budget`` seconds from
the stop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from spotguard.errors import ImdsError, ProtocolError
from spotguard.imds.client import ImdsClient
from spotguard.imds.parsers import (
    REBALANCE_PATH,
    SPOT_ACTION_PATH,
    evaluate_rebalance,
    evaluate_spot_action,
)
from spotguard.protocol import (
    ExitRecord,
    Notice,
    Registration,
    read_notice,
    register,
    unregister,
    write_exit_record,
)
from spotguard.trainer_hooks.settings import GuardSettings

__all__ = ["StopIntake"]

log = logging.getLogger("spotguard.trainer_hooks")


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
        self._registered = False
        self._create_time = psutil.Process().create_time()

    # -- set-up and tear-down -------------------------------------------------------------

    def install(self, rank: int) -> None:
        """Handle the signals, register with the agent (as ``rank``), start the watchers."""
        if threading.current_thread() is threading.main_thread():
            for name in self.settings.signals:
                signum = signal.Signals[name]
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        else:
            log.warning("not in the main thread: signals cannot be handled, relying on notices")
        if self.state_dir.is_dir():
            signal_name = self.settings.signals[0] if self.settings.signals else "SIGUSR1"
            register(
                self.state_dir, Registration(os.getpid(), self._create_time, signal_name, rank)
            )
            self._registered = True
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

    def close(self, exit_code: int | None) -> None:
        """Give the signals back and leave the agent's list (with an exit record when the
        exit code is known). The watchers must be stopped already."""
        for signum, handler in self._previous_handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous_handlers.clear()
        if self._registered:
            if exit_code is not None:
                record = ExitRecord(
                    os.getpid(), self._create_time, exit_code, datetime.now(timezone.utc)
                )
                write_exit_record(self.state_dir, record)
            unregister(self.state_dir, os.getpid())
            self._registered = False

    # -- stop requests --------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the save happens at the next step boundary, never in a handler, and a
        # second signal during the save changes nothing.
        self.request_stop(signal.Signals(signum).name)

    def request_stop(self, reason: str) -> None:
        if self.reason is None:
            self.events.setdefault("stop_requested", time.time())
            self.reason = reason

    @property
    def stop_requested(self) -> bool:
        return self.reason is not None

    def _watch_notice(self) -> None:
        path = self.state_dir / "notice.json"
        seen: tuple[int, int] | None = None
        while not self._closing.wait(self.settings.notice_poll_interval):
            try:
                stat = path.stat()
            except OSError:
                continue
            if (stat.st_mtime_ns, stat.st_size) == seen:
                continue
            seen = (stat.st_mtime_ns, stat.st_size)
            try:
                notice = read_notice(self.state_dir)
            except ProtocolError as exc:
                log.warning("ignoring unreadable notice file: %s", exc)
                continue
            if notice is not None:
                self._on_notice(notice, "notice file")

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

    def _on_notice(self, notice: Notice, source: str) -> None:
        if notice.signals_targets:
            if notice.deadline is not None:
                self._notice_deadline = notice.deadline
            if self.reason is None:
                log.warning("%s says %s: stopping at the next step", source, notice.kind)
            self.request_stop(f"{source}:{notice.kind}")
        elif not self.early_save:
            log.info("rebalance recommendation: checkpointing early, training goes on")
            self.early_save = True

    def notice_seconds_left(self) -> float | None:
        """Seconds until the instance goes away by this node's notice; ``None`` without one
        (a bare signal, or another node's notice: ranks share theirs, see ``GuardCore``)."""
        try:
            notice = read_notice(self.state_dir)
        except ProtocolError:
            notice = None
        deadline = self._notice_deadline
        if notice is not None and notice.deadline is not None and notice.signals_targets:
            deadline = notice.deadline  # the agent writes it before it signals
        if deadline is None:
            return None
        return (deadline - datetime.now(timezone.utc)).total_seconds()
