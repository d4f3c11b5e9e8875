"""What the agent watches in IMDS, and how often: one :class:`Watch` per metadata path.

The parsing lives in :mod:`spotguard.imds.parsers` (shared with the trainer hooks' agentless
mode); this module pairs each parser with its path and the interval the config asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

from spotguard.agent.config import AgentConfig
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

__all__ = ["Watch", "watches_from_config"]


@dataclass(frozen=True)
class Watch:
    """One metadata path polled every ``interval`` seconds."""

    name: str
    path: str
    interval: float
    evaluate: Evaluate


def watches_from_config(config: AgentConfig) -> list[Watch]:
    """The enabled watches, the spot notice (the most urgent) first."""
    candidates = [
        (
            config.watch_spot_interruption,
            Watch(
                "spot-interruption",
                SPOT_ACTION_PATH,
                config.poll_interval,
                evaluate_spot_action,
            ),
        ),
        (
            config.watch_asg_termination,
            Watch(
                "asg-termination",
                LIFECYCLE_PATH,
                max(config.asg_interval, config.poll_interval),
                evaluate_lifecycle_state,
            ),
        ),
        (
            config.watch_scheduled_maintenance,
            Watch(
                "scheduled-maintenance",
                MAINTENANCE_PATH,
                max(config.maintenance_interval, config.poll_interval),
                scheduled_maintenance_evaluator(config.maintenance_lead),
            ),
        ),
        (
            config.watch_rebalance,
            Watch(
                "rebalance-recommendation",
                REBALANCE_PATH,
                max(config.rebalance_interval, config.poll_interval),
                evaluate_rebalance,
            ),
        ),
    ]
    return [watch for enabled, watch in candidates if enabled]
