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
    for _ in range(3):
        connect("uid 1", register=True)
    waiting = connect("uid 1")
    connect("uid 2")
    connect("uid 2", register=True)
    assert connections.admit("uid 3") == (True, waiting)  # uid 1 holds 4: its pending one
    connections.remove(waiting)
    assert connections.admit("uid 3") == (True, None)  # room now
    connect("uid 3", register=True)
    # uid 2's pending connection: uid 2 holds 2, more than uid 3's 1.
    assert connections.admit("uid 3")[1].principal == "uid 2"


def test_a_registered_connection_goes_only_to_a_principal_holding_fewer(table):
    connections, connect = table
    registered = [connect("uid 1", register=True) for _ in range(4)]
    connect("uid 2", register=True)
    connect("uid 3", register=True)
    # uid 4 would hold 1 against uid 1's 3 after: uid 1's newest connection goes.
    assert connections.admit("uid 4") == (True, registered[-1])
    connections.remove(registered[-1])
    connect("uid 4", register=True)
    connections.remove(registered[-2])
    connect("uid 5", register=True)
    # uid 1 holds 2 and would hold 1, as the newcomer: still fair, its newest goes.
    assert connections.admit("uid 6") == (True, registered[-3])
    connections.remove(registered[-3])
    connect("uid 6", register=True)
    # Everyone holds one registered connection: nobody would end with fewer than the newcomer.
    assert connections.admit("uid 7") == (False, None)


def test_when_everyone_holds_one_a_pending_connection_makes_room(table):
    """Many principals with one connection each (uids nobody listed, one per user namespace):
    a newcomer holding none takes the oldest place that has not registered yet, never a
    registered one."""
    connections, connect = table
    for number in range(4):
        connect(f"uid {number}", register=True)
    oldest = connect("uid 10")
    connect("uid 11")
    assert connections.admit("uid 20") == (True, oldest)
    connections.remove(oldest)
    connect("uid 20", register=True)
    connections.remove(next(iter(connections.pending.values())))
    connect("uid 21", register=True)
    assert connections.admit("uid 30") == (False, None)


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
