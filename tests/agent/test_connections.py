"""The connection table's arithmetic (no agent): who counts as whom, who makes room."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from spotguard.agent.connections import Connections
from spotguard.agent.limits import Caps
from spotguard.agent.peers import Client
from spotguard.agent.principals import Principals


@pytest.fixture
def table(tmp_path: Path):
    made: list[socket.socket] = []
    nobody = tmp_path / "missing"
    connections = Connections(Caps(total=6, per_user=4), Principals(nobody, nobody))

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
    connect("uid 3", register=True)
    # uid 1 holds 3 and would hold 2, as uid 3 would: its newest connection goes.
    assert connections.admit("uid 3") == (True, registered[-1])


def test_a_move_never_merely_swaps_who_holds_more(table):
    """Everyone holds one connection, one of them a trainer that has not registered yet: a
    newcomer holding none is refused rather than take it (the one evicted would come back
    and take another's: a swap an attacker with many principals repeats at will)."""
    connections, connect = table
    for number in range(5):
        connect(f"uid {number}", register=True)
    connect("uid 9")  # a trainer between connect and register
    assert connections.admit("uid 20") == (False, None)


def test_a_newcomer_among_the_largest_is_refused(table):
    connections, connect = table
    first = connect("uid 1")
    for principal in ("uid 1", "uid 2", "uid 2", "uid 3", "uid 3"):
        connect(principal)
    assert connections.admit("uid 1") == (False, None)  # it would hold 3 against 1
    assert connections.admit("uid 4") == (True, first)  # 1 each after: fair


def test_the_per_user_cap_holds_with_room_left(table):
    connections, connect = table
    for _ in range(4):
        connect("uid 1")
    assert connections.admit("uid 1") == (False, None)
    assert connections.admit("uid 2") == (True, None)
