"""The agent's exception tree.

Every error the agent raises on purpose derives from :class:`SpotguardError`, so callers can
tell "we understood what went wrong" from a bug::

    SpotguardError
    ├── ConfigError          a bad config key, value or flag (the CLI exits 2 with its message)
    ├── ProtocolError        a notice, registration or state file that is not what we wrote
    └── ImdsError            the metadata service gave no usable answer: "unknown", not "none"
        ├── ImdsUnreachable  connection refused or dropped, timeout, 5xx
        ├── ImdsDisabled     403: the metadata endpoint is turned off for this instance
        └── ImdsBadAnswer    an answer we cannot parse, or a status that makes no sense
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ImdsBadAnswer",
    "ImdsDisabled",
    "ImdsError",
    "ImdsUnreachable",
    "ProtocolError",
    "SpotguardError",
]


class SpotguardError(Exception):
    """Base of every error spotguard raises deliberately."""


class ConfigError(SpotguardError):
    """A configuration key, value or command-line flag is wrong; the message names it."""


class ProtocolError(SpotguardError):
    """A file of the agent/trainer protocol is malformed."""


class ImdsError(SpotguardError):
    """IMDS gave no usable answer. The state of the instance is unknown."""

    #: Short machine-friendly reason, used as a metrics label.
    reason = "error"


class ImdsUnreachable(ImdsError):
    """IMDS could not be reached, timed out, or answered 5xx."""

    reason = "unreachable"


class ImdsDisabled(ImdsError):
    """IMDS answered 403: the endpoint is disabled for this instance."""

    reason = "disabled"


class ImdsBadAnswer(ImdsError):
    """IMDS answered with a status or body that cannot be understood."""

    reason = "bad_answer"
