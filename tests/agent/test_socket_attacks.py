"""What a local user can do to the agent's registration socket, against the real agent process:
each attack is dropped or ignored on its own, while polling and signalling others go on."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.agent.support import HOLDER, SYSTEM_PYTHON, TARGET_SCRIPT, wait_polls
from tests.support import wait_for

HOSTILE_SCRIPT = Path(__file__).with_name("hostile_client.py")
MIB = 1024 * 1024


def exchange(path: Path, payload: bytes, timeout: float = 10.0) -> tuple[list[dict], bool]:
    """Send ``payload`` on a fresh connection; the messages the agent answers with and whether
    it hung up (within ``timeout``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.settimeout(timeout)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            return [json.loads(line) for line in data.splitlines()], False
        except ConnectionResetError:  # hung up with our bytes unread: closed all the same
            pass
    return [json.loads(line) for line in data.splitlines()], True


def served_before(sim, signalled_at: float) -> int:
    """Spot polls that served the notice before the signal arrived: 1 is "at the first poll"."""
    return sum(
        r["status"] == 200 and r["time"] <= signalled_at for r in sim.spot_polls()
    )  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json\n", "not a JSON message"),
        (b"[" * 4000 + b"\n", "not a JSON message: RecursionError"),
        (b"x" * 10000, "exceeds 4096"),
        (b'{"v": 1, "op": "register", "signal": "SIGUSR1"}\n', "unsupported protocol version"),
        (b'{"v": 2, "op": "notice"}\n', "unexpected op"),
        (b'{"v": 2, "op": "exit", "code": 75}\n', "only once, after register"),
        (b'{"v": 2, "op": "register", "signal": "SIGKILL"}\n', "signal must be one of"),
        (b'{"v": 2, "op": "register", "signal": "SIGUSR1", "rank": -1}\n', "rank must be"),
        (
            b'{"v": 2, "op": "register", "signal": "SIGUSR1"}\n' * 2,
            "already registered",
        ),
    ],
    ids=["garbage", "deep-nesting", "oversized", "old-version", "agent-op", "exit-first",
         "sigkill", "bad-rank", "twice"],
)  # fmt: skip
def test_a_bad_message_gets_an_error_and_only_its_connection_is_dropped(
    sim, agents, targets, payload, reason
):
    agent = agents.start(sim.url)
    victim = targets(agent.state_dir, exit_code=None)
    messages, closed = exchange(agent.state_dir / "agent.sock", payload)
    assert closed
    assert messages[-1]["op"] == "error"
    assert reason in messages[-1]["reason"]
    sim.control.spot()
    wait_for(lambda: victim.signals(), what="the victim's signal")
    assert agent.process.poll() is None


def test_a_slow_drip_client_is_dropped_and_blocks_nobody(sim, agents, targets):
    """A byte every 0.3 s (at least: each waits that long for an answer), never the newline:
    the agent's 5 s deadline for the register line drops it mid-message, long before the
    drip (14 s) is through. Bounded in bytes dripped, not in wall time. Meanwhile another
    client is answered before the drop, and a process that registers is signalled."""
    agent = agents.start(sim.url)
    path = agent.state_dir / "agent.sock"
    message = b'{"v": 2, "op": "register", "signal": "SIGUSR1"}'
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(str(path))
        # While it drips (never the newline), another client registers and is answered at
        # once (milliseconds, in this process: long before the slow one's 5 s are up).
        slow.send(message[:1])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
            other.settimeout(10)
            other.connect(str(path))
            other.sendall(message + b"\n")
            assert b'"registered"' in other.recv(4096)
        slow.setblocking(False)
        try:
            early = slow.recv(4096)
        except BlockingIOError:
            early = None  # still waiting for its newline: nobody waited for it
        assert early is None, f"the other client was answered only after the drop: {early!r}"
        victim = targets(agent.state_dir, exit_code=None)
        slow.settimeout(0.3)
        answer, sent = b"", 1
        while not answer and sent < len(message):
            try:
                slow.send(message[sent : sent + 1])
                sent += 1
                answer = slow.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break  # hung up while we sent: its last words wait in the socket
        if not answer:
            with contextlib.suppress(OSError):
                answer = slow.recv(4096)
        assert b"no register message within 5" in answer, answer
        assert sent < len(message), "the agent waited for the whole dripped message"
    sim.control.spot()
    wait_for(lambda: victim.signals(), what="the victim's signal")


