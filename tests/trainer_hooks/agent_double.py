"""``AgentDouble``: the agent's end of the registration socket, for the hooks' tests.

A real Unix socket at ``<state_dir>/agent.sock`` and the real wire format
(:func:`spotguard.protocol.decode_message`), the pid taken from the kernel (``SO_PEERCRED``)
as the agent takes it; instead of polling IMDS it records who registered and how they left,
and pushes the notices a test gives it. The real agent's own end is tested in tests/agent.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from spotguard.protocol import CLIENT_OPS, Notice, decode_message, encode_message, socket_path


class AgentDouble:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = socket_path(state_dir)
        #: pid → the register message, while its connection is open.
        self.registered: dict[int, dict[str, Any]] = {}
        #: pid → every register message ever received (connections that ended included).
        self.ever_registered: dict[int, dict[str, Any]] = {}
        #: pid → the exit message.
        self.exits: dict[int, dict[str, Any]] = {}
        self._connections: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        self._server.listen(64)
        self._server.settimeout(0.2)
        self._closing = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def push(self, notice: Notice) -> None:
        """Send ``notice`` down every registered connection (no signal: a lost one)."""
        with self._lock:
            for connection in self._connections.values():
                connection.sendall(encode_message("notice", **notice.to_json()))

    def wait_registered(self, count: int, timeout: float = 60.0) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.registered) >= count:
                    return dict(self.registered)
            time.sleep(0.05)
        raise AssertionError(f"{count} registration(s) expected, got {self.registered}")

    def exit_of(self, pid: int, timeout: float = 30.0) -> dict[str, Any]:
        """``pid``'s exit message; it is read by this double's thread, a moment after the
        process sent it (and possibly after the process is gone)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if pid in self.exits:
                    return self.exits[pid]
            time.sleep(0.05)
        raise AssertionError(f"no exit message from pid {pid}; got {self.exits}")

    def close(self) -> None:
        """Stop, as an agent that goes away: every connection is hung up."""
        self._closing.set()
        for thread in self._threads:
            thread.join(timeout=5)
        with self._lock:
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()
        self._server.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> AgentDouble:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            creds = connection.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
            pid, _, _ = struct.unpack("3i", creds)
            thread = threading.Thread(target=self._serve, args=(connection, pid), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket, pid: int) -> None:
        connection.settimeout(0.2)
        pending = b""
        try:
            while not self._closing.is_set():
                try:
                    chunk = connection.recv(4096)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    message = decode_message(line, CLIENT_OPS)
                    with self._lock:
                        if message["op"] == "register":
                            self.registered[pid] = self.ever_registered[pid] = message
                            self._connections[pid] = connection
                            connection.sendall(encode_message("registered", pid=pid))
                        else:
                            self.exits[pid] = message
        except OSError:
            return
        finally:
            with self._lock:
                self.registered.pop(pid, None)
                self._connections.pop(pid, None)
