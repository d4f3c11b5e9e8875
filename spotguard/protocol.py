"""The files through which the agent and the training processes talk.

Both sides share one *state dir* (``/run/spotguard`` by default, ``SPOTGUARD_STATE_DIR``)::

    <state_dir>/notice.json          the most urgent active notice (written by the agent)
    <state_dir>/targets/<pid>.json   "signal me": one per training process (written by the hooks)
    <state_dir>/exits/<pid>.json     how a registered process ended (written by the hooks)

Files go through a plain filesystem instead of a socket so that a container with the state dir
bind-mounted can take part, and so that either side can restart without losing anything. Every
write is atomic (temp file + rename): a reader never sees half a file.

It also holds the numbers both sides must agree on (the exit code of a preempted run, the
lead time of a spot notice) and the one atomic-write helper. This module imports nothing outside
the standard library and :mod:`spotguard.errors`; the agent, the trainer hooks and the drill use
it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spotguard.errors import ProtocolError

__all__ = [
    "ALLOWED_SIGNALS",
    "DEFAULT_STATE_DIR",
    "EXIT_PREEMPTED",
    "NOTICE_KINDS",
    "SIGNALLING_KINDS",
    "SPOT_NOTICE_SECONDS",
    "ExitRecord",
    "Notice",
    "Registration",
    "format_time",
    "parse_time",
    "read_exit_record",
    "read_notice",
    "read_registrations",
    "register",
    "registration_dir",
    "state_dir_from_env",
    "unregister",
    "write_atomic",
    "write_exit_record",
    "write_json_atomic",
    "write_notice",
]

PROTOCOL_VERSION = 1
DEFAULT_STATE_DIR = Path("/run/spotguard")

#: EX_TEMPFAIL: "preempted, resume me". A preempted run never exits 0 (that says "done"), and a
#: supervisor on the dying node must not restart it (``RestartPreventExitStatus=75``).
EXIT_PREEMPTED = 75
#: The lead time EC2 gives with a spot interruption notice: the action is two minutes away.
SPOT_NOTICE_SECONDS = 120.0

#: Notice kinds, most urgent first: the notice file holds the most urgent active one.
NOTICE_KINDS = (
    "spot-interruption",
    "asg-termination",
    "scheduled-maintenance",
    "rebalance-recommendation",
)
#: Kinds after which the instance goes away: targets are signalled. A rebalance recommendation
#: only updates the notice file ("checkpoint soon"), because most are not followed by an
#: interruption.
SIGNALLING_KINDS = frozenset(NOTICE_KINDS[:3])

#: Signals a registration may ask for. Never SIGKILL/SIGSTOP: the point is a clean save.
ALLOWED_SIGNALS = frozenset({"SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP"})


def state_dir_from_env(environ: dict[str, str] | None = None) -> Path:
    """The state dir named by ``SPOTGUARD_STATE_DIR``, else the default."""
    env = os.environ if environ is None else environ
    return Path(env.get("SPOTGUARD_STATE_DIR") or DEFAULT_STATE_DIR)


def format_time(moment: datetime) -> str:
    """UTC, millisecond precision, ``Z`` suffix: ``2026-11-29T08:20:01.234Z``."""
    text = moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """Parse an ISO-8601 time as IMDS and this protocol write it; naive times are UTC."""
    if not isinstance(text, str):
        raise ValueError(f"expected an ISO-8601 time string, got {type(text).__name__}")
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` so that readers see the old file or the new one, never a mix: a temp file
    in the same directory, flushed to disk, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict[str, Any], mode: int = 0o644) -> None:
    """:func:`write_atomic` of a JSON object."""
    write_atomic(path, json.dumps(payload, sort_keys=True).encode(), mode)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise ProtocolError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    return payload


@dataclass(frozen=True)
class Notice:
    """One event that threatens the instance, as the agent understood it."""

    kind: str
    action: str
    deadline: datetime | None
    noticed_at: datetime
    #: Stable identity across polls and restarts: the kind plus what IMDS says about the event
    #: (its time or event id), never the time we happened to see it.
    key: str
    source: str = "imds"

    def __post_init__(self) -> None:
        if self.kind not in NOTICE_KINDS:
            raise ProtocolError(f"notice kind {self.kind!r} is not one of {NOTICE_KINDS}")

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.key}"

    @property
    def signals_targets(self) -> bool:
        return self.kind in SIGNALLING_KINDS

    @property
    def urgency(self) -> int:
        """Lower is more urgent."""
        return NOTICE_KINDS.index(self.kind)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PROTOCOL_VERSION,
            "id": self.id,
            "kind": self.kind,
            "action": self.action,
            "deadline": format_time(self.deadline) if self.deadline else None,
            "noticed_at": format_time(self.noticed_at),
            "source": self.source,
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Notice:
        try:
            kind = payload["kind"]
            notice_id = payload["id"]
            prefix = f"{kind}/"
            if not isinstance(notice_id, str) or not notice_id.startswith(prefix):
                raise ValueError(f"id {notice_id!r} does not start with {prefix!r}")
            deadline = payload.get("deadline")
            return cls(
                kind=kind,
                action=str(payload["action"]),
                deadline=parse_time(deadline) if deadline else None,
                noticed_at=parse_time(payload["noticed_at"]),
                key=notice_id[len(prefix) :],
                source=str(payload.get("source", "imds")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed notice: {exc!r}") from None


def write_notice(state_dir: Path, notice: Notice) -> Path:
    """Publish ``notice`` as ``<state_dir>/notice.json`` (atomic, world-readable)."""
    path = state_dir / "notice.json"
    write_json_atomic(path, notice.to_json())
    return path


def read_notice(state_dir: Path) -> Notice | None:
    """The current notice, ``None`` when there is none; :class:`ProtocolError` on garbage."""
    path = state_dir / "notice.json"
    if not path.exists():
        return None
    return Notice.from_json(_read_json(path))


@dataclass(frozen=True)
class Registration:
    """A process that asked to be signalled when the instance is about to go away."""

    pid: int
    create_time: float
    signal: str = "SIGUSR1"
    rank: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.pid, int) or isinstance(self.pid, bool) or self.pid <= 1:
            raise ProtocolError(f"registration pid must be an integer > 1, got {self.pid!r}")
        if self.signal not in ALLOWED_SIGNALS:
            raise ProtocolError(
                f"registration signal {self.signal!r} is not one of {sorted(ALLOWED_SIGNALS)}"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "create_time": self.create_time,
            "signal": self.signal,
            "rank": self.rank,
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Registration:
        try:
            return cls(
                pid=payload["pid"],
                create_time=float(payload["create_time"]),
                signal=str(payload.get("signal", "SIGUSR1")),
                rank=int(payload.get("rank", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed registration: {exc!r}") from None


def registration_dir(state_dir: Path) -> Path:
    """Where the hooks put their registrations (the agent creates it, sticky, mode 1777)."""
    return state_dir / "targets"


def register(state_dir: Path, registration: Registration) -> Path:
    """Ask the agent to signal this process. The file's owner must own the process."""
    path = registration_dir(state_dir) / f"{registration.pid}.json"
    write_json_atomic(path, registration.to_json())
    return path


