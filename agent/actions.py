"""Optional per-notice actions: a local hook command and a webhook POST.

Both run in background threads so that a slow hook or an unreachable webhook never delays the
signal to the training processes, which is what saves the work. Both report how they ended
(log line and metrics); neither ever logs the webhook URL beyond its host, since chat and
incident webhooks carry their secret in the path.

Neither may cost the agent more than its own thread for a bounded time: the hook runs in a
process group of its own that is killed whole at its timeout (a backgrounded grandchild
included), and only the tail of its output is kept; the webhook is never redirected (a 307
would re-send the notice to wherever the answer points) and its retries are bounded by the
config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import urllib3
from urllib3.util.retry import Retry

from spotguard.agent.config import AgentConfig, redact_url
from spotguard.protocol import Notice

__all__ = ["NoticeActions", "notice_environment"]

log = logging.getLogger(__name__)

#: Called with ("hook" | "webhook", succeeded) when an action ends.
ActionObserver = Callable[[str, bool], None]

#: The hook's output (stdout and stderr together) kept for the log: its last bytes only. A hook
#: that floods its output is drained to the end, never buffered whole in the agent.
HOOK_OUTPUT_LIMIT = 4096
#: Longest ``SPOTGUARD_NOTICE_*`` value, in bytes (see :func:`notice_environment`).
ENV_VALUE_LIMIT = 4096


def notice_environment(notice: Notice) -> dict[str, str]:
    """The notice as ``SPOTGUARD_NOTICE_*`` variables, for shell hooks.

    The values come from IMDS (a maintenance event's code and id are free text): a NUL cannot
    be in an environment string, a lone surrogate cannot be encoded into one, and the kernel
    refuses a string over 128 KiB; each made the hook fail to start. The first two are
    replaced and each value is cut at ``ENV_VALUE_LIMIT`` bytes (stdin has the whole notice),
    so the hook always runs.
    """
    payload = notice.to_json()
    return {
        f"SPOTGUARD_NOTICE_{key.upper()}": _environment_text("" if value is None else str(value))
        for key, value in payload.items()
    }


def _environment_text(value: str) -> str:
    data = value.replace("\x00", "\ufffd").encode("utf-8", "replace")[:ENV_VALUE_LIMIT]
    return data.decode("utf-8", "ignore")  # "ignore": a character cut in two is dropped


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
        fields = {"notice_id": notice.id}
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                bufsize=0,
                env={**os.environ, **notice_environment(notice)},
                start_new_session=True,  # its own process group, killed whole at the timeout
            )
        except OSError as exc:
            log.error("hook %s could not start: %s", command[0], exc, extra=fields)
            return False
        with process:
            deadline = time.monotonic() + self.config.hook_timeout
            payload = json.dumps(notice.to_json()).encode()
            output, finished = _exchange(process, payload, deadline)
            try:
                if not finished:
                    raise subprocess.TimeoutExpired(command, self.config.hook_timeout)
                returncode = process.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                # Killed before the leader is reaped, so the group id cannot have been reused;
                # a backgrounded grandchild dies with the hook.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                log.error(
                    "hook %s timed out after %s s; killed its process group",
                    command[0],
                    self.config.hook_timeout,
                    extra=fields,
                )
                return False
        if returncode != 0:
            tail = output.decode("utf-8", "replace").strip()[-500:]
            log.error("hook %s exited %s: %s", command[0], returncode, tail, extra=fields)
            return False
        log.info("hook %s done", command[0], extra=fields)
        return True

    def _post_webhook(self, notice: Notice) -> bool:
        retry = Retry(
            total=self.config.webhook_retries,
            backoff_factor=0.5,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=None,  # POST too: receivers dedupe on the notice id
            raise_on_status=False,
            redirect=False,
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
                    redirect=False,  # a 3xx is an answer, never a new destination for the notice
                )
            except urllib3.exceptions.HTTPError as exc:
                log.error("webhook %s failed: %s", target, type(exc).__name__, extra=fields)
                return False
        if 300 <= response.status < 400:
            log.error(
                "webhook %s answered %s; redirects are not followed",
                target,
                response.status,
                extra=fields,
            )
            return False
        if response.status >= 400:
            log.error("webhook %s answered %s", target, response.status, extra=fields)
            return False
        log.info("webhook %s answered %s", target, response.status, extra=fields)
        return True


def _exchange(
    process: subprocess.Popen[bytes], payload: bytes, deadline: float
) -> tuple[bytes, bool]:
    """Feed ``payload`` to the hook's stdin and read its output to the end, both before
    ``deadline`` (monotonic); the last ``HOOK_OUTPUT_LIMIT`` bytes of output, and whether the
    end came in time. The payload carries IMDS text and can outgrow the pipe's buffer, so a
    hook that never reads its stdin must not block a plain write; the output ends when every
    process holding the pipe, the hook's own children included, has closed it or exited."""
    stdin, stdout = process.stdin, process.stdout
    assert stdin is not None  # both are PIPEs
    assert stdout is not None
    os.set_blocking(stdin.fileno(), False)
    pending = memoryview(payload)
    kept = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bytes(kept), False
        writers = [] if stdin.closed else [stdin]
        readable, writable, _ = select.select([stdout], writers, [], remaining)
        if writable:
            try:
                pending = pending[os.write(stdin.fileno(), pending) :]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                pending = pending[:0]  # it exited or closed stdin unread: its exit status tells
            if not pending:
                stdin.close()
        if readable:
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                return bytes(kept), True
            kept += chunk
            del kept[:-HOOK_OUTPUT_LIMIT]
