"""spotguard's on-node agent: watches IMDSv2 for the instance going away and tells training.

It never imports torch, boto3 or the trainer hooks, and stays within 30 MiB: it runs on every
training node. Its errors are in :mod:`spotguard.errors`; the files it shares with the training
processes are described in :mod:`spotguard.protocol`; the IMDS client and the parsers of its
answers are in :mod:`spotguard.imds`.
"""

from __future__ import annotations

from spotguard.agent.config import AgentConfig, load_config

__all__ = ["AgentConfig", "load_config"]
