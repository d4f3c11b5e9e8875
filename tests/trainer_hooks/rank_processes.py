"""What the multi-rank tests of sharded checkpoints share: ranks run as processes of their
own (each test module is also the rank's program), their reports, and full tensors out of
DTensors to compare states across world sizes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

__all__ = ["full_tensors", "outcome", "report", "wait_for_ranks"]


def full_tensors(value: Any) -> Any:
    """``value`` with every DTensor gathered (a collective: every rank, the same order)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {key: full_tensors(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full_tensors(item) for item in value)
    return value


def wait_for_ranks(
    ranks: list[subprocess.Popen[bytes]], ops: list[dict[str, Any]], timeout: float
) -> list[int]:
    """The ranks' exit codes; a rank still running after ``timeout`` seconds fails the test,
    and none is left running either way."""
    try:
        return [rank.wait(timeout) for rank in ranks]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank of {len(ranks)} hung on {[op['tag'] for op in ops]}")
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()


def outcome(out: Path, tag: str, world: int) -> list[dict[str, Any]]:
    """What each rank reported for the op ``tag``."""
    return [json.loads((out / f"{tag}-rank{rank}.json").read_text()) for rank in range(world)]


def report(path: Path, action: Callable[[dict[str, Any]], None]) -> None:
    """Run one op of a rank, ``action(record)``, and write its record to ``path``: what it
    recorded, its error, or the exit code it leaves with (``Preempted``: 75, and whether it
    saved), written before the exit goes on."""
    record: dict[str, Any] = {}
    try:
        action(record)
    except Exception as exc:
        record["error"] = {"type": type(exc).__name__, "message": str(exc)}
    except SystemExit as exc:
        record["exit"], record["saved"] = exc.code, getattr(exc, "saved", None)
        path.write_text(json.dumps(record))
        raise
    path.write_text(json.dumps(record))
