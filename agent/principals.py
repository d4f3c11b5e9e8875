"""Who answers for a uid: connections are counted per *principal*, not per uid.

One local user can act under many uids without any privilege: those of its subordinate range
(``/etc/subuid``, which ``newuidmap`` lets it enter; Ubuntu gives every user 65,536) and, on
systems that hand out ranges by other means (SSSD ``subid``, systemd's nsresourced, a kubelet
without an ``/etc/subuid`` entry), uids nobody has listed at all. Counting raw uids let one user
take the per-uid cap from each of four uids and fill the whole table, so that a trainer started
afterwards was refused and never signalled. So:

* a uid inside a range of 65,536 or fewer in ``/etc/subuid`` counts as the range's owner;
* a larger range is a pool that a system account hands out to containers (``containers`` for
  podman ``--userns=auto``, ``kubelet``, ``dockremap``): each 65,536-uid block of it counts
  apart, so one container cannot take the places of all the others;
* any other uid of 65,536 or more counts by its 65,536-uid block (what one user namespace
  spans). Directory users (LDAP) with such uids may share a block: the price of not trusting
  that an unlisted range belongs to nobody;
* the rest (local users, system accounts) count as themselves.

Only files are read (``/etc/subuid``, ``/etc/passwd`` for owner names), never NSS: a directory
lookup could block the agent's single-threaded loop. Both are re-read when they change and
trusted only when root owns them and nobody else may write them.
"""

from __future__ import annotations

import bisect
import os
import re
import stat
from pathlib import Path

__all__ = ["BLOCK", "Principals"]

#: The uids one user namespace spans in the usual layouts (and Ubuntu's subordinate range).
BLOCK = 1 << 16
#: Files larger than this are not read (they are root's files, but the agent stays bounded).
MAX_FILE_BYTES = 1 << 20
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


class Principals:
    """``of(uid)``: the principal's name, e.g. ``uid 1000``, ``uid 999, block 3`` or
    ``uids 1834876928-1834942463``."""

    def __init__(
        self, subuid: Path = Path("/etc/subuid"), passwd: Path = Path("/etc/passwd")
    ) -> None:
        self.subuid, self.passwd = subuid, passwd
        self._seen: tuple[object, object] | None = None
        #: Sorted by start: ``(start, end, owner)``.
        self._ranges: list[tuple[int, int, str]] = []
        self._starts: list[int] = []

    def of(self, uid: int) -> str:
        self._refresh()
        index = bisect.bisect_right(self._starts, uid) - 1
        if index >= 0:
            start, end, owner = self._ranges[index]
            if uid < end:
                return owner if end - start <= BLOCK else f"{owner}, block {(uid - start) // BLOCK}"
        if uid >= BLOCK:
            first = uid // BLOCK * BLOCK
            return f"uids {first}-{first + BLOCK - 1}"
        return f"uid {uid}"

    def _refresh(self) -> None:
        seen_subuid, subuid_text = _trusted_text(self.subuid)
        seen_passwd, passwd_text = _trusted_text(self.passwd)
        if (seen_subuid, seen_passwd) == self._seen:
            return
        names: dict[str, str] = {}
        for line in passwd_text.splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[2].isascii() and fields[2].isdigit():
                names.setdefault(fields[0], f"uid {int(fields[2])}")
        ranges = []
        for line in subuid_text.splitlines():
            match = _SUBUID_LINE.match(line.strip())
            if match:
                name, first, count = match.group(1), int(match.group(2)), int(match.group(3))
                numeric = re.fullmatch("[0-9]{1,10}", name, re.ASCII)
                owner = f"uid {int(name)}" if numeric else names.get(name, f"user {name}")
                ranges.append((first, first + count, owner))
        ranges.sort()
        self._ranges, self._starts = ranges, [start for start, _, _ in ranges]
        self._seen = (seen_subuid, seen_passwd)
