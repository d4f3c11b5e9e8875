"""How the agent and the training processes talk (DESIGN.md, "Agent ↔ trainer").

Both sides share one *state dir* (``/run/spotguard`` by default, ``SPOTGUARD_STATE_DIR``),
owned by the agent and writable by it alone::

    <state_dir>/agent.sock     the registration socket (Unix stream, newline-delimited JSON)
    <state_dir>/notice.json    the most urgent active notice (written by the agent)

A training process connects and sends ``{"v": 2, "op": "register", "signal", "rank"}``; the
agent takes its pid and uid from the kernel (``SO_PEERCRED``), never from the message, and the
registration lives exactly as long as the connection. The agent pushes every notice down each
connection (``{"op": "notice", ...}``) as well as signalling; the process says how it ends
(``{"op": "exit", "code", "step"}``) before it leaves. The notice file serves consumers without
the socket; its writes are atomic (temp file + rename): a reader never sees half a file.

It also holds the numbers both sides must agree on (the exit code of a preempted run, the
lead time of a spot notice), the names of the checkpoint store's layout that readers outside the
hooks rely on (the fleet's job-end and the CLI look for ``ckpt-<step>/manifest.json``), and the
one atomic-write helper. This module imports nothing outside the standard library and
:mod:`spotguard.errors`; the agent, the trainer hooks, the fleet and the drill use it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from spotguard.errors import ProtocolError

__all__ = [
    "AGENT_OPS",
    "ALLOWED_SIGNALS",
    "ASG_TERMINATION",
    "CLIENT_OPS",
    "DEFAULT_STATE_DIR",
    "EXIT_PREEMPTED",
    "MANIFEST_NAME",
    "MAX_MESSAGE_BYTES",
    "NOTICE_GRACE_SECONDS",
    "NOTICE_KINDS",
    "NOTICE_NAME",
    "REBALANCE_RECOMMENDATION",
    "SCHEDULED_MAINTENANCE",
    "SIGNALLING_KINDS",
    "SOCKET_NAME",
    "SOCKET_VERSION",
    "SPOT_INTERRUPTION",
    "SPOT_NOTICE_SECONDS",
    "STATE_DIR_ENV",
    "STEP_DIR_PATTERN",
    "STEP_DIR_PREFIX",
    "Notice",
    "decode_message",
    "encode_message",
    "format_time",
    "notice_path",
    "parse_step_dir",
    "parse_time",
    "read_notice",
    "socket_path",
    "state_dir_from_env",
    "step_dir",
    "write_atomic",
    "write_json_atomic",
    "write_notice",
]

PROTOCOL_VERSION = 1
DEFAULT_STATE_DIR = Path("/run/spotguard")
#: The environment variable that names the state dir (both sides read it; the drill sets it).
STATE_DIR_ENV = "SPOTGUARD_STATE_DIR"

#: EX_TEMPFAIL: "preempted, resume me". A preempted run never exits 0 (that says "done"), and a
#: supervisor on the dying node must not restart it (``RestartPreventExitStatus=75``).
EXIT_PREEMPTED = 75
#: The lead time EC2 gives with a spot interruption notice: the action is two minutes away.
SPOT_NOTICE_SECONDS = 120.0
#: A notice this long past its deadline is a leftover, not news: the agent drops it (its
#: ``notice_grace`` default) and a training process ignores it.
NOTICE_GRACE_SECONDS = 300.0

#: The notice kinds (the notice file's ``kind``; the agent's watches and config use them too).
SPOT_INTERRUPTION = "spot-interruption"
ASG_TERMINATION = "asg-termination"
SCHEDULED_MAINTENANCE = "scheduled-maintenance"
REBALANCE_RECOMMENDATION = "rebalance-recommendation"
#: Notice kinds, most urgent first: the notice file holds the most urgent active one.
NOTICE_KINDS = (SPOT_INTERRUPTION, ASG_TERMINATION, SCHEDULED_MAINTENANCE, REBALANCE_RECOMMENDATION)
#: Kinds after which the instance goes away: targets are signalled. A rebalance recommendation
#: only updates the notice file ("checkpoint soon"), because most are not followed by an
#: interruption.
SIGNALLING_KINDS = frozenset(NOTICE_KINDS[:3])

#: Signals a registration may ask for. Never SIGKILL/SIGSTOP: the point is a clean save.
ALLOWED_SIGNALS = frozenset({"SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP"})


#: The checkpoint store's layout: ``<uri>/ckpt-<12-digit step>/`` holds one checkpoint's files,
#: and its ``manifest.json``, written last and only if absent, is the commit.
MANIFEST_NAME = "manifest.json"
#: What every checkpoint directory's name starts with (a listing of ``<uri>/ckpt-`` sees
#: checkpoints only, whatever else the prefix holds).
STEP_DIR_PREFIX = "ckpt-"
#: A checkpoint's directory name; the step is its only group.
STEP_DIR_PATTERN = re.compile(rf"{STEP_DIR_PREFIX}(\d{{12}})")


def step_dir(step: int) -> str:
    """The directory name of the checkpoint of ``step``: sorting names sorts steps."""
    return f"{STEP_DIR_PREFIX}{step:012d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a checkpoint directory name, ``None`` for any other name."""
    match = STEP_DIR_PATTERN.fullmatch(name)
    return int(match.group(1)) if match else None


