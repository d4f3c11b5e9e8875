"""The agent's poll loop: IMDS → notice file → signals → watch the targets exit.

One thread polls (plus the metrics server and short-lived action threads). Each tick polls the
watches that are due, publishes the most urgent notice, signals every target that has not yet
been signalled for each active notice, and checks on the targets it signalled. What it has
handled is persisted in ``<state_dir>/agent-state.json`` so a restarted agent (systemd
``Restart=always``) neither signals twice nor forgets.

Failures slow the loop down (exponential backoff up to ``max_backoff``) and never stop it: an
exception in a tick is logged and counted, and the next tick comes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from spotguard.agent.actions import NoticeActions
from spotguard.agent.config import AgentConfig
from spotguard.agent.metrics import Metrics, MetricsServer
from spotguard.agent.sd_notify import SystemdNotifier
from spotguard.agent.targets import Target, TargetFinder, is_running, send_signal
from spotguard.agent.watches import watches_from_config
from spotguard.errors import ConfigError, ImdsError, ImdsUnreachable, ProtocolError
from spotguard.imds.client import ImdsClient
from spotguard.protocol import (
    Notice,
    format_time,
    parse_time,
    read_exit_record,
    write_json_atomic,
    write_notice,
)

__all__ = ["Agent", "prepare_state_dir"]

log = logging.getLogger(__name__)

#: While IMDS keeps failing, repeat the warning at most this often.
ERROR_LOG_EVERY = 60.0


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def prepare_state_dir(state_dir: Path) -> None:
    """Create the state dir; ``targets/`` and ``exits/`` are sticky and world-writable.

    Training often runs as an unprivileged user while the agent runs as root: like ``/tmp``,
    anyone may add a file there but only its owner may remove it, and the agent only honours a
    registration whose owner owns the process (see :mod:`spotguard.agent.targets`).
    """
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        for shared in ("targets", "exits"):
            path = state_dir / shared
            path.mkdir(exist_ok=True)
            os.chmod(path, 0o1777)  # noqa: S103 - sticky, like /tmp; see the docstring
        probe = state_dir / ".writable"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"state_dir: cannot use {state_dir}: {exc.strerror}") from None


@dataclass
class HandledNotice:
    """What the agent did about one notice; persisted across restarts."""

    noticed_at: datetime
    signalled: set[str]


class HandledState:
    """``agent-state.json``: the notices handled and the targets signalled for each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.notices: dict[str, HandledNotice] = {}

    def load(self) -> None:
        if not self.path.exists():
            return
        try:
            payload = json.loads(self.path.read_text(encoding="utf-8"))
            self.notices = {
                notice_id: HandledNotice(
                    noticed_at=parse_time(entry["noticed_at"]),
                    signalled=set(entry["signalled"]),
                )
                for notice_id, entry in payload["notices"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = self.path.with_suffix(".corrupt")
            self.path.replace(aside)
            log.error(
                "state file %s is unreadable (%s); moved to %s, starting afresh: targets may be "
                "signalled again for a notice already handled",
                self.path,
                type(exc).__name__,
                aside,
            )

    def save(self) -> None:
        payload: dict[str, Any] = {
            "version": 1,
            "notices": {
                notice_id: {
                    "noticed_at": format_time(entry.noticed_at),
                    "signalled": sorted(entry.signalled),
                }
                for notice_id, entry in self.notices.items()
            },
        }
        write_json_atomic(self.path, payload, mode=0o600)


@dataclass
class Watched:
    target: Target
    notice_id: str
    signalled_at: float
    deadline: float


class Agent:
    """The daemon. ``run()`` blocks until ``stop`` is set; ``tick()`` is one iteration."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        client: ImdsClient | None = None,
        metrics: Metrics | None = None,
        notifier: SystemdNotifier | None = None,
        now: Callable[[], datetime] = utc_now,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.client = client or ImdsClient(
            config.imds_endpoint, token_ttl=config.token_ttl, timeout=config.request_timeout
        )
        self.metrics = metrics or Metrics(clock)
        self.notifier = notifier or SystemdNotifier()
        self._now = now
        self._clock = clock
        self.watches = watches_from_config(config)
        self._due = {watch.name: 0.0 for watch in self.watches}
        self.state = HandledState(config.state_dir / "agent-state.json")
        self.finder = TargetFinder(
            config.state_dir,
            patterns=config.target_patterns,
            units=config.target_units,
            default_signal=config.target_signal,
        )
        self.actions = NoticeActions(config, self._action_ended)
        self.active: dict[str, Notice] = {}
        self.published: Notice | None = None
        self.watched: dict[str, Watched] = {}
        self.failures = 0
        self._error_logged_at = -ERROR_LOG_EVERY
        self._problems_logged: set[str] = set()

    # -- the loop -----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        prepare_state_dir(self.config.state_dir)
        self.state.load()
        server = None
        if self.config.metrics_address:
            host, port = self.config.metrics_bind()
            try:
                server = MetricsServer(self.metrics, host, port, self.config.health_max_age)
            except OSError as exc:
                raise ConfigError(
                    f"metrics_address: cannot listen on {self.config.metrics_address}: "
                    f"{exc.strerror}"
                ) from None
            server.start()
        log.info(
            "agent started",
            extra={
                "imds_endpoint": self.config.imds_endpoint,
                "state_dir": str(self.config.state_dir),
                "poll_interval": self.config.poll_interval,
                "watches": ",".join(watch.name for watch in self.watches),
            },
        )
        self.notifier.notify("READY=1")
        try:
            next_tick = self._clock()
            while not stop.is_set():
                started = self._clock()
                self.tick()
                next_tick = max(next_tick + self.delay(), started)
                self._wait_until(next_tick, stop)
        finally:
            self.notifier.notify("STOPPING=1")
            if server:
                server.stop()
            self.actions.join(timeout=1.0)
            self.client.close()
            log.info("agent stopped")

    def _wait_until(self, moment: float, stop: threading.Event) -> None:
        """Sleep until ``moment``, waking to feed the systemd watchdog when it asks for it."""
        interval = self.notifier.watchdog_interval
        while not stop.is_set():
            self.notifier.notify("WATCHDOG=1")
            remaining = moment - self._clock()
            if remaining <= 0:
                return
            stop.wait(min(remaining, interval) if interval else remaining)

    def delay(self) -> float:
        """Time to the next tick: the poll interval, doubled per failed tick up to the cap."""
        if self.failures == 0:
            return self.config.poll_interval
        backoff: float = self.config.poll_interval * 2.0 ** min(self.failures - 1, 30)
        return min(backoff, self.config.max_backoff)

    def tick(self) -> None:
        try:
            self._poll()
            self._signal_targets()
            self._check_watched()
        except Exception:  # the agent must outlive any bug in one tick
            self.failures += 1
            self.metrics.inc("spotguard_imds_errors_total", reason="internal")
            log.exception("tick failed; continuing")

    # -- polling ------------------------------------------------------------------------

    def _poll(self) -> None:
        now = self._clock()
        # Half a poll interval of slack: a tick that wakes a little earlier than the previous
        # one must not skip a watch that is due "now" and double its effective interval.
        horizon = now + self.config.poll_interval / 2
        failed: ImdsError | None = None
        polled = 0
        for watch in self.watches:
            if self._due[watch.name] > horizon:
                continue
            polled += 1
            try:
                notice = watch.evaluate(self.client.get(watch.path), self._now())
            except ImdsError as exc:
                failed = exc
                self.metrics.inc("spotguard_polls_total", watch=watch.name, outcome="error")
                self.metrics.inc("spotguard_imds_errors_total", reason=exc.reason)
                if isinstance(exc, ImdsUnreachable):
                    break  # the rest would only time out too
                continue
            self._due[watch.name] = now + watch.interval
            outcome = "notice" if notice else "none"
            self.metrics.inc("spotguard_polls_total", watch=watch.name, outcome=outcome)
            if notice:
                self._on_notice(notice)
        if failed is not None:
            self._on_failure(failed)
        elif polled:
            if self.failures:
                log.info("IMDS answers again after %d failed polls", self.failures)
                self._error_logged_at = -ERROR_LOG_EVERY
            self.failures = 0
            self.metrics.good_poll()

    def _on_failure(self, error: ImdsError) -> None:
        self.failures += 1
        now = self._clock()
        if now - self._error_logged_at >= ERROR_LOG_EVERY:
            self._error_logged_at = now
            log.warning(
                "IMDS gave no usable answer: %s (state unknown; retrying with backoff)",
                error,
                extra={"reason": error.reason, "failures": self.failures},
            )

    def _on_notice(self, notice: Notice) -> None:
        if notice.id in self.active:
            return
        handled = self.state.notices.get(notice.id)
        if handled:
            # Seen by an earlier run of the agent: keep its detection time, do not redo actions.
            notice = Notice(
                notice.kind, notice.action, notice.deadline, handled.noticed_at, notice.key
            )
        else:
            self.state.notices[notice.id] = HandledNotice(notice.noticed_at, set())
            self.state.save()
            lead = (
                (notice.deadline - notice.noticed_at).total_seconds() if notice.deadline else None
            )
            self.metrics.inc("spotguard_notices_total", kind=notice.kind)
            if lead is not None:
                self.metrics.set("spotguard_notice_lead_time_seconds", lead, kind=notice.kind)
            log.warning(
                "notice: %s (%s), deadline %s",
                notice.kind,
                notice.action,
                format_time(notice.deadline) if notice.deadline else "unknown",
                extra={"notice_id": notice.id, "lead_seconds": lead},
            )
            self.actions.start(notice)
        self.active[notice.id] = notice
        most_urgent = min(self.active.values(), key=lambda n: n.urgency)
        if most_urgent is not self.published:
            write_notice(self.config.state_dir, most_urgent)
            self.published = most_urgent

    # -- signalling ---------------------------------------------------------------------

    def _signal_targets(self) -> None:
        signalling = [notice for notice in self.active.values() if notice.signals_targets]
        if not signalling:
            return
        targets, problems = self.finder.find()
        for problem in problems:
            if problem not in self._problems_logged:
                self._problems_logged.add(problem)
                log.warning("target registration: %s", problem)
        changed = False
        for notice in signalling:
            done = self.state.notices[notice.id].signalled
            for target in targets:
                if target.identity in done:
                    continue
                done.add(target.identity)
                changed = True
                self._signal(target, notice)
        if changed:
            self.state.save()

    def _signal(self, target: Target, notice: Notice) -> None:
        fields = {"pid": target.pid, "notice_id": notice.id, "source": target.source}
        try:
            send_signal(target)
        except psutil.NoSuchProcess:
            log.info("target %s exited before it could be signalled", target.pid, extra=fields)
            return
        except psutil.Error as exc:
            self.metrics.inc("spotguard_signals_failed_total")
            log.error("could not signal %s: %s", target.pid, exc, extra=fields)
            return
        self.metrics.inc("spotguard_signals_sent_total")
        log.warning("sent %s to pid %s", target.signal, target.pid, extra=fields)
        now = self._clock()
        if notice.deadline:
            remaining = (notice.deadline - self._now()).total_seconds()
        else:
            remaining = self.config.target_watch_timeout
        self.watched[target.identity] = Watched(target, notice.id, now, now + max(remaining, 0))

    def _check_watched(self) -> None:
        now = self._clock()
        for identity, entry in list(self.watched.items()):
            target = entry.target
            fields = {"pid": target.pid, "notice_id": entry.notice_id}
            elapsed = now - entry.signalled_at
            if not is_running(target):
                del self.watched[identity]
                try:
                    record = read_exit_record(self.config.state_dir, target.pid, target.create_time)
                except ProtocolError as exc:
                    log.warning("exit record unreadable: %s", exc, extra=fields)
                    record = None
                code = str(record.exit_code) if record else "unknown (no exit record)"
                log.info(
                    "target %s exited %.1f s after the signal, exit code %s, %.1f s before "
                    "the deadline",
                    target.pid,
                    elapsed,
                    code,
                    entry.deadline - now,
                    extra={**fields, "exit_code": record.exit_code if record else None},
                )
            elif now >= entry.deadline:
                del self.watched[identity]
                log.error(
                    "target %s still running at the deadline, %.1f s after the signal",
                    target.pid,
                    elapsed,
                    extra=fields,
                )
        self.metrics.set("spotguard_targets_running", len(self.watched))

    def _action_ended(self, action: str, ok: bool) -> None:
        self.metrics.inc("spotguard_actions_total", action=action, result="ok" if ok else "failed")
