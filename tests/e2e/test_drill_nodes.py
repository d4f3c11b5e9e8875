"""``spotguard drill --nodes 3``: a torchrun elastic job over three rehearsed nodes (each its own
IMDS simulator, real agent, state dir and torchrun) loses the node that holds rank 0.

What the tests check is the report the drill prints, built from what the processes did: the
workers' records (rank, world size, the step they stopped after, SHA-256 digests of the state
they saved and restored), the launchers' exit codes and states, and the reference run's final
weights.
"""

from __future__ import annotations

import json

import pytest

from spotguard.trainer_hooks import CheckpointStore
from tests.e2e.test_drill import drill

# Two runs of a three-node job (the reference, then the interrupted one), on 2 busy cores.
pytestmark = pytest.mark.timeout(540)


def events(report: dict, node: str) -> list[str]:
    return [event for event, _ in report["timeline"][node]]


def test_the_survivors_wait_for_a_late_replacement_and_resume_bit_exact():
    """``--nnodes 3:3``: the notified node holds rank 0 (its address is every worker's
    process-group store); the survivors cannot train without a third node, wait for the
    replacement (started 5 s after the termination) and resume at world size 3, bit-exact."""
    code, out, err = drill("--nodes", "3", "--json")
    report = json.loads(out)
    assert code == 0, report["failure"] or err[-3000:]
    assert report["passed"] is True
    assert report["bit_exact"] is True
    assert report["final"] == report["reference"]
    assert report["world_sizes"] == [3, 3]
    (stop,) = report["stop_steps"]
    assert report["resumed_at"] == [stop]
    assert report["state_equal"] is True
    assert report["launcher_stopped"] is True
    notified = report["notified"]
    assert report["exit_codes"][notified] == {"workers": [75], "torchrun": None}
    assert "workers left; torchrun agent stopped" in events(report, notified)
    survivors = sorted(set(report["exit_codes"]) - {notified, "node-3"})
    assert len(survivors) == 2
    for node in survivors:
        assert report["exit_codes"][node] == {"workers": [75, 0], "torchrun": 0}
        assert "emergency checkpoint committed" in events(report, node)
        assert "first step of attempt 1 (world 3)" in events(report, node)
    assert report["exit_codes"]["node-3"] == {"workers": [0], "torchrun": 0}
    # The survivors resumed only once the replacement was there.
    replacement = dict(report["timeline"]["node-3"])["replacement node started"]
    resumed = dict(report["timeline"][survivors[0]])["first step of attempt 1 (world 3)"]
    assert resumed > replacement


def test_the_survivors_go_on_without_the_lost_node_then_take_the_replacement_in(tmp_path):
    """``--nnodes 2:3``: the two survivors re-form at world size 2 and resume from the
    emergency checkpoint, resharded; the replacement joining restarts the group (torchrun
    SIGTERMs its workers: another emergency checkpoint) at world size 3. Every resume
    restored exactly the state that was saved; not bit-exact (other world, other steps)."""
    store = str(tmp_path / "store")
    code, out, err = drill("--nodes", "3", "--min-nodes", "2", "--store", store, "--json")
    report = json.loads(out)
    assert code == 0, report["failure"] or err[-3000:]
    assert report["passed"] is True
    assert report["world_sizes"] == [3, 2, 3]
    assert report["bit_exact"] is None
    assert report["state_equal"] is True
    assert len(report["stop_steps"]) == 2
    assert report["resumed_at"] == report["stop_steps"]
    assert report["exit_codes"][report["notified"]] == {"workers": [75], "torchrun": None}
    assert report["store"].startswith(f"{store}/spotguard-drill-")
    assert CheckpointStore(report["store"]).list() == []  # its own prefix, removed afterwards


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "5"], "nodes must be 1..4"),
        (["--nodes", "3", "--min-nodes", "4"], "min-nodes must be 1..3"),
        (["--min-nodes", "2"], "--min-nodes applies with --nodes 2 or more"),
        (["--nodes", "2", "--ranks", "2"], "--ranks does not apply with --nodes"),
        (["--nodes", "2", "--report", "x.html"], "--report (the HTML chart) is not made"),
    ],
)
def test_bad_node_options_are_one_line_usage_errors(args, message):
    code, _, err = drill(*args)
    assert code == 2
    assert err.strip().count("\n") == 0
    assert message in err
