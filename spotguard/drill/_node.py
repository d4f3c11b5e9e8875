"""One rehearsed "instance": its own IMDS simulator, the real agent, and a state dir.

The agent runs as a subprocess with the very command systemd runs (``spotguard agent``), so
the drill exercises the daemon users deploy, not a stand-in. A fresh :class:`Node` per launch
mirrors EC2: a replacement instance has a new metadata service and no notice.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from spotguard.errors import DrillFailed
from spotguard.imds.simulator import ImdsSimulator
from spotguard.protocol import SPOT_NOTICE_SECONDS, Notice, read_notice

__all__ = ["Node"]

_GOOD_POLL = re.compile(r'^spotguard_polls_total\{[^}]*outcome="(?!error)[^"]*"[^}]*\} (\S+)', re.M)
_IMDS_ERROR = re.compile(r'^spotguard_imds_errors_total\{reason="([^"]*)"\} (\S+)', re.M)
# What the agent logs about the registration socket: who registered, how each one ended.
_REGISTERED = re.compile(r"\bpid (\d+) \(uid \d+, rank \d+\) registered for ")
_EXIT = r"\bpid {pid} reports exit code (\d+)\b"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Node:
    """Simulator + agent + state dir of one rehearsed instance (call :meth:`stop`)."""

    def __init__(
        self, name: str, folder: Path, *, poll_interval: float, imds_endpoint: str | None = None
    ) -> None:
        self.name = name
        folder.mkdir(parents=True)
        self.state_dir = folder / "state"  # the agent creates it, writable by itself alone
        self.sim = ImdsSimulator().start()
        self.imds_endpoint = imds_endpoint or self.sim.url
        self._metrics = f"127.0.0.1:{_free_port()}"
        config = folder / "agent.toml"
        config.write_text(
            f"poll_interval = {poll_interval}\n"
            f'metrics_address = "{self._metrics}"\n'
            f"rebalance_interval = {poll_interval}\n"
        )
        self.log_path = folder / "agent.log"
        with self.log_path.open("w") as log:
            self.agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "spotguard",
                    "agent",
                    "--config",
                    str(config),
                    "--imds-endpoint",
                    self.imds_endpoint,
                    "--state-dir",
                    str(self.state_dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.served_at: float | None = None

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Return once the agent has had a usable answer from IMDS; else say why not."""
        give_up = time.monotonic() + timeout
        errors: list[tuple[str, str]] = []
        while time.monotonic() < give_up:
            if self.agent.poll() is not None:
                raise DrillFailed(
                    "agent",
                    f"the agent on {self.name} exited with code {self.agent.returncode}: "
                    f"{self.last_log_line()}",
                )
            try:
                text = requests.get(f"http://{self._metrics}/metrics", timeout=1.0).text
            except requests.RequestException:
                text = ""
            if any(float(count) > 0 for count in _GOOD_POLL.findall(text)):
                return
            errors = _IMDS_ERROR.findall(text)
            time.sleep(0.05)
        reasons = ", ".join(f"{reason} x{float(n):.0f}" for reason, n in errors) or "no answer"
        raise DrillFailed(
            "agent",
            f"the agent on {self.name} cannot reach IMDS at {self.imds_endpoint} within "
            f"{timeout:.0f} s ({reasons}): {self.last_log_line()}",
        )

    def interrupt(self) -> float:
        """Schedule a spot interruption two minutes ahead; returns when it was served."""
        self.served_at = time.time()
        self.sim.control("spot", {"action": "terminate", "in_seconds": SPOT_NOTICE_SECONDS})
        return self.served_at

    def notice(self) -> Notice | None:
        return read_notice(self.state_dir)

    def registered_pids(self) -> list[int]:
        """The pids that registered with this node's agent (as the agent saw them)."""
        return [int(pid) for pid in _REGISTERED.findall(self._log_text())]

    def recorded_exit_code(self, pid: int) -> int | None:
        """The exit code ``pid`` told this node's agent before it left, if it did."""
        found = re.findall(_EXIT.format(pid=pid), self._log_text())
        return int(found[-1]) if found else None

    def _log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def last_log_line(self) -> str:
        lines = [line for line in self.log_path.read_text().splitlines() if line.strip()]
        return lines[-1].strip() if lines else "(the agent logged nothing)"

    def stop(self) -> None:
        if self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(10)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        self.sim.stop()
