"""The registration socket's connection table: who holds how many, and who makes room.

Connections are counted per principal (a user with all the uids it can act as:
:mod:`spotguard.agent.principals`), each capped at ``Caps.per_user``. When the table is full
anyway (many principals), a newcomer takes a place from the principal holding the most, if that
one would still hold at least as many as the newcomer after the move: its oldest connection
that has not registered goes first (it has seconds to live anyway), else its newest. So nobody
holding few connections is locked out, and a move never merely swaps who holds more (no
ping-pong, and no taking a trainer's place for a principal that then holds more than its own).
"""

from __future__ import annotations

import logging
import socket
from collections import Counter

from spotguard.agent.limits import Caps
from spotguard.agent.peers import Client
from spotguard.agent.principals import Principals

__all__ = ["Connections"]

log = logging.getLogger("spotguard.agent.registry")


class Connections:
    """Every open connection: by socket, not yet registered (oldest first), registered by pid,
    and counted per principal."""

    def __init__(self, caps: Caps, principals: Principals) -> None:
        self.caps = caps
        self.principals = principals
        self.by_socket: dict[socket.socket, Client] = {}
        #: Not yet registered, oldest first: the register deadline is checked from the front.
        self.pending: dict[socket.socket, Client] = {}
        #: Registered processes by pid: one registration each.
        self.by_pid: dict[int, Client] = {}
        self.per_principal: Counter[str] = Counter()
        self._refused = 0
        self._cap_logged_at: float | None = None

    def __len__(self) -> int:
        return len(self.by_socket)

    def admit(self, principal: str) -> tuple[bool, Client | None]:
        """Whether a newcomer of ``principal`` gets a place, and the connection to drop to make
        room for it (``None``: there is room, or it is refused)."""
        held = self.per_principal[principal]
        if held >= self.caps.per_user:
            return False, None
        if len(self.by_socket) < self.caps.total:
            return True, None
        largest, most = self.per_principal.most_common(1)[0]
        if most <= held + 1:  # taking one would only swap who holds more
            return False, None
        return True, self._victim(largest)

    def refused(self, uid: int, principal: str, now: float) -> None:
        """Count a refused newcomer; logged when the cap is first hit, then at most once a
        minute with the count refused meanwhile."""
        self._refused += 1
        if self._cap_logged_at is None or now - self._cap_logged_at >= 60.0:
            self._cap_logged_at = now
            log.error("registration socket: connection cap reached (%d in total, %d for %s, "
                      "refused uid %s; caps %d and %d per user); refused %d connection(s) so far",
                      len(self), self.per_principal[principal], principal, uid,
                      self.caps.total, self.caps.per_user, self._refused)  # fmt: skip

    def add(self, client: Client) -> None:
        self.by_socket[client.sock] = client
        self.pending[client.sock] = client
        self.per_principal[client.principal] += 1

    def registered(self, client: Client) -> None:
        del self.pending[client.sock]
        self.by_pid[client.pid] = client

    def remove(self, client: Client) -> None:
        del self.by_socket[client.sock]
        if self.by_pid.get(client.pid) is client:
            del self.by_pid[client.pid]
        self.pending.pop(client.sock, None)
        self.per_principal[client.principal] -= 1
        if not self.per_principal[client.principal]:
            del self.per_principal[client.principal]

    def _victim(self, principal: str) -> Client:
        """Its oldest connection that has not registered (it has seconds to live anyway), else
        its newest."""
        newest = None
        for client in self.pending.values():
            if client.principal == principal:
                return client
        for client in self.by_socket.values():
            if client.principal == principal:
                newest = client
        assert newest is not None
        return newest
