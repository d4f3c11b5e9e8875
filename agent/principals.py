"""Who answers for a uid: connections are counted per *principal*, not per uid.

One local user can act under many uids without any privilege: those of its subordinate range
(``/etc/subuid``, which ``newuidmap`` lets it enter; Ubuntu gives every user 65,536) and, on
systems that hand out ranges by other means (SSSD ``subid``, systemd's nsresourced, a kubelet
without an ``/etc/subuid`` entry), uids nobody has listed at all. Counting raw uids let one user
take the per-uid cap from each of four uids and fill the whole table, so that a trainer started
afterwards was refused and never signalled. So:

* a uid inside a range of ``/etc/subuid`` counts as the range's owner, the whole range at once;
  except a range over 65,536 owned by a system account (below ``UID_MIN``, 1000) or by a name
  without a local account: a pool handed out to containers (``containers`` for podman
  ``--userns=auto``, ``kubelet``, ``dockremap``), where each 65,536-uid block counts apart, so
  one container cannot take the places of all the others;
* a uid of 65,536 or more that no range lists is a directory user (LDAP, SSSD, FreeIPA) if the
  name service knows it: then it counts as itself. The name service may block (a network
  directory), so it is asked in a thread of its own, never in the agent's loop; until it has
  answered, and for uids it does not know (subordinate uids handed out unlisted), the uid counts
  by its 65,536-uid block (what one user namespace spans);
* the rest (local users, system accounts) count as themselves.

Files are read for the ranges and owner names (``/etc/subuid``, ``/etc/passwd``), re-read when
they change and trusted only when root owns them and nobody else may write them.
"""

from __future__ import annotations

import bisect
import os
import pwd
import queue
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

__all__ = ["BLOCK", "DirectoryUsers", "Principals"]

#: The uids one user namespace spans in the usual layouts (and Ubuntu's subordinate range).
BLOCK = 1 << 16
#: Files larger than this are not read (they are root's files, but the agent stays bounded).
MAX_FILE_BYTES = 1 << 20
#: Owners below this are system accounts (``UID_MIN`` of ``/etc/login.defs``' default).
UID_MIN = 1000
_SUBUID_LINE = re.compile(r"^([^:\s]{1,64}):([0-9]{1,10}):([0-9]{1,10})$", re.ASCII)


def _trusted_text(path: Path) -> tuple[tuple[int, int, int] | None, str]:
    """The file's identity (to notice a change) and its text; empty when missing, not a
    regular file, too large, or writable by someone other than root."""
    try:
        info = os.stat(path)
    except OSError:
        return None, ""
    seen = (info.st_ino, info.st_mtime_ns, info.st_size)
    trusted = info.st_uid == 0 and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if not trusted or not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FILE_BYTES:
        return seen, ""
    try:
        return seen, path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return seen, ""


class DirectoryUsers:
    """Whether the name service knows a uid, asked in a daemon thread: ``known(uid)`` answers
    from what it learnt (``None`` while it does not know yet, and asks). Bounded: the answers
    kept, the questions waiting (more are dropped, asked again later)."""

    def __init__(
        self,
        lookup: Callable[[int], object] = pwd.getpwuid,
        *,
        keep: int = 4096,
        waiting: int = 256,
    ) -> None:
        self._lookup = lookup
        self._keep = keep
        self._answers: OrderedDict[int, bool] = OrderedDict()
        self._asked: set[int] = set()
        self._questions: queue.Queue[int] = queue.Queue(maxsize=waiting)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def known(self, uid: int) -> bool | None:
        with self._lock:
            if uid in self._answers:
                self._answers.move_to_end(uid)
                return self._answers[uid]
            if uid in self._asked:
                return None
            try:
                self._questions.put_nowait(uid)
            except queue.Full:
                return None
            self._asked.add(uid)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._answer, name="spotguard-directory", daemon=True
                )
                self._thread.start()
        return None

    def _answer(self) -> None:
        while True:
            uid = self._questions.get()
            try:
                self._lookup(uid)
                answer: bool | None = True
            except KeyError:
                answer = False
            except Exception:  # the directory is unreachable: ask again another time
                answer = None
            with self._lock:
                self._asked.discard(uid)
                if answer is not None:
                    self._answers[uid] = answer
                    while len(self._answers) > self._keep:
                        self._answers.popitem(last=False)


class Principals:
    """``of(uid)``: the principal's name, e.g. ``uid 1000``, ``uid 999, block 3`` or
    ``uids 1834876928-1834942463``."""

    def __init__(
        self,
        subuid: Path = Path("/etc/subuid"),
        passwd: Path = Path("/etc/passwd"),
        directory: DirectoryUsers | None = None,
    ) -> None:
        self.subuid, self.passwd = subuid, passwd
        self.directory = directory or DirectoryUsers()
        self._seen: tuple[object, object] | None = None
        #: Sorted by start: ``(start, end, owner, pool)``.
        self._ranges: list[tuple[int, int, str, bool]] = []
        self._starts: list[int] = []

    def of(self, uid: int) -> str:
        self._refresh()
        index = bisect.bisect_right(self._starts, uid) - 1
        if index >= 0:
            start, end, owner, pool = self._ranges[index]
            if uid < end:
                return f"{owner}, block {(uid - start) // BLOCK}" if pool else owner
        if uid >= BLOCK and not self.directory.known(uid):
            first = uid // BLOCK * BLOCK
            return f"uids {first}-{first + BLOCK - 1}"
        return f"uid {uid}"

    def _refresh(self) -> None:
        seen_subuid, subuid_text = _trusted_text(self.subuid)
        seen_passwd, passwd_text = _trusted_text(self.passwd)
        if (seen_subuid, seen_passwd) == self._seen:
            return
        uids: dict[str, int] = {}
        for line in passwd_text.splitlines():
            fields = line.split(":")
            if len(fields) > 2 and re.fullmatch("[0-9]{1,10}", fields[2], re.ASCII):
                uids.setdefault(fields[0], int(fields[2]))
        ranges = []
        for line in subuid_text.splitlines():
            match = _SUBUID_LINE.match(line.strip())
            if not match:
                continue
            name, first, count = match.group(1), int(match.group(2)), int(match.group(3))
            owner_uid = int(name) if re.fullmatch("[0-9]{1,10}", name, re.ASCII) else uids.get(name)
            owner = f"uid {owner_uid}" if owner_uid is not None else f"user {name}"
            system = owner_uid is None or owner_uid < UID_MIN
            ranges.append((first, first + count, owner, system and count > BLOCK))
        ranges.sort()
        self._ranges, self._starts = ranges, [start for start, _, _, _ in ranges]
        self._seen = (seen_subuid, seen_passwd)
