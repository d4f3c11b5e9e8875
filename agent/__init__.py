"""spotguard's on-node agent: watches IMDSv2 for the instance going away and tells training.

It never imports torch or boto3, and stays within 30 MiB: it runs on every training node.
The errors it raises are drawn in :mod:`spotguard.agent.errors`; the files it shares with the
training processes are described in :mod:`spotguard.agent.protocol`.
"""

from __future__ import annotations

from spotguard.agent.config import AgentConfig, load_config
from spotguard.agent.errors import (
    ConfigError,
    ImdsBadAnswer,
    ImdsDisabled,
    ImdsError,
    ImdsUnreachable,
    ProtocolError,
    SpotguardError,
)
from spotguard.agent.imds import ImdsClient
from spotguard.agent.protocol import Notice, Registration

__all__ = [
    "AgentConfig",
    "ConfigError",
    "ImdsBadAnswer",
    "ImdsClient",
    "ImdsDisabled",
    "ImdsError",
    "ImdsUnreachable",
    "Notice",
    "ProtocolError",
    "Registration",
    "SpotguardError",
    "load_config",
]
