"""Structured logs on stdout, where journald picks them up.

``plain`` is for people reading ``journalctl``; ``json`` (one object a line) is for log
shippers. Extra fields passed with ``extra={...}`` (``notice_id``, ``pid``, ...) appear in both.

What the agent logs partly comes from others (IMDS answers, local clients): in plain format
every control character is escaped and a traceback's lines are indented, so no value can start
a line of its own and forge an entry ("sent SIGKILL to pid 1"). JSON escapes them by itself.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

__all__ = ["LogBudget", "configure_logging", "escape"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def escape(text: str) -> str:
    """``text`` with every non-printable character (newline, carriage return, escape
    sequences, bidi overrides, ...) written as a Python escape: always one line."""
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname} {record.name}: {escape(record.getMessage())}"
        extras = " ".join(f"{key}={escape(str(value))}" for key, value in _extras(record).items())
        if extras:
            text += f" [{extras}]"
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            text += "".join(f"\n  | {escape(line)}" for line in trace.splitlines())
        return text


class LogBudget:
    """At most ``burst`` lines per ``window`` seconds through ``logger`` for each ``key`` (the
    uid of a local client), then one summary of how many were held back: what local clients can
    trigger must not flood the journal, and what one user triggers must not hide another's."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 20,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._burst = burst
        self._window = window
        self._clock = clock
        #: key -> [window start, lines used, lines held back]
        self._keys: dict[object, list[float]] = {}

    def log(
        self, level: int, message: str, *args: object, key: object = None, **kwargs: Any
    ) -> None:
        now = self._clock()
        entry = self._keys.get(key)
        if entry is None or now - entry[0] >= self._window:
            if entry is not None and entry[2]:
                self._logger.warning(
                    "%d more log line(s) about local clients (%s) held back in %.0f s",
                    entry[2],
                    "the agent" if key == "agent" else key,
                    self._window,
                )
            self._forget(now)
            entry = self._keys[key] = [now, 0, 0]
        if entry[1] < self._burst:
            entry[1] += 1
            self._logger.log(level, message, *args, **kwargs)
        else:
            entry[2] += 1

    def _forget(self, now: float) -> None:
        """Drop keys whose window ended with nothing held back (the table stays small)."""
        for key, (start, _, held) in list(self._keys.items()):
            if now - start >= self._window and not held:
                del self._keys[key]

    def info(self, message: str, *args: object, **kwargs: Any) -> None:
        self.log(logging.INFO, message, *args, **kwargs)

    def warning(self, message: str, *args: object, **kwargs: Any) -> None:
        self.log(logging.WARNING, message, *args, **kwargs)

    def error(self, message: str, *args: object, **kwargs: Any) -> None:
        self.log(logging.ERROR, message, *args, **kwargs)


def configure_logging(log_format: str = "plain", level: str = "info") -> None:
    """Send spotguard's logs to stdout in the chosen format (replaces earlier handlers)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if log_format == "json" else PlainFormatter())
    root = logging.getLogger("spotguard")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
