"""bench/gpu_check.py runs on every CPU machine too: there it must say it skipped, and pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def test_without_cuda_it_skips_cleanly():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA even where a GPU exists
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "gpu_check: skipped: no CUDA"