def test_a_thousand_hostile_connections_from_another_user(
    sim, agents, targets, throwaway_user, public_dir
):
    """Capped (logged once), memory bounded, and the victims, one registered before and one
    during the flood, get their signal at the first poll that serves the notice."""
    agent = agents.start(sim.url, state_dir=public_dir / "state", poll_interval=0.5,
                         max_backoff=2.0)  # fmt: skip
    victim = targets(agent.state_dir, exit_code=None)
    attacker = subprocess.Popen(
        [SYSTEM_PYTHON, str(HOSTILE_SCRIPT), str(agent.state_dir / "agent.sock"), "1000"],
        user=throwaway_user.uid, group=throwaway_user.gid, extra_groups=[],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "ready"
        wait_for(lambda: "connection cap reached" in agent.log(), what="the cap to be logged")
        late = targets(agent.state_dir, exit_code=None)  # another uid: not locked out
        time.sleep(2.0)  # the flood goes on: drips, drops, reconnects
        rss = psutil.Process(agent.process.pid).memory_info().rss
        assert rss <= 30 * MIB, f"agent RSS {rss / MIB:.1f} MiB"

        sim.control.spot()
        wait_for(lambda: victim.signals() and late.signals(), what="the victims' signals")
        for target in (victim, late):
            signalled_at = next(e["time"] for e in target.events() if e["event"] == "signal")
            assert served_before(sim, signalled_at) <= 2
        assert psutil.Process(agent.process.pid).memory_info().rss <= 30 * MIB
        assert agent.log().count("connection cap reached") == 1
        assert attacker.poll() is None, "the attacker's connections were refused, not it"
    finally:
        attacker.kill()
        attacker.wait()
    assert agent.process.poll() is None


def test_a_process_can_register_only_itself(sim, agents, targets, throwaway_user, public_dir):
    agent = agents.start(sim.url, state_dir=public_dir / "state")
    victim = targets(agent.state_dir, register=False, exit_code=None)
    record = public_dir / "attacker.jsonl"
    record.touch()
    os.chown(record, throwaway_user.uid, throwaway_user.gid)
    # Claims the victim's pid and uid in the message: the agent takes both from the kernel.
    claim = json.dumps({"pid": victim.pid, "uid": 0})
    attacker = targets(
        agent.state_dir, exit_code=None, extra=("--message", claim), python=SYSTEM_PYTHON,
        record=record, user=throwaway_user.uid, group=throwaway_user.gid, extra_groups=[],
    )  # fmt: skip
    assert attacker.received("registered")[0]["pid"] == attacker.pid
    sim.control.spot()
    wait_for(lambda: attacker.signals(), what="the attacker's own signal")
    wait_polls(sim, 3)
    assert victim.signals() == []
    assert f"uid {throwaway_user.uid}" in agent.log()
    attacker.process.kill()
    attacker.process.wait()


def test_a_recycled_pid_is_never_signalled(sim, agents, tmp_path):
    """The registrant dies while a child of it holds the connection, and its PID goes to a
    new process: that process is not signalled (the agent holds a pidfd, not a number)."""
    agent = agents.start(sim.url)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(agent.state_dir / "agent.sock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None
    orphan = int(holder.stdout.readline())
    assert holder.wait(10) == 0
    gone = holder.pid
    record = tmp_path / "stranger.jsonl"
    command = [sys.executable, str(TARGET_SCRIPT), "--state-dir", str(agent.state_dir),
               "--record", str(record)]  # fmt: skip
    stranger = None
    try:
        for _ in range(50):  # other processes on the machine may take the PID first
            try:
                Path("/proc/sys/kernel/ns_last_pid").write_text(str(gone - 1))
            except OSError as exc:
                pytest.skip(f"cannot choose the next PID ({exc.strerror}): needs root")
            stranger = subprocess.Popen(command)
            if stranger.pid == gone:
                break
            stranger.kill()
            stranger.wait()
            stranger = None
        if stranger is None:
            pytest.skip(f"PID {gone} could not be recycled (a busy machine took it first)")
        wait_for(lambda: record.exists(), what="the stranger to be ready")
        sim.control.spot()
        wait_for(lambda: "is gone" in agent.log(), what="the registrant to be found gone")
        time.sleep(0.5)
        assert "signal" not in record.read_text()
        assert stranger.poll() is None
    finally:
        if stranger is not None:
            stranger.kill()
            stranger.wait()
        os.kill(orphan, 9)


def test_registration_from_another_pid_namespace_is_signalled(sim, agents, targets):
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid is not permitted here: {probe.stderr.decode().strip()}")
    agent = agents.start(sim.url)
    target = targets(agent.state_dir, exit_code=None,
                     prefix=("unshare", "--pid", "--fork", "--kill-child"))  # fmt: skip
    inside = next(e for e in target.events() if e["event"] == "ready")["pid"]
    (child,) = psutil.Process(target.pid).children()
    assert inside == 1  # its own view: the first process of its namespace
    assert target.received("registered")[0]["pid"] == child.pid  # the agent's view
    sim.control.spot()
    wait_for(lambda: target.signals() == ["SIGUSR1"], what="the signal across namespaces")
