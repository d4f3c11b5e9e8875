"""Who answers for a uid (no agent): /etc/subuid-style ranges, blocks, hostile lines."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from spotguard.agent.principals import DirectoryUsers, Principals
from tests.support import wait_for

PASSWD = "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def nobody_in_the_directory(uid: int) -> object:
    raise KeyError(uid)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, DirectoryUsers]:
    if os.geteuid() != 0:
        pytest.skip("the files are trusted only when root owns them")
    directory = DirectoryUsers(nobody_in_the_directory)
    return tmp_path / "subuid", write(tmp_path / "passwd", PASSWD), directory


def test_a_users_range_counts_as_the_user(files):
    subuid, passwd, directory = files
    write(subuid, "alice:100000:65536\n4242:300000:10\n")
    principals = Principals(subuid, passwd, directory)
    assert principals.of(100000) == principals.of(165535) == principals.of(1000) == "uid 1000"
    assert principals.of(300009) == "uid 4242"
    assert principals.of(1001) == "uid 1001"
    write(subuid, "bob:100000:5\n")  # changed (bob has no passwd entry): read again
    assert principals.of(100001) == "user bob"


def test_a_pool_counts_by_block_and_unlisted_uids_too(files):
    """A range over 65,536 owned by a system account (or a name without a local account) is
    a pool handed to containers: each block apart. A user's large range is that user's. A uid
    nobody listed and the directory does not know, of 65,536 or more, counts by its block."""
    subuid, passwd, directory = files
    base = 1 << 20
    write(subuid, f"containers:{base}:{10 << 16}\nalice:{base * 4}:{10 << 16}\n")
    principals = Principals(subuid, passwd, directory)
    assert principals.of(base + 5) == principals.of(base + 65535)
    assert principals.of(base + 65536) != principals.of(base + 5)
    assert "block 1" in principals.of(base + 65536)
    assert principals.of(base * 4) == principals.of(base * 4 + (9 << 16)) == "uid 1000"
    unlisted = 1_800_000_001
    principals.of(unlisted)
    wait_for(lambda: directory.known(unlisted) is False, what="the directory's answer")
    assert principals.of(unlisted) == principals.of(unlisted + 1) != f"uid {unlisted}"
    assert principals.of(65535) == "uid 65535"


def test_directory_users_count_as_themselves_once_the_directory_answered(tmp_path):
    """Two directory users (LDAP, SSSD) with uids in one 65,536-uid block: once the name
    service, asked in a thread of its own, knows them, each is a user of its own, and one
    holding its cap no longer locks the other out. A directory that hangs blocks nothing."""
    known = {1_234_400_123, 1_234_400_999}
    hanging = threading.Event()

    def lookup(uid: int) -> object:
        if uid == 1_234_400_500:
            hanging.wait(30)
        if uid not in known:
            raise KeyError(uid)
        return uid

    directory = DirectoryUsers(lookup)
    principals = Principals(tmp_path / "none", tmp_path / "none", directory)
    first, second = sorted(known)
    assert principals.of(first) == principals.of(second)  # not answered yet: the block
    wait_for(lambda: directory.known(first) and directory.known(second), what="the answers")
    assert (principals.of(first), principals.of(second)) == (f"uid {first}", f"uid {second}")
    started = time.monotonic()
    for _ in range(50):  # asked; the lookup hangs (30 s): none of the 50 waits for it
        assert principals.of(1_234_400_500).startswith("uids ")
    assert time.monotonic() - started < 10.0  # far below the 30 s a blocking lookup takes
    hanging.set()


def test_hostile_lines_are_skipped_and_the_rest_kept(files):
    subuid, passwd, directory = files
    write(subuid, "x:²:5\ny:1" + "0" * 5000 + ":5\n" + "9" * 5000 + ":200000:5\n"
          "z:-1:5\nalice:100000:65536\nno colons\n")  # fmt: skip
    principals = Principals(subuid, passwd, directory)
    assert principals.of(100000) == "uid 1000"
    assert principals.of(200000) == "uids 196608-262143"  # unlisted: its line was skipped


def test_files_others_can_write_are_not_trusted(files):
    subuid, passwd, directory = files
    write(subuid, "alice:100000:65536\n", mode=0o666)
    assert Principals(subuid, passwd, directory).of(100) == "uid 100"
    assert Principals(subuid, passwd, directory).of(100000) != "uid 1000"
