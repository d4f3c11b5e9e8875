"""Who answers for a uid (no agent): /etc/subuid-style ranges, blocks, hostile lines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spotguard.agent.principals import Principals

PASSWD = "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    if os.geteuid() != 0:
        pytest.skip("the files are trusted only when root owns them")
    return tmp_path / "subuid", write(tmp_path / "passwd", PASSWD)


def test_a_users_range_counts_as_the_user(files):
    subuid, passwd = files
    write(subuid, "alice:100000:65536\n4242:300000:10\n")
    principals = Principals(subuid, passwd)
    assert principals.of(100000) == principals.of(165535) == principals.of(1000) == "uid 1000"
    assert principals.of(300009) == "uid 4242"
    assert principals.of(1001) == "uid 1001"
    write(subuid, "bob:100000:5\n")  # changed (bob has no passwd entry): read again
    assert principals.of(100001) == "user bob"


def test_a_pool_counts_by_block_and_unlisted_uids_too(files):
    """A range over 65,536 is a pool handed to containers: each block apart. A uid nobody
    listed, of 65,536 or more, counts by its block (one user namespace's worth)."""
    subuid, passwd = files
    write(subuid, f"containers:{1 << 20}:{10 << 16}\n")
    principals = Principals(subuid, passwd)
    assert principals.of((1 << 20) + 5) == principals.of((1 << 20) + 65535)
    assert principals.of((1 << 20) + 65536) != principals.of((1 << 20) + 5)
    assert "block 1" in principals.of((1 << 20) + 65536)
    assert principals.of(1_800_000_001) == principals.of(1_800_000_002) != "uid 1800000001"
    assert principals.of(65535) == "uid 65535"


def test_hostile_lines_are_skipped_and_the_rest_kept(files):
    subuid, passwd = files
    write(subuid, "x:²:5\ny:1" + "0" * 5000 + ":5\n" + "9" * 5000 + ":200000:5\n"
          "z:-1:5\nalice:100000:65536\nno colons\n")  # fmt: skip
    principals = Principals(subuid, passwd)
    assert principals.of(100000) == "uid 1000"
    assert principals.of(200000) == "uids 196608-262143"  # unlisted: its line was skipped


def test_files_others_can_write_are_not_trusted(files):
    subuid, passwd = files
    write(subuid, "alice:100000:65536\n", mode=0o666)
    assert Principals(subuid, passwd).of(100) == "uid 100"
    assert Principals(subuid, passwd).of(100000) != "uid 1000"
