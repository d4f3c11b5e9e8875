"""Who is at the other end of a registration connection, as the kernel says, and signalling it.

pid and uid come from ``SO_PEERCRED``: the process that called ``connect()``, in the agent's
PID namespace (0 when it is not visible from there). At register time the process is pinned
with a pidfd, so a signal can only ever reach that very process:

* ``SO_PEERPIDFD`` (Linux >= 6.5) hands over the connecting process itself. Any error from it
  other than "not supported" (``ENOPROTOOPT``) means the connecting process is gone (a forked
  child kept the socket): the registration is refused.
* Older kernels get ``pidfd_open(pid)``, which opens whoever holds that pid *now*: the
  connecting process may have died and its pid gone to a stranger. So ``ESRCH`` refuses the
  registration, and the process opened must have the connecting process's real uid and must
  have started before the connection was accepted, else it is not the connector. What remains
  possible is a process of the *same* uid that took the pid before the accept: it could be
  signalled, which that uid can do anyway.
* Where pidfds do not exist at all (``pidfd_open`` missing), the signal goes by pid, checked
  against the process start time just before (the same uid and start-time checks apply).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import struct
from dataclasses import dataclass, field

import psutil

from spotguard.agent.processes import (
    TICKS_PER_SECOND,
    boot_clock,
    identity,
    is_alive,
    start_ticks,
)

__all__ = ["Client", "peer_credentials"]

#: Not in Python 3.11's socket module; Linux >= 6.5 (the generic value, x86-64 and arm64).
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_PEERCRED = struct.Struct("3i")


class PidfdUnsupported(Exception):
    """Neither ``SO_PEERPIDFD`` nor ``pidfd_open`` exists here: signals go by pid.

    The agent's own control flow, not an error anyone sees: the registry catches it at once
    and pins by pid from then on. So it stays out of :mod:`spotguard.errors`' tree and out of
    ``__all__``."""


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """``(pid, uid)`` of the process that connected ``sock``."""
    pid, uid, _ = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return pid, uid


def _pidfd_of_peer(sock: socket.socket, pid: int) -> tuple[int, bool]:
    """A pidfd of the peer and whether the kernel vouches it is the connector itself.
    :class:`ProcessLookupError` when the connecting process is gone."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD), True
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:  # supported, and no process to hand over
            raise ProcessLookupError(pid) from None
    try:
        return os.pidfd_open(pid), False
    except AttributeError:
        raise PidfdUnsupported("os.pidfd_open is missing") from None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise ProcessLookupError(pid) from None
        if exc.errno in (errno.ENOSYS, errno.EPERM):  # no pidfd_open (< 5.3) or seccomp
            raise PidfdUnsupported(str(exc)) from None
        raise


@dataclass(eq=False)
class Client:
    """One connection; a registered process once ``signal`` is set."""

    sock: socket.socket
    pid: int
    uid: int
    connected_at: float
    #: Who answers for ``uid`` (its user, for a subordinate uid): connections are counted and
    #: log lines budgeted by it (:mod:`spotguard.agent.connections`).
    principal: str = ""
    #: :func:`boot_clock` at accept: the connecting process started before.
    accepted_at: float = field(default_factory=boot_clock)
    #: Pins the registrant (not whoever holds its PID later); taken at register, ``None``
    #: before or where pidfds are missing.
    pidfd: int | None = None
    signal: signal.Signals | None = None
    rank: int = 0
    #: ``pid@start ticks@boot id`` (:mod:`spotguard.agent.processes`): the same process is the
    #: same target across agent restarts and clock steps.
    identity: str = ""
    exit_code: int | None = None
    exit_step: int | None = None
    #: Notice ids already written to this connection.
    pushed: set[str] = field(default_factory=set)
    buffer: bytearray = field(default_factory=bytearray)
    closed: bool = False

    @property
    def registered(self) -> bool:
        return self.signal is not None

    def pin(self, *, use_pidfd: bool = True) -> None:
        """Pin the connecting process (a pidfd, unless ``use_pidfd`` is off or
        :class:`PidfdUnsupported` is raised) and record its identity; raises
        :class:`ProcessLookupError` when it is gone or the process holding its pid is not it
        (message: why)."""
        vouched = False
        if use_pidfd:
            self.pidfd, vouched = _pidfd_of_peer(self.sock, self.pid)
        try:
            uids = psutil.Process(self.pid).uids()
            ticks = start_ticks(self.pid)
        except (psutil.Error, ProcessLookupError):
            raise ProcessLookupError("the connecting process is gone") from None
        except OSError as exc:  # refused now; the trainer connects again
            raise ProcessLookupError(f"cannot look at the connecting process now: {exc}") from None
        if self.pidfd is not None:  # still alive, so what was read above was its own
            signal.pidfd_send_signal(self.pidfd, 0)
        if not vouched:
            # SO_PEERCRED gives the effective uid; a setuid trainer's real uid differs.
            if self.uid not in (uids.real, uids.effective, uids.saved):
                raise ProcessLookupError(
                    f"pid {self.pid} now belongs to uid {uids.real}, not the connecting uid "
                    f"{self.uid}: the connecting process is gone"
                )
            if ticks / TICKS_PER_SECOND > self.accepted_at:
                raise ProcessLookupError(
                    f"pid {self.pid} started after the connection was accepted: the connecting "
                    "process is gone"
                )
        self.identity = identity(self.pid, ticks=ticks)

    def alive(self) -> bool:
        """Whether the registrant itself still runs (an exited one is gone here even while it
        is a zombie, or while a child of it holds the connection)."""
        if self.pidfd is not None:  # readable once it exited (poll: any fd number)
            poller = select.poll()
            poller.register(self.pidfd, select.POLLIN)
            return not poller.poll(0)
        try:
            return is_alive(self.identity)
        except OSError:  # cannot tell now: as alive (its pid is not handed to another)
            return True

    def close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def send_signal(self) -> None:
        """Signal the registrant; :class:`ProcessLookupError` when it is gone."""
        assert self.signal is not None
        if self.pidfd is not None:
            signal.pidfd_send_signal(self.pidfd, self.signal)
            return
        if not is_alive(self.identity):
            raise ProcessLookupError(self.pid)
        os.kill(self.pid, self.signal)
