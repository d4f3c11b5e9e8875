"""Agent fixtures: the agent as a real process, real targets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import wait_for

TARGET_SCRIPT = Path(__file__).with_name("target_proc.py")


@dataclass
class AgentProcess:
    process: subprocess.Popen[str]
    log_path: Path
    state_dir: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def notice(self) -> dict[str, Any] | None:
        path = self.state_dir / "notice.json"
        return json.loads(path.read_text()) if path.exists() else None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class AgentRunner:
    tmp_path: Path
    started: list[AgentProcess] = field(default_factory=list)

    def start(self, endpoint: str, **settings: Any) -> AgentProcess:
        """Run ``spotguard agent`` as the systemd unit would, with a TOML config file."""
        state_dir = Path(settings.pop("state_dir", self.tmp_path / "state"))
        config = {
            "poll_interval": 0.2,
            "max_backoff": 0.8,
            "request_timeout": 0.5,
            "rebalance_interval": 0.2,
            "maintenance_interval": 0.2,
            "asg_interval": 0.2,
            "metrics_address": "",
            "log_format": "json",
            **settings,
        }
        config_path = self.tmp_path / f"agent-{len(self.started)}.toml"
        config_path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items()))
        log_path = self.tmp_path / f"agent-{len(self.started)}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "spotguard",
                    "agent",
                    "--config",
                    str(config_path),
                    "--imds-endpoint",
                    endpoint,
                    "--state-dir",
                    str(state_dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("SPOTGUARD_")},
            )
        agent = AgentProcess(process, log_path, state_dir)
        self.started.append(agent)
        wait_for(
            lambda: "agent started" in agent.log() or process.poll() is not None,
            what="the agent to start",
        )
        assert process.poll() is None, agent.log()
        return agent


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[AgentRunner]:
    runner = AgentRunner(tmp_path)
    yield runner
    for agent in runner.started:
        agent.stop()


@dataclass
class TargetProcess:
    """A real process that records the signals it receives (see target_proc.py)."""

    process: subprocess.Popen[str]
    record: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def events(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def signals(self) -> list[str]:
        return [e["signal"] for e in self.events() if e["event"] == "signal"]


@pytest.fixture
def targets(tmp_path: Path) -> Iterator[Callable[..., TargetProcess]]:
    started: list[TargetProcess] = []

    def start(
        state_dir: Path, *, register: bool = True, exit_code: int | None = 75, tag: str = "trainer"
    ) -> TargetProcess:
        record = tmp_path / f"target-{len(started)}.jsonl"
        command = [
            sys.executable,
            str(TARGET_SCRIPT),
            "--state-dir",
            str(state_dir),
            "--record",
            str(record),
            "--tag",
            tag,
        ]
        if register:
            command.append("--register")
        if exit_code is not None:
            command += ["--exit-code", str(exit_code)]
        process = subprocess.Popen(command, text=True)
        target = TargetProcess(process, record)
        started.append(target)
        wait_for(
            lambda: any(e["event"] == "ready" for e in target.events()),
            what="the target process to be ready",
        )
        return target

    yield start
    for target in started:
        if target.process.poll() is None:
            target.process.kill()
        target.process.wait()
