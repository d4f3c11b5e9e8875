"""The agent's poll loop: IMDS → active notices → notice file, socket, signals → outcomes.

One thread polls and serves the registration socket (plus the metrics server and short-lived
action threads). Each tick polls the watches that are due, updates the active notices (new,
withdrawn, expired: :mod:`spotguard.agent.notices`), publishes the most urgent one, tells every
registered process of each active notice and signals it once per signalling notice, signals the
processes the selectors pick, and checks on those it signalled. Between ticks the loop serves
the socket (:mod:`spotguard.agent.registry`): a process that registers during a notice is told
and signalled at once. What it has handled is persisted in ``<state_dir>/agent-state.json`` so
a restarted agent (systemd ``Restart=always``) neither signals twice nor forgets.

Failures slow the loop down (exponential backoff up to ``max_backoff``) and never stop it: an
exception in a tick is logged and counted, and the next tick comes.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

import psutil

from spotguard.agent.actions import NoticeActions
from spotguard.agent.config import AgentConfig
from spotguard.agent.limits import raise_fd_limit
from spotguard.agent.metrics import Metrics, MetricsServer
from spotguard.agent.notices import ActiveNotices
from spotguard.agent.outcomes import Outcomes
from spotguard.agent.peers import Client
from spotguard.agent.processes import is_alive
from spotguard.agent.registry import Registry
from spotguard.agent.sd_notify import SystemdNotifier
from spotguard.agent.state import HandledNotice, HandledState, NoticeFile, prepare_state_dir
from spotguard.agent.targets import Target, TargetFinder, send_signal
from spotguard.agent.watches import watches_from_config
from spotguard.errors import ImdsBadAnswer, ImdsError, ImdsUnreachable
from spotguard.imds.client import ImdsClient
from spotguard.protocol import Notice, encode_message, format_time

__all__ = ["Agent"]

log = logging.getLogger(__name__)

#: While IMDS keeps failing, repeat the warning at most this often.
ERROR_LOG_EVERY = 60.0


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _alive(identity: str) -> bool:
    """For pruning: a process that cannot be looked at now is kept (forgetting a live one
    would signal it again)."""
    try:
        return is_alive(identity)
    except OSError:
        return True


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
        #: Watches that have answered since start: until all have, an old notice file stays.
        self._answered: set[str] = set()
        self.state = HandledState(config.state_dir / "agent-state.json")
        self.finder = TargetFinder(
            patterns=config.target_patterns,
            units=config.target_units,
            default_signal=config.target_signal,
        )
        self.registry = Registry(config.state_dir, self._on_register, clock=clock)
        self.actions = NoticeActions(config, self._action_ended)
        self.notices = ActiveNotices(config.notice_grace)
        self.notice_file = NoticeFile(config.state_dir)
        self.outcomes = Outcomes(self.metrics, config.target_watch_timeout, now, clock)
        self.failures = 0
        self._error_logged_at = -ERROR_LOG_EVERY
        self._bad_logged_at: dict[str, float] = {}

    # -- the loop -----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        prepare_state_dir(self.config.state_dir)
        raise_fd_limit()
        self.state.load()
        self.registry.open()
        # A signal (SIGTERM from systemd) wakes the socket wait at once, not at its timeout.
        in_main = threading.current_thread() is threading.main_thread()
        previous = (
            signal.set_wakeup_fd(self.registry.wakeup_fd, warn_on_full_buffer=False)
            if in_main
            else -1
        )
        server = None
        try:
            if self.config.metrics_address:
                host, port = self.config.metrics_bind()
                # A port already taken is retried in the background: polling must go on.
                server = MetricsServer(self.metrics, host, port, self.config.health_max_age)
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
            next_tick = self._clock()
            while not stop.is_set():
                started = self._clock()
                self.tick()
                next_tick = max(next_tick + self.delay(), started)
                self._wait_until(next_tick, stop)
        finally:
            self.notifier.notify("STOPPING=1")
            if in_main:
                signal.set_wakeup_fd(previous)
            if server:
                server.stop()
            self.registry.close()
            self.actions.join(timeout=1.0)
            self.client.close()
            log.info("agent stopped")

    def _wait_until(self, moment: float, stop: threading.Event) -> None:
        """Serve the socket until ``moment``, feeding the systemd watchdog when it asks."""
        interval = self.notifier.watchdog_interval
        while not stop.is_set():
            self.notifier.notify("WATCHDOG=1")
            remaining = moment - self._clock()
            if remaining <= 0:
                return
            wait = min(remaining, interval) if interval else remaining
            try:
                self.registry.serve(wait)
            except Exception:  # a bug in the socket code must not stop the polling
                log.exception("registration socket failed; polling goes on")
                stop.wait(wait)

    def delay(self) -> float:
        """Time to the next tick: the poll interval, doubled per failed tick up to the cap."""
        if self.failures == 0:
            return self.config.poll_interval
        backoff: float = self.config.poll_interval * 2.0 ** min(self.failures - 1, 30)
        return min(backoff, self.config.max_backoff)

    def tick(self) -> None:
        try:
            self._poll()
            for notice in self.notices.expire(self._now()):
                self.state.dirty = True  # records when it went inactive (kept a while)
                log.warning(
                    "notice %s expired: its deadline passed more than %.0f s ago",
                    notice.id,
                    self.config.notice_grace,
                    extra={"notice_id": notice.id},
                )
            if self._answered.issuperset(self._due) or self.notices.active:
                self.notice_file.publish(self.notices.most_urgent())
            self._tell_registered()
            self._signal_selected()
            self.outcomes.check()
            self._save_state()
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
                self.metrics.inc("spotguard_polls_total", watch=watch.name, outcome="error")
                self.metrics.inc("spotguard_imds_errors_total", reason=exc.reason)
                if isinstance(exc, ImdsBadAnswer):
                    # IMDS answered, with something this watch cannot read: this watch's
                    # state is unknown; the others, and the poll interval, go on.
                    self._due[watch.name] = now + watch.interval
                    self._bad_answer(watch.name, exc, now)
                    continue
                failed = exc
                if isinstance(exc, ImdsUnreachable):
                    break  # the rest would only time out too
                continue
            self._due[watch.name] = now + watch.interval
            self._answered.add(watch.name)
            outcome = "notice" if notice else "none"
            self.metrics.inc("spotguard_polls_total", watch=watch.name, outcome=outcome)
            for gone in self.notices.observe(watch.name, notice):
                how = "expired: its window ended" if self.notices.ended(gone, self._now()) else (
                    "withdrawn by IMDS")  # fmt: skip
                log.warning("notice %s %s", gone.id, how, extra={"notice_id": gone.id})
                self.state.dirty = True  # records when it went inactive (kept a while)
            if notice and self.notices.is_new(notice, self._now()):
                self._on_notice(notice)
        if failed is not None:
            self._on_failure(failed)
        elif polled:
            if self.failures:
                log.info("IMDS answers again after %d failed polls", self.failures)
                self._error_logged_at = -ERROR_LOG_EVERY
            self.failures = 0
            self.metrics.good_poll()

    def _bad_answer(self, watch: str, error: ImdsError, now: float) -> None:
        """Log an unreadable answer once a minute per watch (it may come every poll)."""
        if now - self._bad_logged_at.get(watch, -ERROR_LOG_EVERY) >= ERROR_LOG_EVERY:
            self._bad_logged_at[watch] = now
            log.warning("the %s watch cannot read what IMDS answers (state unknown): %s",
                        watch, error, extra={"reason": error.reason})  # fmt: skip

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
        handled = self.state.notices.get(notice.id)
        if handled:
            # Seen before (by this run or an earlier one: served again after a gap): keep its
            # detection time, do not redo actions; it is active again from now on.
            handled.inactive_since = None
            self.state.dirty = True
            notice = Notice(
                notice.kind, notice.action, notice.deadline, handled.noticed_at, notice.key
            )
        else:
            self.state.notices[notice.id] = HandledNotice(notice.noticed_at, set())
            self.state.dirty = True
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
        self.notices.add(notice)

    # -- telling and signalling ---------------------------------------------------------

    def _tell_registered(self) -> None:
        """Each active notice to every registered process (once), signals where due."""
        if not self.notices.active:
            return
        for client in self.registry.clients():
            self._tell(client)

    def _on_register(self, client: Client) -> None:
        """A process registered: tell it of the active notices (and signal it) at once; the
        state is saved at the end of the next tick."""
        self._tell(client)

    def _save_state(self) -> None:
        """Once per tick at most, when something changed: prune, then write (a failure is
        logged, and the next tick tries again)."""
        if not self.state.dirty:
            return
        registered = {client.identity for client in self.registry.clients()}
        self.state.prune(self.notices.active, lambda i: i in registered or _alive(i), self._now())
        try:
            self.state.save()
        except OSError as exc:
            self.state.dirty = True
            log.error("cannot save %s: %s", self.state.path, exc)

    def _tell(self, client: Client) -> bool:
        """Push the active notices ``client`` has not had yet, least urgent first, and send its
        signal once per signalling notice. Returns whether the handled state changed."""
        changed = False
        for notice in self.notices.by_urgency():
            if client.closed:
                break
            if notice.id not in client.pushed:
                if not self.registry.push(client, encode_message("notice", **notice.to_json())):
                    break
                client.pushed.add(notice.id)
            done = self.state.notices[notice.id].signalled
            if not notice.signals_targets or client.exit_code is not None:
                continue
            if client.identity in done:
                continue
            done.add(client.identity)
            self.state.dirty = changed = True
            self._signal_client(client, notice)
        return changed

    def _signal_client(self, client: Client, notice: Notice) -> None:
        assert client.signal is not None
        fields = {"pid": client.pid, "notice_id": notice.id, "source": "socket"}
        try:
            client.send_signal()
        except ProcessLookupError:
            self.registry.drop(client, "the registered process is gone", reply=False)
            log.info("registered process %s exited before it could be signalled", client.pid)
            return
        except OSError as exc:
            self.metrics.inc("spotguard_signals_failed_total")
            log.error("could not signal %s: %s", client.pid, exc, extra=fields)
            return
        self.outcomes.sent(client, client.signal.name, notice, "socket")

    def _signal_selected(self) -> None:
        """Signal the processes the selectors pick (registered ones are told by the socket)."""
        signalling = self.notices.signalling()
        if not signalling or not self.finder.selects:
            return
        registered = {client.pid for client in self.registry.clients()}
        targets = [t for t in self.finder.find() if t.pid not in registered]
        for notice in signalling:
            done = self.state.notices[notice.id].signalled
            for target in targets:
                if target.identity in done:
                    continue
                done.add(target.identity)
                self.state.dirty = True
                self._signal_target(target, notice)

    def _signal_target(self, target: Target, notice: Notice) -> None:
        fields = {"pid": target.pid, "notice_id": notice.id, "source": target.source}
        try:
            send_signal(target)
        except psutil.NoSuchProcess:
            log.info("target %s exited before it could be signalled", target.pid, extra=fields)
            return
        except (psutil.Error, OSError) as exc:
            self.metrics.inc("spotguard_signals_failed_total")
            log.error("could not signal %s: %s", target.pid, exc, extra=fields)
            return
        self.outcomes.sent(target, target.signal, notice, target.source)

    def _action_ended(self, action: str, ok: bool) -> None:
        self.metrics.inc("spotguard_actions_total", action=action, result="ok" if ok else "failed")
