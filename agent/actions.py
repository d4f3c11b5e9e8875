"""Optional per-notice actions: a local hook command and a webhook POST.

Both run in background threads so that a slow hook or an unreachable webhook never delays the
signal to the training processes, which is what saves the work. Both report how they ended
(log line and metrics); neither ever logs the webhook URL beyond its host, since chat and
incident webhooks carry their secret in the path.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from collections.abc import Callable

import urllib3
from urllib3.util.retry import Retry

from spotguard.agent.config import AgentConfig, redact_url
from spotguard.protocol import Notice

__all__ = ["NoticeActions", "notice_environment"]

log = logging.getLogger(__name__)

#: Called with ("hook" | "webhook", succeeded) when an action ends.
ActionObserver = Callable[[str, bool], None]


def notice_environment(notice: Notice) -> dict[str, str]:
    """The notice as ``SPOTGUARD_NOTICE_*`` variables, for shell hooks."""
    payload = notice.to_json()
    return {
        f"SPOTGUARD_NOTICE_{key.upper()}": "" if value is None else str(value)
        for key, value in payload.items()
    }


class NoticeActions:
    """Runs the configured hook and webhook for notices of the configured kinds."""

    def __init__(self, config: AgentConfig, observer: ActionObserver) -> None:
        self.config = config
        self.observer = observer
        self._threads: list[threading.Thread] = []

    def start(self, notice: Notice) -> None:
        """Launch the actions for ``notice`` (returns at once)."""
        if self.config.hook_command and notice.kind in self.config.hook_kinds:
            self._spawn("hook", self._run_hook, notice)
        if self.config.webhook_url and notice.kind in self.config.webhook_kinds:
            self._spawn("webhook", self._post_webhook, notice)

    def join(self, timeout: float) -> None:
        """Wait for running actions (used at shutdown and by tests)."""
        for thread in self._threads:
            thread.join(timeout)

    def _spawn(self, name: str, work: Callable[[Notice], bool], notice: Notice) -> None:
        def run() -> None:
            try:
                ok = work(notice)
            except Exception:  # a bug in an action must not take the agent down
                log.exception("%s action crashed", name, extra={"notice_id": notice.id})
                ok = False
            self.observer(name, ok)

        thread = threading.Thread(target=run, name=f"spotguard-{name}", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _run_hook(self, notice: Notice) -> bool:
        command = list(self.config.hook_command)
        try:
            result = subprocess.run(
                command,
                input=json.dumps(notice.to_json()),
                env={**os.environ, **notice_environment(notice)},
                capture_output=True,
                text=True,
                timeout=self.config.hook_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            log.error(
                "hook %s timed out after %s s",
                command[0],
                self.config.hook_timeout,
                extra={"notice_id": notice.id},
            )
            return False
        except OSError as exc:
            log.error(
                "hook %s could not start: %s", command[0], exc, extra={"notice_id": notice.id}
            )
            return False
        if result.returncode != 0:
            log.error(
                "hook %s exited %s: %s",
                command[0],
                result.returncode,
                result.stderr.strip()[-500:],
                extra={"notice_id": notice.id},
            )
            return False
        log.info("hook %s done", command[0], extra={"notice_id": notice.id})
        return True

    def _post_webhook(self, notice: Notice) -> bool:
        retry = Retry(
            total=self.config.webhook_retries,
            backoff_factor=0.5,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=None,  # POST too: receivers dedupe on the notice id
            raise_on_status=False,
        )
        target = redact_url(self.config.webhook_url)
        fields = {"notice_id": notice.id}
        with urllib3.PoolManager(retries=retry) as pool:
            try:
                response = pool.request(
                    "POST",
                    self.config.webhook_url,
                    body=json.dumps(notice.to_json()).encode(),
                    headers={"Content-Type": "application/json"},
                    timeout=self.config.webhook_timeout,
                )
            except urllib3.exceptions.HTTPError as exc:
                log.error("webhook %s failed: %s", target, type(exc).__name__, extra=fields)
                return False
        if response.status >= 300:
            log.error("webhook %s answered %s", target, response.status, extra=fields)
            return False
        log.info("webhook %s answered %s", target, response.status, extra=fields)
        return True
