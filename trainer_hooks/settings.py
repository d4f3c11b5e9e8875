"""The settings of the trainer hooks, written once: every default and every check lives here.

:class:`GuardSettings` is what both front ends (:class:`~spotguard.trainer_hooks.SpotGuard` and
:class:`~spotguard.trainer_hooks.lightning.SpotCheckpoint`) build from their keyword arguments;
:class:`TransferSettings` tunes S3 transfers. Both are frozen and validate themselves: a bad
value raises :class:`~spotguard.errors.ConfigError` (a ``ValueError``) naming the setting.

The keyword arguments the front ends accept are typed by :class:`GuardOptions` (and, for the
cadence that Lightning names its own way, by the front end itself); a test holds those names to
the fields of :class:`GuardSettings`, so the two cannot drift apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from spotguard.errors import ConfigError
from spotguard.protocol import ALLOWED_SIGNALS, EXIT_PREEMPTED, SPOT_NOTICE_SECONDS
from spotguard.trainer_hooks._internals.store_uri import parse_store_uri

__all__ = ["CommonOptions", "GuardOptions", "GuardSettings", "TransferSettings"]

MiB = 2**20
#: The values of :attr:`GuardSettings.checkpoint_format`.
CHECKPOINT_FORMATS = ("auto", "torch", "dcp")


@dataclass(frozen=True)
class TransferSettings:
    """Parallelism and part sizes for S3 transfers.

    Uploads use small parts (``part_size``, S3's usual 8 MiB): the serialization streams into
    the upload, so the first part leaves after 8 MiB instead of 64, and many small parts keep
    every connection busy until the end; measured (``bench/upload_parts.py``), 8 MiB parts
    saved 256 MiB and 1 GiB checkpoints about 1.4 x faster than 64 MiB parts. A file may
    have at most 10,000 parts, so when the size of what is saved is known (the hooks know
    their snapshot's) the part grows to fit; a payload of unknown size is limited to
    ``10,000 x part_size`` (78 GiB at 8 MiB).
    Downloads use large ranges (``download_part_size``): each ranged GET costs a round trip,
    and moto even re-reads the whole object per range. 16 threads per transfer keep a large
    instance's link busy on real S3.
    """

    part_size: int = 8 * MiB
    download_part_size: int = 64 * MiB
    threads: int = 16
    #: Attempts per request (botocore "standard" retries: 5xx, throttling, dropped connections).
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if self.part_size < 5 * MiB:
            raise ConfigError(f"part_size must be >= 5 MiB (S3's minimum), got {self.part_size}")
        if self.download_part_size < 1 * MiB:
            raise ConfigError(f"download_part_size must be >= 1 MiB, got {self.download_part_size}")
        if not 1 <= self.threads <= 128:
            raise ConfigError(f"threads must be 1..128, got {self.threads}")
        if not 1 <= self.max_attempts <= 20:
            raise ConfigError(f"max_attempts must be 1..20, got {self.max_attempts}")


@dataclass(frozen=True)
class GuardSettings:
    """Everything a guard can be told; both front ends build one of these."""

    #: The checkpoint store: a local path, ``file:///path`` or ``s3://bucket/prefix``.
    uri: str
    #: Periodic save every N steps (optimizer steps under Lightning).
    every_n_steps: int | None = None
    #: Periodic save when this many seconds passed since the last one.
    every_seconds: float | None = None
    #: Committed checkpoints kept after each periodic save (``None``: keep all).
    keep_last: int | None = 3
    #: Start from step 0 even when the store holds checkpoints of which none verifies
    #: (otherwise :class:`~spotguard.errors.ResumeRefused`: never a silent fresh start).
    allow_fresh_start: bool = False
    #: The agent's state dir (default ``SPOTGUARD_STATE_DIR``, else ``/run/spotguard``).
    state_dir: str | Path | None = None
    #: Signals that mean "save now, then exit"; the first is the one the agent is asked for.
    signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM")
    #: Exit code after the emergency checkpoint ("preempted, resume me"); never 0.
    exit_code: int = EXIT_PREEMPTED
    #: Seconds assumed left after a stop request that came with no notice (a bare SIGTERM).
    default_budget: float = 30.0
    #: Seconds kept free before the deadline: the process must still exit after the save.
    safety_margin: float = 5.0
    #: How often the agent's notice file is looked at (the channel inside a container).
    notice_poll_interval: float = 0.5
    #: Poll IMDS in-process (spot notice and rebalance) when no agent runs on the node.
    imds_endpoint: str | None = None
    imds_poll_interval: float = 1.0
    #: Part sizes and parallelism of S3 transfers.
    transfer: TransferSettings | None = None
    #: The writer lease (one writer per prefix): renewed every ttl / 4 s; a holder silent for
    #: ttl s (its instance gone) may be taken over.
    lease_ttl: float = 60.0
    #: How long a new writer waits for a live holder to finish (a replacement instance for the
    #: interrupted one's emergency save); ``None``: ``SPOTGUARD_LEASE_WAIT`` (the fleet module
    #: sets it above its rebalance termination delay), else the spot notice plus one ``lease_ttl``.
    lease_wait: float | None = None
    #: How much lower than training the background save runs (Linux niceness, per thread,
    #: inherited by its transfer threads): where cores are short, training goes first and a
    #: periodic save takes longer (the next one is deferred until it is done); 0: the same
    #: priority as training. Emergency saves run in the training thread, at its priority.
    save_niceness: int = 10
    #: How checkpoints are written: ``torch`` (one ``torch.save`` file of the whole state,
    #: from rank 0, plus each rank's own), ``dcp`` (``torch.distributed.checkpoint``: every
    #: rank writes its shards, and a resume may reshard to another world size), or ``auto``:
    #: ``dcp`` when the state holds DTensors (FSDP2, tensor parallelism: no rank holds it all),
    #: else ``torch``. Decided once, the same on every rank, at the first restore() or step().
    #: A resume loads the newest checkpoint whatever its format.
    checkpoint_format: str = "auto"

    def __post_init__(self) -> None:
        parse_store_uri(self.uri)  # the rule the store applies: a bad URI fails here, not later
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ConfigError(
                f"checkpoint_format must be one of {', '.join(CHECKPOINT_FORMATS)}, got "
                f"{self.checkpoint_format!r}"
            )
        if not 0 <= self.save_niceness <= 19:
            raise ConfigError(f"save_niceness must be 0..19, got {self.save_niceness}")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.every_seconds is not None and self.every_seconds <= 0:
            raise ConfigError(f"every_seconds must be > 0, got {self.every_seconds}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1 or None, got {self.keep_last}")
        for name in self.signals:
            if name not in ALLOWED_SIGNALS:
                raise ConfigError(f"signals: {name!r} cannot be handled for a clean save")
        if not 1 <= self.exit_code <= 255:
            raise ConfigError(f"exit_code must be 1..255, got {self.exit_code}")
        for name in (
            "default_budget",
            "safety_margin",
            "notice_poll_interval",
            "imds_poll_interval",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.lease_ttl <= 0:
            raise ConfigError(f"lease_ttl must be > 0, got {self.lease_ttl}")
        if self.lease_wait is not None and self.lease_wait < 0:
            raise ConfigError(f"lease_wait must be >= 0 or None, got {self.lease_wait}")
        if self.lease_wait is None:
            _lease_wait_from_environment()  # a bad value fails here, not at install

    @property
    def lease_wait_seconds(self) -> float:
        """How long a new writer waits for the lease, the default resolved."""
        if self.lease_wait is not None:
            return self.lease_wait
        from_environment = _lease_wait_from_environment()
        if from_environment is not None:
            return from_environment
        return SPOT_NOTICE_SECONDS + self.lease_ttl


def _lease_wait_from_environment() -> float | None:
    """``SPOTGUARD_LEASE_WAIT`` (seconds >= 0), or ``None`` when it is unset or empty."""
    text = os.environ.get("SPOTGUARD_LEASE_WAIT", "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"SPOTGUARD_LEASE_WAIT must be a number of seconds >= 0, got {text!r}")
    return value


class CommonOptions(TypedDict, total=False):
    """Keyword arguments both front ends take, with :class:`GuardSettings`' meaning."""

    keep_last: int | None
    allow_fresh_start: bool
    state_dir: str | Path | None
    signals: tuple[str, ...]
    exit_code: int
    default_budget: float
    safety_margin: float
    notice_poll_interval: float
    imds_endpoint: str | None
    imds_poll_interval: float
    transfer: TransferSettings | None
    lease_ttl: float
    lease_wait: float | None
    save_niceness: int
    checkpoint_format: str


class GuardOptions(CommonOptions, total=False):
    """Keyword arguments of :class:`~spotguard.trainer_hooks.SpotGuard`."""

    every_n_steps: int | None
    every_seconds: float | None
