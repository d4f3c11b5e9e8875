"""The registration socket: a training process asks to be signalled by staying connected.

``<state_dir>/agent.sock`` is a Unix stream socket of newline-delimited JSON (the messages are in
:mod:`spotguard.protocol`). The agent takes pid and uid from the kernel (``SO_PEERCRED``, in the
agent's PID namespace) and never from the message, so a process can register only itself, and
one in a container arrives with its pid translated. At register it pins the process with a pidfd
and signals through it (see :mod:`spotguard.agent.peers`), so a recycled PID never reaches a
stranger even if a forked child keeps the socket open after the connecting process died. One
registration per process: a second one from a registered pid is refused. A registration lives
exactly as long as its connection: nothing goes stale.

Every local user can connect, so everything here is bounded and nothing blocks: connections are
capped (per user and in total, below the file descriptor limit: :mod:`spotguard.agent.limits`;
a full table makes room: :mod:`spotguard.agent.connections`),
log lines about clients are budgeted per user, a message is at most ``MAX_MESSAGE_BYTES``, the
register message must come within ``REGISTER_TIMEOUT``, a write that would block drops that
client. Anything wrong with one connection (malformed, oversized, unexpected) gets an
``error`` message and drops that connection only. A registrant that exits while another process
(a forked child) still holds its connection is dropped when its pidfd says so, and its pid is
free for the next process at once. It is single-threaded: the agent's loop calls
:meth:`Registry.serve` while it waits for its next tick, so a registration is answered (and,
during a notice, signalled) at once rather than at the next poll.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spotguard.agent.connections import Connections
from spotguard.agent.limits import MAX_CONNECTIONS, MAX_PER_USER, Caps
from spotguard.agent.logs import LogBudget
from spotguard.agent.peers import Client, PidfdUnsupported, peer_credentials
from spotguard.agent.principals import Principals
from spotguard.agent.state import bind_socket
from spotguard.errors import ConfigError, ProtocolError
from spotguard.protocol import (
    CLIENT_OPS,
    MAX_MESSAGE_BYTES,
    decode_message,
    encode_message,
    socket_path,
)

__all__ = ["MAX_CONNECTIONS", "MAX_PER_USER", "REGISTER_TIMEOUT", "Client", "Registry"]

log = logging.getLogger(__name__)

#: A connection that has not sent its register message by then is dropped (slow-drip clients).
REGISTER_TIMEOUT = 5.0
#: Connections accepted per wake-up, so a connect flood cannot starve the poll loop.
ACCEPT_BATCH = 64
#: After the process ran out of file descriptors, accepting pauses this long (no hot loop).
ACCEPT_PAUSE = 1.0


@dataclass(frozen=True)
class _Exited:
    """Selector key data of a registrant's pidfd: readable once that process exited."""

    client: Client


