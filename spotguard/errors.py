"""spotguard's one exception tree, for every part: core, agent, trainer hooks, drill, fleet.

Every error spotguard raises on purpose derives from :class:`SpotguardError`, so callers can
tell "we understood what went wrong" (a one-line message naming the culprit) from a bug::

    SpotguardError
    ├── ConfigError              a bad setting, config key or flag; the message names it
    │   │                        (the CLI exits 2 with it; settings objects raise it too)
    │   └── RenderError          a fleet config that cannot become Terraform variables
    ├── ProtocolError            a notice, registration or state file that is not what we wrote
    ├── ImdsError                the metadata service gave no usable answer: "unknown", not "none"
    │   ├── ImdsUnreachable      connection refused or dropped, timeout, 5xx
    │   ├── ImdsDisabled         403: the metadata endpoint is turned off for this instance
    │   └── ImdsBadAnswer        an answer we cannot parse, or a status that makes no sense
    ├── CheckpointError          anything about a checkpoint store
    │   ├── StoreError           the store cannot be used: bad URI, missing bucket, no
    │   │                        credentials, access denied, unreachable endpoint
    │   ├── CorruptCheckpoint    a manifest or payload that fails verification
    │   │   └── ResumeRefused    the store holds checkpoint data but none of it verifies:
    │   │                        no silent start from step 0 (``allow_fresh_start`` to start)
    │   ├── UnloadableCheckpoint its bytes are as written, but it cannot be loaded here (not
    │   │                        weights-only data, not enough memory): never quarantined
    │   ├── WriterConflict       another writer committed this step, or a newer one: two
    │   │                        writers on one prefix, stop instead of overwriting
    │   └── UploadFailed         a background save or commit failed (raised at the next step
    │                            boundary on every rank, or at exit)
    └── DrillFailed              a step of ``spotguard drill`` did not hold (``.step`` names it)

    SystemExit
    └── Preempted                not an error: the emergency checkpoint is done (or could not
                                 be), the process leaves with exit code 75, "resume me"

Not in the tree, on purpose: internal control-flow signals, caught at once by the code that
asked and never seen by a user (the hooks' ``NoRoomForCopy``: no memory for a snapshot, so the
save runs without one; the agent's ``PidfdUnsupported``: no pidfd, so signals go by pid). They
derive from ``Exception`` so that an ``except SpotguardError`` never takes one for a failure
to report.

This module imports nothing; every other module may import it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CorruptCheckpoint",
    "DrillFailed",
    "ImdsBadAnswer",
    "ImdsDisabled",
    "ImdsError",
    "ImdsUnreachable",
    "Preempted",
    "ProtocolError",
    "RenderError",
    "ResumeRefused",
    "SpotguardError",
    "StoreError",
    "UnloadableCheckpoint",
    "UploadFailed",
    "WriterConflict",
]


class SpotguardError(Exception):
    """Base of every error spotguard raises deliberately."""


class ConfigError(SpotguardError, ValueError):
    """A setting, configuration key or command-line flag is wrong; the message names it.

    Also a :class:`ValueError`: a bad value passed to a settings object is one.
    """


class RenderError(ConfigError):
    """A fleet config cannot become Terraform variables; the message names the key."""


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


class CheckpointError(SpotguardError):
    """Base of every checkpoint store error."""


class StoreError(CheckpointError):
    """The store cannot be used as configured; the message says what to fix."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint failed verification: it is skipped, never loaded."""


class ResumeRefused(CorruptCheckpoint):
    """The store holds checkpoint data (committed or quarantined checkpoints, unreadable
    manifests) but nothing verifies; the message lists what failed and why. Starting over from
    step 0 would lose the run silently: it takes ``allow_fresh_start=True``."""


class UnloadableCheckpoint(CheckpointError):
    """A checkpoint whose bytes match its manifest but that cannot be loaded here (not
    weights-only data, a failed allocation): the checkpoint is fine, this process is not; it
    is never quarantined, and resuming does not fall back to an older one."""


class WriterConflict(CheckpointError):
    """Another writer committed this step or a newer one under the same prefix (a duplicated
    launch, or a replacement racing the interrupted instance): this one stops instead of
    overwriting or pruning someone else's work."""


class UploadFailed(CheckpointError):
    """A save or commit running in the background failed."""


class DrillFailed(SpotguardError):
    """A drill step failed; ``step`` names it ("store", "agent", "reference",
    "interruption", "resume", "bit-exact", ...), the message says what happened."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


class Preempted(SystemExit):
    """Raised after the emergency checkpoint: the process exits with ``code`` (75 by default,
    :data:`spotguard.protocol.EXIT_PREEMPTED`) unless someone catches it. ``saved`` says
    whether the emergency checkpoint was committed; ``step`` is the step it was taken at."""

    def __init__(self, step: int, saved: bool, code: int) -> None:
        super().__init__(code)
        self.step, self.saved = step, saved