def unregister(state_dir: Path, pid: int) -> None:
    (registration_dir(state_dir) / f"{pid}.json").unlink(missing_ok=True)


def read_registrations(state_dir: Path) -> tuple[list[tuple[Path, Registration]], list[str]]:
    """All registrations, and a one-line problem for each file that is not one."""
    found: list[tuple[Path, Registration]] = []
    problems: list[str] = []
    directory = registration_dir(state_dir)
    if not directory.is_dir():
        return found, problems
    for path in sorted(directory.glob("*.json")):
        try:
            registration = Registration.from_json(_read_json(path))
            if path.stem != str(registration.pid):
                raise ProtocolError(f"{path}: names pid {registration.pid}, not {path.stem}")
            found.append((path, registration))
        except ProtocolError as exc:
            problems.append(str(exc))
    return found, problems


@dataclass(frozen=True)
class ExitRecord:
    """How a registered process ended, written by the process itself just before it exits.

    The agent cannot read the exit status of a process that is not its child; this record is
    how it learns (and logs) that the emergency checkpoint ended in exit code 75.
    """

    pid: int
    create_time: float
    exit_code: int
    exited_at: datetime


def write_exit_record(state_dir: Path, record: ExitRecord) -> Path:
    path = state_dir / "exits" / f"{record.pid}.json"
    write_json_atomic(
        path,
        {
            "pid": record.pid,
            "create_time": record.create_time,
            "exit_code": record.exit_code,
            "exited_at": format_time(record.exited_at),
        },
    )
    return path


def read_exit_record(
    state_dir: Path, pid: int, create_time: float | None = None
) -> ExitRecord | None:
    """The exit record of exactly that process (pid *and* start time, when given), if it left
    one."""
    path = state_dir / "exits" / f"{pid}.json"
    if not path.exists():
        return None
    payload = _read_json(path)
    try:
        record = ExitRecord(
            pid=int(payload["pid"]),
            create_time=float(payload["create_time"]),
            exit_code=int(payload["exit_code"]),
            exited_at=parse_time(payload["exited_at"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"{path}: malformed exit record: {exc!r}") from None
    if create_time is not None and abs(record.create_time - create_time) >= 0.01:
        return None
    return record