class Registry:
    """The socket server. ``open()``, then ``serve(timeout)`` between ticks, ``close()``."""

    def __init__(
        self,
        state_dir: Path,
        on_register: Callable[[Client], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = socket_path(state_dir)
        self._on_register = on_register
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._inode = 0
        self._wake_read, self.wakeup_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._connections = Connections(Caps(MAX_CONNECTIONS, MAX_PER_USER), Principals())
        self._accept_paused_until: float | None = None
        self._use_pidfd = True
        #: Per user: one user's misbehaving connections cannot hide another's lines. Lines about
        #: registered processes (registered, exit code, disconnected) have their own, larger
        #: budget per user; the agent's own trouble (accept failing) has its own key.
        self._budget = LogBudget(log, clock=clock)
        self._lifecycle = LogBudget(log, burst=200, clock=clock)

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Bind ``agent.sock`` (:func:`~spotguard.agent.state.bind_socket`). The connection
        caps follow the file descriptor limit in force now."""
        caps = Caps.for_limit(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self._connections.caps = caps
        try:
            self._listener, self._inode = bind_socket(self.path)
        except OSError as exc:
            raise ConfigError(f"state_dir: cannot create {self.path}: {exc}") from None
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wakeup")
        log.info("registration socket %s ready (at most %d connections, %d per user)",
                 self.path, caps.total, caps.per_user)  # fmt: skip

    def close(self) -> None:
        """Hang up on every client (they reconnect to the next agent) and remove the socket
        unless another agent has replaced it since."""
        for client in list(self._connections.by_socket.values()):
            self._close(client)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                if os.stat(self.path, follow_symlinks=False).st_ino == self._inode:
                    self.path.unlink()
        self._selector.close()
        os.close(self._wake_read)
        os.close(self.wakeup_fd)

    def clients(self) -> list[Client]:
        """The registered connections."""
        return [client for client in self._connections.by_socket.values() if client.registered]

    # -- the event loop -------------------------------------------------------------------

    def serve(self, timeout: float) -> bool:
        """Handle socket events for ``timeout`` seconds. Returns early, ``True``, when a signal
        arrived (the wake-up pipe of ``signal.set_wakeup_fd``): the caller checks its stop flag.
        """
        deadline = self._clock() + timeout
        while True:
            now = self._clock()
            self._expire_pending(now)
            self._resume_accepting(now)
            wait = deadline - now
            if wait <= 0:
                return False
            if self._connections.pending:
                oldest = next(iter(self._connections.pending.values()))
                wait = min(wait, oldest.connected_at + REGISTER_TIMEOUT - now)
            if self._accept_paused_until is not None:
                wait = min(wait, self._accept_paused_until - now)
            for key, _ in self._selector.select(max(wait, 0.0)):
                if key.data == "wakeup":
                    _drain(self._wake_read)
                    return True
                if key.data == "listener":
                    try:
                        self._accept()
                    except Exception:  # the socket must keep accepting whatever happened
                        self._budget.error(
                            "registration socket: accept failed", key="agent", exc_info=True
                        )
                    continue
                exited = isinstance(key.data, _Exited)
                client: Client = key.data.client if exited else key.data
                if client.closed:  # both its events came in one wake-up
                    continue
                try:
                    if exited:
                        self._on_exit(client)
                    else:
                        self._receive(client)
                except Exception:  # one connection's trouble is never the agent's
                    self._budget.error(
                        "registration socket: error on pid %s's connection",
                        client.pid,
                        key=client.principal,
                        exc_info=True,
                    )
                    self._close(client)

    def push(self, client: Client, data: bytes) -> bool:
        """Write one message without blocking; a client that is not reading (its socket buffer
        full) is dropped. Returns whether the message went out."""
        try:
            sent = client.sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(client)
            return False
        if sent < len(data):
            self.drop(client, "not reading its messages (socket buffer full)", reply=False)
            return False
        return True

    def drop(self, client: Client, reason: str, *, reply: bool = True) -> None:
        """Tell the client why (best effort, never blocking), log, and hang up."""
        if reply:
            _send_quietly(client.sock, encode_message("error", reason=reason[:200]))
        self._budget.warning("registration socket: dropped pid %s (uid %s): %s",
                             client.pid, client.uid, reason, key=client.principal)  # fmt: skip
        self._close(client)

    # -- connections ----------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._budget.error(
                        "registration socket: cannot accept: %s; pausing", exc, key="agent"
                    )
                    self._selector.unregister(self._listener)
                    self._accept_paused_until = self._clock() + ACCEPT_PAUSE
                return
            try:
                sock.setblocking(False)
                pid, uid = peer_credentials(sock)
            except OSError:
                sock.close()
                continue
            principal = self._connections.principals.of(uid)
            admitted, victim = self._connections.admit(principal)
            if not admitted:
                self._refuse(sock, uid, principal)
                continue
            if victim is not None:
                self.drop(victim, f"the connection table is full and {victim.principal} holds the "
                          "most connections: making room for another user")  # fmt: skip
            client = Client(sock, pid, uid, self._clock(), principal)
            self._connections.add(client)
            self._selector.register(sock, selectors.EVENT_READ, client)

    def _refuse(self, sock: socket.socket, uid: int, principal: str) -> None:
        """Over the cap: an error message and hang up (logged by the table, rate-limited)."""
        _send_quietly(sock, encode_message("error", reason="too many connections"))
        sock.close()
        self._connections.refused(uid, principal, self._clock())

    def _close(self, client: Client) -> None:
        if client.closed:
            return
        client.closed = True
        self._selector.unregister(client.sock)
        if client.pidfd is not None:  # watched once registered (if that went through)
            with contextlib.suppress(KeyError):
                self._selector.unregister(client.pidfd)
        client.sock.close()
        client.close_pidfd()
        self._connections.remove(client)
        if client.registered:
            self._lifecycle.info(
                "pid %s disconnected (exit code %s, step %s)",
                client.pid,
                client.exit_code if client.exit_code is not None else "not reported",
                client.exit_step,
                key=client.principal,
                extra={"pid": client.pid, "rank": client.rank},
            )

    def _expire_pending(self, now: float) -> None:
        while self._connections.pending:
            client = next(iter(self._connections.pending.values()))
            if now < client.connected_at + REGISTER_TIMEOUT:
                return
            self.drop(client, f"no register message within {REGISTER_TIMEOUT:g} s")

    def _resume_accepting(self, now: float) -> None:
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            assert self._listener is not None
            self._selector.register(self._listener, selectors.EVENT_READ, "listener")

    def _on_exit(self, client: Client) -> None:
        """The registrant exited: read what it sent before (an exit message, the end of the
        connection). A connection still open after that is held by another process (a child
        that inherited it): dropped, so that the pid is free for whoever gets it next."""
        while not client.closed and self._receive(client):
            pass
        if not client.closed:
            self.drop(client, "the registered process is gone (another process holds its "
                      "connection)", reply=False)  # fmt: skip

    def _receive(self, client: Client) -> bool:
        """Read and handle what arrived; ``False`` when nothing was there to read."""
        # Never more than one message's worth: the buffer stays within MAX_MESSAGE_BYTES + 1.
        try:
            data = client.sock.recv(MAX_MESSAGE_BYTES + 1 - len(client.buffer))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._close(client)
            return True
        if not data:
            self._close(client)
            return True
        client.buffer += data
        while not client.closed:
            end = client.buffer.find(b"\n")
            if end < 0:
                if len(client.buffer) > MAX_MESSAGE_BYTES - 1:
                    self.drop(client, f"message exceeds {MAX_MESSAGE_BYTES} bytes")
                return True
            line = bytes(client.buffer[: end + 1])
            del client.buffer[: end + 1]
            self._handle(client, line)
        return True

    def _handle(self, client: Client, line: bytes) -> None:
        try:
            message = decode_message(line, CLIENT_OPS)
        except ProtocolError as exc:
            self.drop(client, str(exc))
            return
        if message["op"] == "register":
            if client.registered:
                self.drop(client, "already registered")
                return
            self._register(client, signal.Signals[message["signal"]], message.get("rank", 0))
        elif not client.registered or client.exit_code is not None:
            self.drop(client, "exit: only once, after register")
        else:
            client.exit_code, client.exit_step = message["code"], message.get("step")
            self._lifecycle.info(
                "pid %s reports exit code %s at step %s",
                client.pid,
                client.exit_code,
                client.exit_step,
                key=client.principal,
                extra={"pid": client.pid, "rank": client.rank},
            )

    def _register(self, client: Client, signum: signal.Signals, rank: int) -> None:
        if client.pid <= 0:
            self.drop(client, "your pid is not visible in the agent's PID namespace")
            return
        if client.pid == os.getpid():
            self.drop(client, "the agent does not register itself")
            return
        earlier = self._connections.by_pid.get(client.pid)
        if earlier is not None:
            if earlier.alive():
                self.drop(client, f"pid {client.pid} is registered already (on another connection)")
                return
            self.drop(earlier, "the registered process is gone (its pid registers anew)",
                      reply=False)  # fmt: skip
        try:
            self._pin(client)
        except ProcessLookupError as exc:
            has_reason = exc.args and isinstance(exc.args[0], str)
            self.drop(client, exc.args[0] if has_reason else "the connecting process is gone")
            return
        client.signal, client.rank = signum, rank
        self._connections.registered(client)
        if client.pidfd is not None:
            self._selector.register(client.pidfd, selectors.EVENT_READ, _Exited(client))
        if not self.push(client, encode_message("registered", pid=client.pid)):
            return
        self._lifecycle.info(
            "pid %s (uid %s, rank %s) registered for %s",
            client.pid,
            client.uid,
            rank,
            signum.name,
            key=client.principal,
            extra={"pid": client.pid, "rank": rank},
        )
        self._on_register(client)

    def _pin(self, client: Client) -> None:
        try:
            client.pin(use_pidfd=self._use_pidfd)
        except PidfdUnsupported as exc:
            self._use_pidfd = False
            log.warning("no pidfds on this system (%s): signals go by pid, checked against the "
                        "process start time just before each signal", exc)  # fmt: skip
            client.pin(use_pidfd=False)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Best effort, never blocking: the connection is about to be closed anyway."""
    with contextlib.suppress(OSError):
        sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass
