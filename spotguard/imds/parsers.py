"""How each IMDS answer becomes a notice (or does not): pure functions, no I/O.

Each parser takes ``(body, now)``, where ``body`` is ``None`` when IMDS answered 404, and returns
a :class:`~spotguard.protocol.Notice` or ``None``. They raise only
:class:`~spotguard.errors.ImdsBadAnswer`, whatever bytes they are fed (the property tests hold
them to that), so a garbled answer is "unknown" and never "no notice". Dates at the edges of
the calendar (year 1, year 9999 with an offset) overflow ``datetime`` arithmetic and JSON nested
thousands deep exhausts the recursion limit: both are bad answers too, never a crash. The agent
polls them on a schedule (:mod:`spotguard.agent.watches`); the trainer hooks poll the spot and
rebalance paths themselves where no agent runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from spotguard.errors import ImdsBadAnswer
from spotguard.protocol import (
    ASG_TERMINATION,
    REBALANCE_RECOMMENDATION,
    SCHEDULED_MAINTENANCE,
    SPOT_INTERRUPTION,
    Notice,
    format_time,
    parse_time,
)

__all__ = [
    "LIFECYCLE_PATH",
    "MAINTENANCE_PATH",
    "REBALANCE_PATH",
    "SPOT_ACTION_PATH",
    "Evaluate",
    "evaluate_lifecycle_state",
    "evaluate_rebalance",
    "evaluate_spot_action",
    "scheduled_maintenance_evaluator",
]

SPOT_ACTION_PATH = "latest/meta-data/spot/instance-action"
REBALANCE_PATH = "latest/meta-data/events/recommendations/rebalance"
MAINTENANCE_PATH = "latest/meta-data/events/maintenance/scheduled"
LIFECYCLE_PATH = "latest/meta-data/autoscaling/target-lifecycle-state"

#: ``(body or None for a 404, now) -> Notice | None``; raises only ImdsBadAnswer.
Evaluate = Callable[[str | None, datetime], Notice | None]

SPOT_ACTIONS = frozenset({"terminate", "stop", "hibernate"})
MAINTENANCE_TIME_FORMAT = "%d %b %Y %H:%M:%S %Z"
LIFECYCLE_STATE = re.compile(r"^[A-Za-z]+(?::[A-Za-z]+)?$")


def _json(body: str, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ImdsBadAnswer(f"{what}: answer is not JSON: {body[:80]!r}") from None


def _json_object(body: str, what: str) -> dict[str, Any]:
    payload = _json(body, what)
    if not isinstance(payload, dict):
        raise ImdsBadAnswer(f"{what}: expected a JSON object, got {type(payload).__name__}")
    return payload


def _iso_time(value: Any, what: str) -> tuple[datetime, str]:
    """The time and its canonical UTC text (the notice key); formatting converts to UTC,
    which overflows for year 1 with a positive offset or year 9999 with a negative one."""
    try:
        moment = parse_time(value)
        return moment, format_time(moment)
    except (TypeError, ValueError, OverflowError):
        raise ImdsBadAnswer(f"{what}: not an ISO-8601 time: {str(value)[:80]!r}") from None


def evaluate_spot_action(body: str | None, now: datetime) -> Notice | None:
    """``spot/instance-action``: 404 until the instance is marked, then action and time."""
    if body is None:
        return None
    payload = _json_object(body, "spot/instance-action")
    action = payload.get("action")
    if not isinstance(action, str) or action not in SPOT_ACTIONS:
        raise ImdsBadAnswer(f"spot/instance-action: unknown action {str(action)[:40]!r}")
    deadline, key = _iso_time(payload.get("time"), "spot/instance-action time")
    return Notice(
        kind=SPOT_INTERRUPTION,
        action=action,
        deadline=deadline,
        noticed_at=now,
        key=key,
    )


def evaluate_rebalance(body: str | None, now: datetime) -> Notice | None:
    """``events/recommendations/rebalance``: "checkpoint soon", never "stop"."""
    if body is None:
        return None
    payload = _json_object(body, "rebalance recommendation")
    _, key = _iso_time(payload.get("noticeTime"), "rebalance noticeTime")
    return Notice(
        kind=REBALANCE_RECOMMENDATION,
        action="rebalance",
        deadline=None,
        noticed_at=now,
        key=key,
    )


def _maintenance_time(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise ImdsBadAnswer(f"scheduled event {what}: expected a date string, got {value!r}")
    try:
        moment = datetime.strptime(value.strip(), MAINTENANCE_TIME_FORMAT)
    except ValueError:
        raise ImdsBadAnswer(f"scheduled event {what}: unreadable date {value[:40]!r}") from None
    return moment.replace(tzinfo=timezone.utc)


def scheduled_maintenance_evaluator(lead: float, grace: float | None = None) -> Evaluate:
    """``events/maintenance/scheduled``, acted on ``lead`` seconds before ``NotBefore``.

    Maintenance is announced days ahead; stopping training the moment it is announced would
    waste those days. ``[]`` and 404 both mean "none"; ``NotAfter`` may be missing; events that
    are not active (completed, canceled) are ignored. AWS may act until ``NotAfter``: with
    ``grace``, an event whose window ended (``NotAfter``, else ``NotBefore``) more than
    ``grace`` seconds ago is over and skipped, so the next due event, if any, is reported (the
    notice's deadline stays ``NotBefore``: the time to be ready by). Of the due events, the one
    with the earliest ``NotBefore`` is reported.
    """

    def evaluate(body: str | None, now: datetime) -> Notice | None:
        if body is None or not body.strip():
            return None
        events = _json(body, "scheduled events")
        if not isinstance(events, list):
            raise ImdsBadAnswer("scheduled events: expected a JSON array")
        due: list[Notice] = []
        for event in events:
            if not isinstance(event, dict):
                raise ImdsBadAnswer("scheduled events: an entry is not a JSON object")
            event_id, code = event.get("EventId"), event.get("Code")
            if not isinstance(event_id, str) or not event_id or not isinstance(code, str):
                raise ImdsBadAnswer("scheduled events: an entry lacks EventId or Code")
            not_before = _maintenance_time(event.get("NotBefore"), "NotBefore")
            if str(event.get("State", "active")).lower() != "active":
                continue
            # Compared as a duration: ``not_before - lead`` overflows for a year-1 date.
            not_after = event.get("NotAfter")
            end = _maintenance_time(not_after, "NotAfter") if not_after else not_before
            if grace is not None and (now - end).total_seconds() > grace:
                continue  # its window is over: whatever was announced did not happen
            if (not_before - now).total_seconds() <= lead:
                due.append(
                    Notice(
                        kind=SCHEDULED_MAINTENANCE,
                        action=code,
                        deadline=not_before,
                        noticed_at=now,
                        key=event_id,
                    )
                )
        return min(due, key=lambda notice: notice.deadline or now, default=None)

    return evaluate


def evaluate_lifecycle_state(body: str | None, now: datetime) -> Notice | None:
    """``autoscaling/target-lifecycle-state``: only ``Terminated`` is a notice."""
    if body is None:
        return None
    state = body.strip()
    if not LIFECYCLE_STATE.match(state):
        raise ImdsBadAnswer(f"target-lifecycle-state: not a lifecycle state: {state[:40]!r}")
    if state != "Terminated":
        return None
    return Notice(
        kind=ASG_TERMINATION, action="terminate", deadline=None, noticed_at=now, key=state
    )
