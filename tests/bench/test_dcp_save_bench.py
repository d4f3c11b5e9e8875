"""bench/dcp_save.py in its quick mode: real gloo ranks, a real local store, every figure there.

One run of the script (1 and 2 ranks: the restore needs the 2-rank save, the scaling
efficiency the 1-rank one; 4 ranks would add a launch for nothing this test checks). It checks
the shape and the plausibility of the printed JSON, never a time against a goal.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "dcp_save.py"
CONTENDERS = ("ceiling", "rank0", "sharded", "replicated")


def _positive(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_quick_run_prints_every_figure():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--stores", "local", "--worlds", "1", "2"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("| local | 2 | ") for line in lines), result.stdout
    figures = json.loads(lines[-1])

    assert figures["size_mib"] == 8
    assert figures["trials"] == 1
    saves = {row["world"]: row for row in figures["saves"]}
    assert sorted(saves) == [1, 2]
    for world, row in saves.items():
        assert row["store"] == "local"
        for name in CONTENDERS:
            assert _positive(row[f"{name}_s"]), (world, name, row)
            cpus = row[f"{name}_cpu_s_per_rank"]
            assert len(cpus) == world
            assert all(math.isfinite(cpu) and cpu >= 0 for cpu in cpus), (world, name, cpus)
            assert row[f"{name}_server_cpu_s"] == 0  # a local store has no server
            assert math.isfinite(row[f"{name}_busy"])
            assert row[f"{name}_busy"] >= 0
        for key in (
            "ceiling_gib_per_s", "speedup_sharded", "speedup_replicated", "efficiency_sharded",
            "check_s",
        ):  # fmt: skip
            assert _positive(row[key]), (world, key, row)
    assert saves[1]["efficiency_sharded"] == 1.0  # t1 / t1 / 1, by definition

    restores = {row["to_world"]: row for row in figures["restores"]}
    assert sorted(restores) == [1, 2]
    for world, row in restores.items():
        assert (row["store"], row["from_world"]) == ("local", 2)
        assert _positive(row["restore_s"]), (world, row)
        assert _positive(row["vs_same_size"]), (world, row)
    assert restores[2]["vs_same_size"] == 1.0
