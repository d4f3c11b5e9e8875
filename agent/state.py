"""The agent's state dir: set up so that only the agent writes there, and read defensively.

The state dir (``/run/spotguard``) holds ``agent.sock`` (see :mod:`spotguard.agent.registry`),
``notice.json`` for consumers without the socket, and ``agent-state.json`` (what the agent has
handled, so a restarted agent neither signals twice nor forgets). It is mode 0755 and owned by
the agent: other users may connect to the socket and read, never write. Still, whatever lies
there (a FIFO, a symlink, a huge file, a directory where a file belongs, left by an old version
or by root) must not block, mislead or bloat the agent: files are opened without following
symlinks or blocking, only regular files of bounded size are read, and files are replaced by
rename, which replaces a link rather than writing through it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from spotguard.agent.processes import current_identity
from spotguard.errors import ConfigError
from spotguard.protocol import (
    Notice,
    format_time,
    notice_path,
    parse_time,
    write_json_atomic,
    write_notice,
)

__all__ = [
    "HandledNotice",
    "HandledState",
    "NoticeFile",
    "bind_socket",
    "is_directory",
    "prepare_state_dir",
    "read_small_file",
    "remove_path",
]

log = logging.getLogger(__name__)

#: ``agent-state.json`` is read up to this size. What the agent writes stays far below (see
#: :meth:`HandledState.prune`), but an older version wrote more: such a file is still read, so
#: that the processes it signalled are not signalled again.
MAX_STATE_BYTES = 16 << 20
#: Persisted per notice at most: the identities of live processes signalled for it.
MAX_SIGNALLED = 4096
#: Notices kept at most; one no longer active is kept ``KEEP_INACTIVE`` seconds after it went
#: inactive (IMDS may withdraw it for a poll and serve it again: it is not handled twice).
MAX_NOTICES = 32
KEEP_INACTIVE = 6 * 3600.0
#: Directories version 1 shared with every user (mode 1777); version 2 removes them.
VERSION_1_DIRS = ("targets", "exits")


def prepare_state_dir(state_dir: Path) -> None:
    """Create the state dir (0755) or check that it belongs to the agent, and remove the
    world-writable ``targets/`` and ``exits/`` of version 1.

    A state dir owned by someone else is refused: its owner could swap the socket or the notice
    file under the agent's and the training processes' feet. So is a symlink (it would lead the
    agent's chmod and removals elsewhere), and a state dir below a directory another user may
    write to (who could replace the state dir by a symlink afterwards): every directory above it
    must belong to root or the agent and be writable by no one else, unless sticky (``/tmp``).
    The checks and changes go through a descriptor of the directory opened with
    ``O_NOFOLLOW``: what was checked is what is changed.
    """
    state_dir = Path(os.path.abspath(state_dir))
    try:
        state_dir.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _check_parents(state_dir)
        with contextlib.suppress(FileExistsError):
            os.mkdir(state_dir, 0o755)
        try:
            fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if os.path.islink(state_dir):
                msg = f"state_dir: {state_dir} is a symlink: give the real path"
                raise ConfigError(msg) from None
            raise ConfigError(f"state_dir: {state_dir} is not a directory: {exc}") from None
        try:
            info = os.fstat(fd)
            if info.st_uid != os.geteuid():
                raise ConfigError(
                    f"state_dir: {state_dir} is owned by uid {info.st_uid}, not the agent "
                    f"(uid {os.geteuid()}); only the agent may write there"
                )
            if info.st_mode & 0o022:
                log.warning("state dir %s was writable by others; now mode 0755", state_dir)
                os.fchmod(fd, 0o755)  # readable by all, writable by the agent
            for name in VERSION_1_DIRS:
                _remove_version_1(fd, state_dir, name)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigError(f"state_dir: cannot use {state_dir}: {exc}") from None


def _remove_version_1(fd: int, state_dir: Path, name: str) -> None:
    """Best effort: what another user left in the old world-writable ``targets/`` may be
    unreadable to the agent, and a leftover must never keep the agent from starting."""
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=fd)
            log.info("removed %s (version 1 registrations; the socket replaced them)",
                     state_dir / name)  # fmt: skip
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("could not remove %s (version 1 registrations, unused now): %s",
                    state_dir / name, exc)  # fmt: skip


def _check_parents(state_dir: Path) -> None:
    """Every directory above ``state_dir``, as written and with symlinks resolved, belongs to
    root or the agent and is writable by no other user (sticky directories excepted)."""
    parents = [*state_dir.parents, *Path(os.path.realpath(state_dir.parent)).parents]
    parents.append(Path(os.path.realpath(state_dir.parent)))
    for parent in dict.fromkeys(parents):
        info = os.stat(parent)
        others_write = info.st_mode & 0o002 or (info.st_mode & 0o020 and info.st_gid != 0)
        if info.st_uid not in (0, os.geteuid()) or (
            others_write and not info.st_mode & stat.S_ISVTX
        ):
            raise ConfigError(
                f"state_dir: {state_dir} lies below {parent} (owner uid {info.st_uid}, mode "
                f"{stat.S_IMODE(info.st_mode):o}), which another user may change: use a state "
                "dir whose parents only root can write to"
            )


def read_small_file(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file of at most ``limit`` bytes; ``None`` when there is none.

    Never follows a symlink, never blocks on a FIFO or device, never reads more than
    ``limit + 1`` bytes. Raises ``ValueError`` for anything that is not such a file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot open: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data


@dataclass
class HandledNotice:
    """What the agent did about one notice; persisted across restarts."""

    noticed_at: datetime
    signalled: set[str]
    #: When :meth:`HandledState.prune` first found it no longer active (``None``: active, or
    #: not seen inactive yet). Counted from here, not from ``noticed_at``: a notice active for
    #: hours that IMDS drops for one poll must not be forgotten (and handled again) at once.
    inactive_since: datetime | None = None


class HandledState:
    """``agent-state.json``: the notices handled and the targets signalled for each.

    It stays small: :meth:`prune` keeps only the identities of processes still running (a
    process that is gone cannot be signalled twice), forgets notices long inactive, and caps
    both; the daemon saves at most once per tick, when something changed (``dirty``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.notices: dict[str, HandledNotice] = {}
        self.dirty = False

    def load(self) -> None:
        try:
            data = read_small_file(self.path, MAX_STATE_BYTES)
            if data is None:
                return
            payload = json.loads(data)
            self.notices = {
                notice_id: HandledNotice(
                    noticed_at=parse_time(entry["noticed_at"]),
                    signalled=_current(entry["signalled"]),
                    inactive_since=(
                        parse_time(entry["inactive_since"]) if entry.get("inactive_since") else None
                    ),
                )
                for notice_id, entry in payload["notices"].items()
            }
            self.dirty = True  # pruned and rewritten at the first tick
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            aside = self.path.with_suffix(".corrupt")
            try:
                remove_path(aside)
                self.path.replace(aside)
            except OSError as error:
                log.error("cannot move %s aside: %s", self.path, error)
            log.error(
                "state file %s is unreadable (%s); moved to %s, starting afresh: targets may be "
                "signalled again for a notice already handled",
                self.path,
                type(exc).__name__,
                aside,
            )

    def prune(self, active: Collection[str], alive: Callable[[str], bool], now: datetime) -> None:
        """Keep only the identities for which ``alive`` holds, the ``active`` notices and those
        inactive for less than ``KEEP_INACTIVE``, within ``MAX_NOTICES``. Live identities are
        never dropped here (that would signal them again at the next tick); only what is
        written to disk is capped (:meth:`save`)."""
        for notice_id, entry in list(self.notices.items()):
            if notice_id in active:
                entry.inactive_since = None
            elif entry.inactive_since is None:
                entry.inactive_since = now
            elif (now - entry.inactive_since).total_seconds() > KEEP_INACTIVE:
                del self.notices[notice_id]
                continue
            entry.signalled = {identity for identity in entry.signalled if alive(identity)}
        newest = sorted(self.notices, key=lambda n: (n in active, self.notices[n].noticed_at))
        for notice_id in newest[: max(0, len(newest) - MAX_NOTICES)]:
            del self.notices[notice_id]

    def save(self) -> None:
        self.dirty = False
        payload: dict[str, Any] = {
            "version": 1,
            "notices": {
                notice_id: {
                    "noticed_at": format_time(entry.noticed_at),
                    "inactive_since": (
                        format_time(entry.inactive_since) if entry.inactive_since else None
                    ),
                    # a restart forgets the rest: at most one more signal each, then
                    "signalled": sorted(entry.signalled)[:MAX_SIGNALLED],
                }
                for notice_id, entry in self.notices.items()
            },
        }
        if is_directory(self.path):
            remove_path(self.path)
        write_json_atomic(self.path, payload, mode=0o600)


def _current(saved: list[str]) -> set[str]:
    """The saved identities in today's form (see :func:`current_identity`)."""
    return {who for who in map(current_identity, saved) if who is not None}


class NoticeFile:
    """``notice.json``: the most urgent active notice, or no file when none is active.

    A failure to write or remove it is logged (once per distinct error) and never raised: the
    socket and the signals matter more than the file, and the poll loop must go on.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = notice_path(state_dir)
        self.published: Notice | None = None
        self._last_error = ""

    def publish(self, notice: Notice | None) -> None:
        """Write ``notice`` (when it is not the one already there), or remove the file."""
        try:
            if notice is None:
                if self.path.is_symlink() or self.path.exists():
                    remove_path(self.path)
                    log.info("notice file removed: no active notice")
            elif notice != self.published:
                if is_directory(self.path):
                    remove_path(self.path)
                write_notice(self.state_dir, notice)
        except OSError as exc:
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                log.error("cannot update %s: %s", self.path, exc)
            return
        self.published = notice
        self._last_error = ""


def is_directory(path: Path) -> bool:
    """A real directory; a symlink to one is not (renaming a file over it replaces the link)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def remove_path(path: Path) -> None:
    """Remove whatever is at ``path`` (a directory with its contents), never following links."""
    if is_directory(path):
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def bind_socket(path: Path) -> tuple[socket.socket, int]:
    """A listening Unix socket at ``path`` (mode 0666, non-blocking) and its inode. Bound under
    a temporary name, then renamed into place: a client never finds a socket with the wrong
    mode, and whatever was at that path (a socket of an earlier run, a symlink, a FIFO, a
    directory) is replaced, never followed. Raises :class:`OSError`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        remove_path(temporary)
        listener.bind(str(temporary))
        os.chmod(temporary, 0o666)  # noqa: S103 - any local process may register itself
        listener.listen(128)
        listener.setblocking(False)
        if is_directory(path):
            log.warning("%s was a directory; removed", path)
            remove_path(path)
        os.replace(temporary, path)
        return listener, os.stat(path, follow_symlinks=False).st_ino
    except OSError:
        listener.close()
        remove_path(temporary)
        raise
