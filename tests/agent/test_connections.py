"""The connection table's arithmetic (no agent): who counts as whom, who makes room."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from spotguard.agent.connections import Connections, Principals
from spotguard.agent.limits import Caps
from spotguard.agent.peers import Client


@pytest.fixture
def table(tmp_path: Path):
    made: list[socket.socket] = []
    connections = Connections(Caps(total=6, per_user=4), Principals(tmp_path / "none"))

    def connect(principal: str, *, register: bool = False) -> Client:
        ours, theirs = socket.socketpair()
        made.extend((ours, theirs))
        client = Client(ours, pid=1000 + len(made), uid=0, connected_at=0.0, principal=principal)
        connections.add(client)
        if register:
            connections.registered(client)
        return client

    yield connections, connect
    for sock in made:
        sock.close()


def test_a_full_table_takes_from_the_largest_pending_first(table):
    connections, connect = table
    registered = [connect("uid 1", register=True) for _ in range(3)]
    waiting = connect("uid 1")
    connect("uid 2")
    connect("uid 2", register=True)
    assert connections.admit("uid 3") == (True, waiting)  # uid 1 holds 4: its pending one
    connections.remove(waiting)
    assert connections.admit("uid 3") == (True, None)  # room now
    connect("uid 3")
    # uid 1 holds 3, uid 3 would hold 2: still more than that, its newest connection goes.
    assert connections.admit("uid 3") == (True, registered[-1])


def test_a_newcomer_among_the_largest_is_refused(table):
    connections, connect = table
    for principal in ("uid 1", "uid 1", "uid 2", "uid 2", "uid 3", "uid 3"):
        connect(principal)
    assert connections.admit("uid 1") == (False, None)  # 3 would not be fewer than 2 + 1
    assert connections.admit("uid 4")[0]  # holds none: takes from one with 2


def test_the_per_user_cap_holds_with_room_left(table):
    connections, connect = table
    for _ in range(4):
        connect("uid 1")
    assert connections.admit("uid 1") == (False, None)
    assert connections.admit("uid 2") == (True, None)


def write_subuid(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_subordinate_uids_belong_to_their_user(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the subuid file is trusted only when root owns it")
    path = write_subuid(tmp_path / "subuid", "root:100000:65536\n4242:300000:10\nbad line\n")
    principals = Principals(path)
    assert principals.of(100000) == principals.of(165535) == "uid 0"
    assert principals.of(165536) == "uid 165536"
    assert principals.of(300009) == "uid 4242"
    assert principals.of(1000) == "uid 1000"
    write_subuid(path, "nobody-known-xyz:100000:5\n")  # changed: read again
    assert principals.of(100001) == "user nobody-known-xyz"


def test_a_subuid_file_others_can_write_is_not_trusted(tmp_path):
    path = write_subuid(tmp_path / "subuid", "root:100000:65536\n", mode=0o666)
    assert Principals(path).of(100000) == "uid 100000"
