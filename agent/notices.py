"""The active notices: what IMDS says now, not everything it ever said.

A notice stays active while its watch keeps reporting it. It leaves when IMDS withdraws it
(the watch answers, and no longer with that notice: a maintenance event cancelled, a rebalance
recommendation or a spot action gone) or when its deadline is more than a grace period past (the
instance is still here, so whatever was announced did not happen as announced). Only active
notices are published and signalled: a process that starts afterwards is not stopped by a notice
that no longer holds. A watch that fails says nothing either way ("unknown"): its notices stay.

Scheduled maintenance is the exception to expiry by deadline: its deadline is ``NotBefore``, but
AWS may act until ``NotAfter``; its watch skips events whose window ended more than the grace
period ago (and reports the next due one), so such a notice ends when its watch drops it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from spotguard.protocol import SCHEDULED_MAINTENANCE, Notice

__all__ = ["WATCH_EXPIRES", "ActiveNotices"]

#: Kinds whose watch expires them itself (see the module docstring).
WATCH_EXPIRES = frozenset({SCHEDULED_MAINTENANCE})


class ActiveNotices:
    """The notices in force, one per watch at most (each watch reports its most urgent)."""

    def __init__(self, grace: float) -> None:
        self.grace = timedelta(seconds=grace)
        self.active: dict[str, Notice] = {}
        #: Expired notices that IMDS still serves: not taken up again. At most one per watch.
        self._expired: set[str] = set()

    def observe(self, kind: str, notice: Notice | None) -> list[Notice]:
        """Take the answer of the watch for ``kind``; returns the notices it withdraws.
        ``notice``, when :meth:`is_new`, is then added with :meth:`add`."""
        keep = notice.id if notice else None
        self._expired = {
            notice_id
            for notice_id in self._expired
            if notice_id == keep or not notice_id.startswith(f"{kind}/")
        }
        withdrawn = [n for n in self.active.values() if n.kind == kind and n.id != keep]
        for gone in withdrawn:
            del self.active[gone.id]
        return withdrawn

    def is_new(self, notice: Notice, now: datetime) -> bool:
        """Whether ``notice`` is neither active already nor past its deadline plus the grace
        period (one first seen that late is marked expired and never becomes active)."""
        if notice.id in self.active or notice.id in self._expired:
            return False
        if self._past_grace(notice, now):
            self._expired.add(notice.id)
            return False
        return True

    def add(self, notice: Notice) -> None:
        self.active[notice.id] = notice

    def expire(self, now: datetime) -> list[Notice]:
        """Remove and return the notices whose deadline is more than the grace period past."""
        expired = [n for n in self.active.values() if self._past_grace(n, now)]
        for notice in expired:
            del self.active[notice.id]
            self._expired.add(notice.id)
        return expired

    def most_urgent(self) -> Notice | None:
        return min(self.active.values(), key=lambda n: n.urgency, default=None)

    def signalling(self) -> list[Notice]:
        return [n for n in self.active.values() if n.signals_targets]

    def by_urgency(self) -> list[Notice]:
        """Least urgent first: a client told of several reads the most urgent last."""
        return sorted(self.active.values(), key=lambda n: n.urgency, reverse=True)

    def _past_grace(self, notice: Notice, now: datetime) -> bool:
        if notice.kind in WATCH_EXPIRES:
            return False
        return self.ended(notice, now)

    def ended(self, notice: Notice, now: datetime) -> bool:
        """Whether ``notice``'s deadline is more than the grace period past (for one dropped
        by its watch: it expired rather than was withdrawn). Compared as ``now - grace``: a
        deadline near the end of the calendar (year 9999, from IMDS) must not overflow."""
        return notice.deadline is not None and now - self.grace > notice.deadline
