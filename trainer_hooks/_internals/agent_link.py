"""This process's registration with the node's agent: a connection to ``<state_dir>/agent.sock``.

The agent learns who we are from the kernel (``SO_PEERCRED``), so the registration message only
says which signal we want and our rank; it lives exactly as long as the connection. The agent
pushes every notice down the connection as well as signalling: a notice read here stops
training even if the signal is lost (or was never sent: a process in a container whose pid the
agent cannot see). Before leaving, the process says how it ends (``exit``: code and step).

Everything here is best effort and never blocks training: no agent (no socket, or the agent
restarting) means retrying in the background; the notice file and the signals still work.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import struct
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from stat import S_ISDIR, S_ISVTX

from spotguard.errors import ProtocolError
from spotguard.protocol import (
    AGENT_OPS,
    MAX_MESSAGE_BYTES,
    Notice,
    decode_message,
    encode_message,
    socket_path,
)

__all__ = ["AgentLink", "trusted_uids"]

log = logging.getLogger("spotguard.trainer_hooks")

#: Seconds between connection attempts while there is no agent (or it restarts).
RETRY_SECONDS = 1.0
#: How long one socket read waits before looking at whether to stop.
READ_SECONDS = 0.2


class AgentLink:
    """Keeps this process registered with the agent while it trains, in a daemon thread.

    A forked child (a DataLoader worker) gets a copy of the connection's file descriptor; it
    closes that copy at once (:func:`_after_fork_in_child`), so the registration still ends
    exactly when this process does, not when its last worker does.
    """

    def __init__(
        self, state_dir: Path, signal_name: str, rank: int, on_notice: Callable[[Notice], None]
    ) -> None:
        self.path = socket_path(state_dir)
        self.signal_name, self.rank = signal_name, rank
        self.on_notice = on_notice
        #: The pid the agent registered us as (translated into its PID namespace); None
        #: while not registered.
        self.registered_pid: int | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # guards _sock against close() racing the thread
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._told_missing = False
        self._told_distrust = False

    def start(self) -> None:
        _LIVE.add(self)
        self._closing.clear()
        self._thread = threading.Thread(target=self._run, name="spotguard-agent", daemon=True)
        self._thread.start()

    def close(self, exit_code: int | None = None, step: int | None = None) -> None:
        """Say how this process ends (when known), then hang up: the registration ends."""
        self._closing.set()
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            if exit_code is not None:
                try:
                    sock.settimeout(1.0)
                    sock.sendall(encode_message("exit", code=exit_code, step=step))
                except OSError as exc:
                    log.warning("could not tell the agent how this process ends: %s", exc)
            _hang_up(sock)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self.registered_pid = None
        _LIVE.discard(self)

    def _forget_after_fork(self) -> None:
        """In a forked child: close this copy of the connection (never ``shutdown``: that
        would end the parent's registration too) and send nothing, ever. Nothing of the
        parent's locks or events is touched: its thread may have held them at the fork."""
        sock, self._sock, self._thread = self._sock, None, None
        self._closing = threading.Event()
        self._closing.set()
        self._lock = threading.Lock()
        self.registered_pid = None
        if sock is not None:
            sock.close()

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        pause = RETRY_SECONDS
        while not self._closing.is_set():
            sock = self._connect()
            if sock is None:
                self._closing.wait(RETRY_SECONDS)
                continue
            try:
                self._serve(sock)
            except Exception as exc:  # whatever happens, training goes on without us
                if not self._closing.is_set():
                    log.warning("connection to the agent lost (%s): reconnecting in %.0f s",
                                exc, pause)  # fmt: skip
            finally:
                with self._lock:
                    if self._sock is sock:
                        self._sock = None
                _hang_up(sock)
            # Registered for a while: the agent restarted, come back soon. Refused or dropped
            # at once: the same will happen again, so back off (up to 10 s).
            pause = RETRY_SECONDS if self.registered_pid is not None else min(pause * 2, 10.0)
            self.registered_pid = None
            self._closing.wait(pause)

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with self._lock:  # visible to close() and to a fork from here on
            if self._closing.is_set():
                sock.close()
                return None
            self._sock = sock
        try:
            sock.settimeout(2.0)
            sock.connect(str(self.path))
            _check_agent(sock, trusted_uids(self.path.parent))
            sock.sendall(encode_message("register", signal=self.signal_name, rank=self.rank))
        except (OSError, ProtocolError) as exc:
            with self._lock:
                if self._sock is sock:
                    self._sock = None
            _hang_up(sock)
            if isinstance(exc, ProtocolError):
                if not self._told_distrust:  # once: it is there every second
                    self._told_distrust = True
                    log.error("%s: not registering, and ignoring it", exc)
            elif not self._told_missing:  # once: no agent is a normal state (laptops, CI)
                self._told_missing = True
                log.info("no spotguard agent at %s (%s): relying on signals and the notice "
                         "file; retrying in the background", self.path, exc)  # fmt: skip
            return None
        sock.settimeout(READ_SECONDS)
        return sock

    def _serve(self, sock: socket.socket) -> None:
        """Read the agent's messages until it hangs up or we close."""
        pending = b""
        while not self._closing.is_set():
            try:
                chunk = sock.recv(MAX_MESSAGE_BYTES)
            except TimeoutError:
                continue
            if not chunk:
                raise OSError("the agent closed the connection")
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                self._handle(decode_message(line, AGENT_OPS))
            if len(pending) > MAX_MESSAGE_BYTES:
                raise ProtocolError("the agent sent a line longer than a message may be")

    def _handle(self, message: dict[str, object]) -> None:
        op = message["op"]
        if op == "registered":
            pid = message["pid"]
            self.registered_pid = pid if isinstance(pid, int) else None
            log.info("registered with the spotguard agent as pid %s (%s on a notice)",
                     pid, self.signal_name)  # fmt: skip
        elif op == "notice":
            fields = {key: value for key, value in message.items() if key not in ("v", "op")}
            self.on_notice(Notice.from_json(fields))
        else:
            log.warning("the agent refused this process: %s", message.get("reason"))


def trusted_uids(state_dir: Path) -> frozenset[int]:
    """Whom to believe about notices: root, this user, and the owner of the state dir when
    nobody else can have put it there. systemd runs the agent as a dynamic user that owns
    ``/run/spotguard``; a directory that someone else could create or replace (a parent
    writable by others without the sticky bit, or the state dir itself writable by others,
    or any directory above it owned by another user) earns its owner nothing."""
    mine = {0, os.getuid()}
    try:
        own = state_dir.lstat()
        chain = [state_dir.resolve(), *state_dir.resolve().parents]
        stats = [folder.stat() for folder in chain]
    except OSError:
        return frozenset(mine)
    if not S_ISDIR(own.st_mode) or own.st_mode & 0o022:
        return frozenset(mine)
    for child, parent in itertools.pairwise(stats):
        if parent.st_uid not in mine:
            return frozenset(mine)
        if parent.st_mode & 0o022 and not (parent.st_mode & S_ISVTX and child.st_uid in mine):
            return frozenset(mine)  # anyone could have made (or swapped in) the child
    return frozenset({*mine, own.st_uid})


def _check_agent(sock: socket.socket, trusted: frozenset[int]) -> None:
    """Register only with an agent of a trusted uid: whoever else serves the socket could
    push fake notices and stop training."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid not in trusted:
        raise ProtocolError(
            f"{sock.getpeername()} is served by uid {uid}, not root, this user or the owner "
            "of a state dir only they control"
        )


#: The links of this process, for the fork handler (weak: a closed guard is not kept alive).
_LIVE: weakref.WeakSet[AgentLink] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for link in list(_LIVE):
        link._forget_after_fork()
    _LIVE.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _hang_up(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
