"""File descriptors: the agent's own limit, and the connection caps it allows.

systemd starts services with a soft ``RLIMIT_NOFILE`` of 1024 (and a hard one far above). The
agent raises its soft limit to the hard one at startup. A registered connection costs two file
descriptors (the socket, and the pidfd taken at register), so the caps keep ``RESERVED_FDS``
for the agent's own files (IMDS connections, the metrics server, state and notice files, hook
pipes) below the limit: total connections ``<= (soft limit - RESERVED_FDS) / 2``, at most
``MAX_CONNECTIONS``; one user (a uid with its subordinate uids, see
:mod:`spotguard.agent.connections`) gets at most a quarter of that (and ``MAX_PER_USER``), so a
single local user can never fill the table, nor the agent's file descriptors.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

__all__ = ["MAX_CONNECTIONS", "MAX_PER_USER", "RESERVED_FDS", "Caps", "raise_fd_limit"]

log = logging.getLogger(__name__)

#: Upper bounds on connections held at once, in total and per user, whatever the fd limit.
MAX_CONNECTIONS = 512
MAX_PER_USER = 128
#: File descriptors kept for the agent's own use, never spent on connections.
RESERVED_FDS = 128


@dataclass(frozen=True)
class Caps:
    total: int
    per_user: int

    @classmethod
    def for_limit(cls, soft: int) -> Caps:
        """The caps for a soft ``RLIMIT_NOFILE`` of ``soft`` (``RLIM_INFINITY``: the maxima)."""
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 30
        total = max(1, min(MAX_CONNECTIONS, (soft - RESERVED_FDS) // 2))
        return cls(total, max(1, min(MAX_PER_USER, total // 4)))


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (logged); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the file descriptor limit from %s to %s: %s", soft, hard, exc)
            return soft
        log.info("file descriptor limit raised from %s to %s", soft, hard)
        soft = hard
    return soft
