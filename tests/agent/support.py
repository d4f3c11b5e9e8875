"""Agent fixtures: the agent as a real process, real targets."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import Sim, wait_for

TARGET_SCRIPT = Path(__file__).with_name("target_proc.py")


def wait_polls(sim: Sim, count: int, timeout: float = 30.0) -> None:
    """Wait until the simulator has served ``count`` more spot polls than it has now.

    For "and nothing else happens" checks: the agent gets ``count`` polls to do it wrong (the
    ticks of all but the last have ended), so a slow machine waits longer rather than proving
    less, as a sleep would. ``timeout`` is only a no-hang bound."""
    before = len(sim.spot_polls())
    wait_for(
        lambda: len(sim.spot_polls()) >= before + count,
        timeout=timeout,
        what=f"{count} more spot polls",
    )


@dataclass
class AgentProcess:
    process: subprocess.Popen[str]
    log_path: Path
    state_dir: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def notice(self) -> dict[str, Any] | None:
        try:  # the agent may remove it between a check and the read: no check
            return json.loads((self.state_dir / "notice.json").read_text())
        except FileNotFoundError:
            return None

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

    def start(
        self,
        endpoint: str,
        *,
        preamble: str = "",
        popen: dict[str, Any] | None = None,
        check: bool = True,
        **settings: Any,
    ) -> AgentProcess:
        """Run ``spotguard agent`` as the systemd unit would, with a TOML config file.

        ``preamble``: Python code run in the agent process first (e.g. to act as an older
        kernel would); ``popen``: more arguments for :class:`subprocess.Popen`; without
        ``check``, an agent that exits at once is returned rather than failing the test."""
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
            python = [sys.executable, "-m", "spotguard"]
            if preamble:
                run = "import runpy; runpy.run_module('spotguard', run_name='__main__')"
                python = [sys.executable, "-c", f"{preamble}\n{run}"]
            process = subprocess.Popen(
                [
                    *python,
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
                **(popen or {}),
            )
        agent = AgentProcess(process, log_path, state_dir)
        self.started.append(agent)
        wait_for(
            lambda: "agent started" in agent.log() or process.poll() is not None,
            what="the agent to start",
        )
        if check:
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

    def received(self, op: str) -> list[dict[str, Any]]:
        """The messages of that op the agent sent it (``registered``, ``notice``, ``error``)."""
        return [e for e in self.events() if e["event"] == op]


@pytest.fixture
def targets(tmp_path: Path) -> Iterator[Callable[..., TargetProcess]]:
    started: list[TargetProcess] = []

    def start(
        state_dir: Path,
        *,
        register: bool = True,
        exit_code: int | None = 75,
        tag: str = "trainer",
        extra: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
        python: str = sys.executable,
        record: Path | None = None,
        **popen: Any,
    ) -> TargetProcess:
        """Start target_proc.py with ``python`` (behind ``prefix``, e.g. ``unshare``); with
        ``register``, return once the agent has answered its registration."""
        record = record or tmp_path / f"target-{len(started)}.jsonl"
        command = [
            *prefix,
            python,
            str(TARGET_SCRIPT),
            "--state-dir",
            str(state_dir),
            "--record",
            str(record),
            "--tag",
            tag,
            *extra,
        ]
        if register:
            command.append("--register")
        if exit_code is not None:
            command += ["--exit-code", str(exit_code)]
        process = subprocess.Popen(command, text=True, **popen)
        target = TargetProcess(process, record)
        started.append(target)
        wait_for(
            lambda: target.received("registered" if register else "ready"),
            what="the target process to be ready",
        )
        return target

    yield start
    for target in started:
        if target.process.poll() is None:
            target.process.kill()
        target.process.wait()


#: The system Python: a throwaway user cannot run this environment's interpreter (under /root).
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class User:
    name: str
    uid: int
    gid: int


@pytest.fixture
def throwaway_user() -> Iterator[User]:
    """A new unprivileged user for an attacker, removed afterwards (its processes must be
    gone by then). Skipped, saying why, where one cannot be created."""
    if os.geteuid() != 0:
        pytest.skip("creating a throwaway user needs root")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is missing: the throwaway user has no Python to run")
    name = f"sgtest-{uuid.uuid4().hex[:10]}"
    created = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if created.returncode != 0:
        pytest.skip(f"useradd failed: {created.stderr.strip()}")
    entry = pwd.getpwnam(name)
    try:
        yield User(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)


#: Registers, forks a child that keeps the connection, prints the child's pid and exits: the
#: registrant is gone while its connection lives on.
HOLDER = """
import json, os, socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.sendall(b'{"v": 2, "op": "register", "signal": "SIGUSR1"}\\n')
assert json.loads(sock.makefile().readline())["op"] == "registered"
child = os.fork()
if child:
    print(child, flush=True)
    os._exit(0)  # the registrant dies; its forked child keeps the connection open
time.sleep(60)
"""