def state_dir_from_env(environ: dict[str, str] | None = None) -> Path:
    """The state dir named by ``SPOTGUARD_STATE_DIR`` (:data:`STATE_DIR_ENV`), else the
    default."""
    env = os.environ if environ is None else environ
    return Path(env.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


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


def write_atomic(
    path: Path,
    data: bytes | Callable[[IO[bytes]], None],
    mode: int = 0o644,
    *,
    check: Callable[[Path], None] | None = None,
    exclusive: bool = False,
    spool_dir: Path | None = None,
) -> None:
    """Write a file so that readers see the old one or the new one, never a mix: a temp file,
    flushed to disk, then renamed over ``path``.

    ``data`` is the content, or a function that writes it to the open temp file (a large
    payload streamed, never held in memory twice). ``check`` runs on the complete temp file
    before it takes the name (a file that does not load never replaces a good one). With
    ``exclusive`` the file is linked into place instead: ``FileExistsError`` when ``path``
    exists, so of two writers exactly one wins. The temp file lives beside ``path``, or in
    ``spool_dir`` (on the same file system): then ``path``'s directory is made only once the
    file is complete, so a write that fails or is killed leaves no directory behind. Nothing
    but a killed process's temp file is left on any failure.
    """
    spool = path.parent if spool_dir is None else spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=spool, prefix=f".{path.name[:64]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        if check is not None:
            check(Path(tmp))
        path.parent.mkdir(parents=True, exist_ok=True)
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


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


#: The notice file, in the state dir.
NOTICE_NAME = "notice.json"


def notice_path(state_dir: Path) -> Path:
    return state_dir / NOTICE_NAME


def write_notice(state_dir: Path, notice: Notice) -> Path:
    """Publish ``notice`` as ``<state_dir>/notice.json`` (atomic, world-readable)."""
    path = notice_path(state_dir)
    write_json_atomic(path, notice.to_json())
    return path


def read_notice(state_dir: Path) -> Notice | None:
    """The current notice, ``None`` when there is none; :class:`ProtocolError` on garbage."""
    path = notice_path(state_dir)
    if not path.exists():
        return None
    return Notice.from_json(_read_json(path))


# -- the registration socket (version 2) ------------------------------------------------------

#: The agent's registration socket, in the state dir.
SOCKET_NAME = "agent.sock"
SOCKET_VERSION = 2
#: A message longer than this (newline included) is not one: the agent drops the connection.
MAX_MESSAGE_BYTES = 4096
#: What each side may send: the client ``register`` and ``exit``; the agent ``registered``
#: (the pid it took from the kernel), ``notice`` and ``error`` (just before it hangs up).
CLIENT_OPS = frozenset({"register", "exit"})
AGENT_OPS = frozenset({"registered", "notice", "error"})


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def encode_message(op: str, **fields: Any) -> bytes:
    """One message: a JSON object on one line, ``{"v": 2, "op": ..., ...}``."""
    line = json.dumps({"v": SOCKET_VERSION, "op": op, **fields}, separators=(",", ":")) + "\n"
    data = line.encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{op} message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def decode_message(line: bytes, ops: frozenset[str]) -> dict[str, Any]:
    """Check one received line (without or with its newline) against the ops this side may
    receive; :class:`ProtocolError` with a one-line reason for anything else."""
    if len(line) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(line)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        payload = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not a JSON message: {type(exc).__name__}") from None
    if not isinstance(payload, dict):
        raise ProtocolError(f"expected a JSON object, got {type(payload).__name__}")
    if payload.get("v") != SOCKET_VERSION:
        raise ProtocolError(f"unsupported protocol version {payload.get('v')!r:.40}")
    op = payload.get("op")
    if op not in ops:
        raise ProtocolError(f"unexpected op {op!r:.40}")
    check = _CHECKS.get(op)
    if check is not None:
        check(payload)
    return payload


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_register(payload: dict[str, Any]) -> None:
    if payload.get("signal") not in ALLOWED_SIGNALS:
        raise ProtocolError(f"register: signal must be one of {sorted(ALLOWED_SIGNALS)}")
    if not _is_int(payload.get("rank", 0), 0, 1 << 20):
        raise ProtocolError("register: rank must be a small non-negative integer")


def _check_exit(payload: dict[str, Any]) -> None:
    if not _is_int(payload.get("code"), 0, 255):
        raise ProtocolError("exit: code must be an integer 0-255")
    step = payload.get("step")
    if step is not None and not _is_int(step, 0, 1 << 62):
        raise ProtocolError("exit: step must be a non-negative integer or null")


def _check_registered(payload: dict[str, Any]) -> None:
    if not _is_int(payload.get("pid"), 1, 1 << 31):
        raise ProtocolError("registered: pid must be a positive integer")


def _check_notice(payload: dict[str, Any]) -> None:
    Notice.from_json({key: value for key, value in payload.items() if key not in ("v", "op")})


_CHECKS = {
    "register": _check_register,
    "exit": _check_exit,
    "registered": _check_registered,
    "notice": _check_notice,
}
