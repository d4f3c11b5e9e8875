"""Helpers every test package uses: waiting without hanging, the IMDS simulator over HTTP."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from spotguard.imds.sim_control import SimControl
from spotguard.imds.simulator import ImdsSimulator


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def in_ci() -> bool:
    """Whether this is a CI run (``CI`` set, as CI services set it: ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str, package: str) -> str:
    """The path of the program ``name``. Where it is missing, the test fails in CI (a check
    that CI silently skips proves nothing) and is skipped, saying why, elsewhere."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (Debian/Ubuntu package {package!r})"
    if in_ci():
        pytest.fail(f"{message}, and CI must run this test: install it in the CI image")
    pytest.skip(f"{message}; CI runs this test")


@dataclass
class Sim:
    server: ImdsSimulator
    control: SimControl

    @property
    def url(self) -> str:
        return self.server.url

    def spot_polls(self) -> list[dict[str, Any]]:
        return [r for r in self.control.requests() if r["path"].endswith("spot/instance-action")]


@pytest.fixture
def sim() -> Iterator[Sim]:
    with ImdsSimulator() as server:
        control = SimControl(server.url)
        yield Sim(server, control)
        control.close()
