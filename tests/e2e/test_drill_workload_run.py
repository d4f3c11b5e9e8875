"""What a built-in drill workload is told: one :class:`WorkloadRun`, the drill's options whole.

An option that changes the training is declared once, as a :class:`DrillOptions` field: the
workloads take no flags of their own, so none can drift from the drill's (a second default, a
flag the drill forgets to pass).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from spotguard.drill.options import DrillOptions, WorkloadRun
from spotguard.errors import ConfigError

DRILL = Path(__file__).resolve().parents[2] / "spotguard" / "drill"


def test_every_option_reaches_the_workload_as_it_was(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    for options in (
        DrillOptions(store="s3://b/p", ranks=3, interruptions=2, seed=5, state_bytes=4096,
                     step_time=0.25, poll_interval=0.2, agent_imds_endpoint="http://x:1",
                     launch_timeout=9.0),
        DrillOptions(script=script),
        DrillOptions(nodes=3, min_nodes=2),
    ):  # fmt: skip
        run = WorkloadRun(options, tmp_path / "results", "file:///s", "/n/{rank}", 8, 160, 20)
        again = WorkloadRun.from_argv([run.to_json()])
        assert again == run
        for item in dataclasses.fields(DrillOptions):
            assert type(getattr(again.options, item.name)) is type(getattr(options, item.name))


def test_a_workload_takes_exactly_the_run():
    with pytest.raises(ConfigError, match="one argument"):
        WorkloadRun.from_argv([])
    with pytest.raises(ConfigError, match="one argument"):
        WorkloadRun.from_argv(["--ranks", "2"])


@pytest.mark.parametrize("module", ["workload.py", "elastic_workload.py"])
def test_the_workloads_declare_no_options_of_their_own(module):
    tree = ast.parse((DRILL / module).read_text())
    calls = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert {"ArgumentParser", "add_argument"} & calls == set()
    assert "WorkloadRun.from_argv" in ast.unparse(tree)
