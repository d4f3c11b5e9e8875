"""A training launch: the process (rank 0; other ranks are its children), its log, and what
the built-in workload reports (progress file, per-rank result files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Launch"]


@dataclass
class Launch:
    """One training launch (rank 0's process; other ranks are its children)."""

    process: subprocess.Popen[bytes]
    results: Path
    log: Path
    started_at: float

    def progress(self) -> int:
        path = self.results / "progress"
        with suppress(OSError, ValueError, IndexError):
            return int(path.read_text().split()[-1])
        return 0

    def result(self, rank: int) -> dict[str, Any]:
        with suppress(OSError, ValueError):
            loaded: dict[str, Any] = json.loads((self.results / f"rank-{rank}.json").read_text())
            return loaded
        return {}

    def last_error(self) -> str:
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines()]
        errors = [line for line in lines if line and not line.startswith(("File ", "^", "~"))]
        return errors[-1] if errors else "(no output)"

    def kill(self) -> None:
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    @classmethod
    def start(cls, command: list[str], env: dict[str, str], results: Path) -> Launch:
        log = results / "training.log"
        with log.open("wb") as handle:
            process = subprocess.Popen(
                command,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one process group: the ranks go down together
            )
        return cls(process, results, log, time.time())
