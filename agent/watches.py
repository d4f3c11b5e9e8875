"""What the agent watches in IMDS, and how often: one :class:`Watch` per metadata path.

The parsing lives in :mod:`spotguard.imds.parsers` (shared with the trainer hooks' agentless
mode); this module pairs each parser with its path and the interval the config asks for, and
guards it: whatever a parser raises on an odd answer becomes :class:`ImdsBadAnswer`, "unknown"
for that watch, so one path's garbage never takes down the tick that polls the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from spotguard.agent.config import AgentConfig
from spotguard.errors import ImdsBadAnswer, ImdsError
from spotguard.imds.parsers import (
    LIFECYCLE_PATH,
    MAINTENANCE_PATH,
    REBALANCE_PATH,
    SPOT_ACTION_PATH,
    Evaluate,
    evaluate_lifecycle_state,
    evaluate_rebalance,
    evaluate_spot_action,
    scheduled_maintenance_evaluator,
)
from spotguard.protocol import (
    ASG_TERMINATION,
    REBALANCE_RECOMMENDATION,
    SCHEDULED_MAINTENANCE,
    SPOT_INTERRUPTION,
    Notice,
)

__all__ = ["Watch", "guarded", "watches_from_config"]


@dataclass(frozen=True)
class Watch:
    """One metadata path polled every ``interval`` seconds."""

    name: str
    path: str
    interval: float
    evaluate: Evaluate


def guarded(name: str, evaluate: Evaluate) -> Evaluate:
    """``evaluate``, raising only :class:`ImdsError`: the parsers promise that, and a broken
    promise (an ``OverflowError`` from a year-1 date did break it) must cost one watch's
    answer, not every watch polled after it and the signals of the same tick."""

    def evaluate_guarded(body: str | None, now: datetime) -> Notice | None:
        try:
            return evaluate(body, now)
        except ImdsError:
            raise
        except Exception as exc:
            raise ImdsBadAnswer(
                f"{name}: answer could not be parsed ({type(exc).__name__}: {exc})"
            ) from exc

    return evaluate_guarded


def watches_from_config(config: AgentConfig) -> list[Watch]:
    """The enabled watches, the spot notice (the most urgent) first."""
    candidates = [
        (
            config.watch_spot_interruption,
            Watch(
                SPOT_INTERRUPTION,
                SPOT_ACTION_PATH,
                config.poll_interval,
                evaluate_spot_action,
            ),
        ),
        (
            config.watch_asg_termination,
            Watch(
                ASG_TERMINATION,
                LIFECYCLE_PATH,
                max(config.asg_interval, config.poll_interval),
                evaluate_lifecycle_state,
            ),
        ),
        (
            config.watch_scheduled_maintenance,
            Watch(
                SCHEDULED_MAINTENANCE,
                MAINTENANCE_PATH,
                max(config.maintenance_interval, config.poll_interval),
                # Expired by the watch itself, at NotAfter + grace (see ActiveNotices).
                scheduled_maintenance_evaluator(config.maintenance_lead, config.notice_grace),
            ),
        ),
        (
            config.watch_rebalance,
            Watch(
                REBALANCE_RECOMMENDATION,
                REBALANCE_PATH,
                max(config.rebalance_interval, config.poll_interval),
                evaluate_rebalance,
            ),
        ),
    ]
    return [
        Watch(watch.name, watch.path, watch.interval, guarded(watch.name, watch.evaluate))
        for enabled, watch in candidates
        if enabled
    ]
