"""The systemd notification protocol (``Type=notify``, ``WatchdogSec=``), without libsystemd.

Twenty lines of datagram socket instead of a compiled dependency: ``READY=1`` once the agent
polls, ``WATCHDOG=1`` from the poll loop (so a wedged loop, not just a dead process, gets the
agent restarted), ``STOPPING=1`` on the way out. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket

__all__ = ["SystemdNotifier"]


class SystemdNotifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written "@name" in the variable and "\0name" on the wire.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        for_us = not watchdog_pid or watchdog_pid == str(os.getpid())
        #: Ping interval: half the watchdog timeout, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and for_us else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, message: str) -> None:
        if not self._address:
            return
        # systemd gone away (shutdown) leaves nothing useful to do about a failed send.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.sendto(message.encode(), self._address)
