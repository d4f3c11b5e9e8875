"""The registration socket's connection table: who holds how many, and who makes room.

Connections are counted per *principal*, not per uid: a uid inside a user's subordinate range
(``/etc/subuid``, which ``newuidmap`` lets that user enter without privilege; Ubuntu gives every
user 65,536 of them) counts as that user. Counting raw uids let one user open the per-uid cap
from each of four uids and fill the whole table, so that a trainer started afterwards was refused
and never signalled.

When the table is full anyway (several real users), a newcomer takes a place from the principal
holding the most connections, as long as that principal holds more than the newcomer would: its
oldest connection that has not registered goes first, else its newest connection. Only a
newcomer of a principal already among the largest is refused, so nobody who holds few
connections is ever locked out, and the eviction never ping-pongs between two principals.
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import stat
from collections import Counter
from pathlib import Path

from spotguard.agent.limits import Caps
from spotguard.agent.peers import Client

__all__ = ["SUBUID_FILE", "Connections", "Principals"]

SUBUID_FILE = Path("/etc/subuid")
#: A subordinate-id file larger than this is not read (it is root's file, but stay bounded).
MAX_SUBUID_BYTES = 1 << 20

log = logging.getLogger("spotguard.agent.registry")


class Principals:
    """Maps a uid to who answers for it: the owner of the subordinate range it lies in, else
    the uid itself. Re-reads the file when it changes; trusts it only when root owns it and
    nobody else may write it (else every uid is its own principal)."""

    def __init__(self, path: Path = SUBUID_FILE) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._ranges: list[tuple[int, int, str]] = []

    def of(self, uid: int) -> str:
        self._refresh()
        for start, end, owner in self._ranges:
            if start <= uid < end:
                return owner
        return f"uid {uid}"

    def _refresh(self) -> None:
        try:
            info = os.stat(self.path)
        except OSError:
            self._seen, self._ranges = None, []
            return
        seen = (info.st_ino, info.st_mtime_ns, info.st_size)
        if seen == self._seen:
            return
        self._seen, self._ranges = seen, []
        trusted = info.st_uid == 0 and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if not trusted or not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SUBUID_BYTES:
            return
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return
        for line in text.splitlines():
            name, _, rest = line.strip().partition(":")
            first, _, count = rest.partition(":")
            if not (name and first.isdigit() and count.isdigit()):
                continue
            self._ranges.append((int(first), int(first) + int(count), _owner(name)))


def _owner(name: str) -> str:
    """``uid N`` of the user a subuid line names (by name or number), so that the user's own
    connections and those from its range count together."""
    if name.isdigit():
        return f"uid {name}"
    try:
        return f"uid {pwd.getpwnam(name).pw_uid}"
    except KeyError:
        return f"user {name}"


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
        if most <= held + 1:
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
        newest_registered = None
        for client in self.pending.values():
            if client.principal == principal:
                return client
        for client in self.by_socket.values():
            if client.principal == principal:
                newest_registered = client
        assert newest_registered is not None
        return newest_registered
