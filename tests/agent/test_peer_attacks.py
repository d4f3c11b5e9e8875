"""Attacks on who the agent signals and on its resources, against the real agent process: a
recycled PID where the kernel has no ``SO_PEERPIDFD``, file descriptor exhaustion, and one
user's flood hiding another user's log lines."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from spotguard.agent.principals import BLOCK
from tests.agent.support import HOLDER, SYSTEM_PYTHON, TARGET_SCRIPT
from tests.support import wait_for

HOSTILE_SCRIPT = Path(__file__).with_name("hostile_client.py")
#: Run in the agent process: it acts as on a kernel older than 6.5 (no ``SO_PEERPIDFD``, so
#: ``getsockopt`` fails with ``ENOPROTOOPT``): the agent falls back to ``pidfd_open``.
NO_PEERPIDFD = "import spotguard.agent.peers as peers; peers.SO_PEERPIDFD = 0x7FFF"

#: Connects, forks a child that keeps the connection, and exits (the child's pid printed). The
#: child registers when a line comes on stdin and prints the agent's answer.
CONNECTOR = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
child = os.fork()
if child:
    print(child, flush=True)
    os._exit(0)
sys.stdin.readline()
sock.sendall(b'{"v": 2, "op": "register", "signal": "SIGUSR1"}\\n')
sock.settimeout(5)
print(sock.makefile().readline().strip(), flush=True)
sock.settimeout(None)
sys.stdin.readline()
"""


def start_with_pid(pid: int, command: list[str], **popen) -> subprocess.Popen[str] | None:
    """Start ``command`` as process ``pid`` (it must be free); ``None`` when others took it."""
    for _ in range(50):
        try:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        except OSError as exc:
            pytest.skip(f"cannot choose the next PID ({exc.strerror}): needs root")
        process = subprocess.Popen(command, text=True, **popen)
        if process.pid == pid:
            return process
        process.kill()
        process.wait()
    return None


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("recycled", ["before-accept", "after-accept"])
def test_without_so_peerpidfd_a_recycled_pid_is_refused(
    sim, agents, throwaway_user, public_dir, recycled
):
    """The connecting process dies, a forked child keeps its connection, and its PID goes to a
    stranger: before the agent accepts the connection (a stranger of another uid: the agent's
    ``pidfd_open`` would pin it) or after (the agent would have found no process, and fallen
    back to signalling by pid). The child's registration is refused; the stranger is never
    signalled."""
    agent = agents.start(sim.url, state_dir=public_dir / "state", preamble=NO_PEERPIDFD)
    record = public_dir / "stranger.jsonl"
    record.touch()
    os.chown(record, throwaway_user.uid, throwaway_user.gid)
    stranger_command = [SYSTEM_PYTHON, str(TARGET_SCRIPT), "--state-dir", str(agent.state_dir),
                        "--record", str(record)]  # fmt: skip
    holder = stranger = None
    try:
        with stopped(agent.process.pid):  # the connection waits in the backlog
            connector = subprocess.Popen(
                [sys.executable, "-c", CONNECTOR, str(agent.state_dir / "agent.sock")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert connector.stdout is not None
            assert connector.stdin is not None
            holder = int(connector.stdout.readline())
            assert connector.wait(10) == 0
            if recycled == "before-accept":
                stranger = start_with_pid(connector.pid, stranger_command,
                                          user=throwaway_user.uid, group=throwaway_user.gid,
                                          extra_groups=[])  # fmt: skip
        if recycled == "after-accept":
            time.sleep(0.5)  # accepted meanwhile, while the PID is free
            # Of the agent's own uid even: it started after the accept, it is not the connector.
            stranger = start_with_pid(connector.pid, stranger_command)
        if stranger is None:
            pytest.skip(f"PID {connector.pid} could not be recycled (a busy machine took it)")
        wait_for(lambda: "ready" in record.read_text(), what="the stranger to be ready")
        connector.stdin.write("register\n")
        connector.stdin.flush()
        answer = json.loads(connector.stdout.readline())
        assert answer["op"] == "error", answer
        assert "gone" in answer["reason"]
        sim.control.spot()
        wait_for(lambda: agent.notice(), what="the notice")
        time.sleep(0.6)
        assert "signal" not in record.read_text()
        assert stranger.poll() is None
        assert agent.process.poll() is None
    finally:
        if stranger is not None:
            stranger.kill()
            stranger.wait()
        if holder is not None:
            os.kill(holder, signal.SIGKILL)


#: Opens COUNT connections at once, each registering (all from this one process), prints
#: ``ready`` and how many were answered ``registered``, then holds them until killed.
FLOOD = """
import socket, sys, time
socks = []
for _ in range(int(sys.argv[2])):
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(sys.argv[1])
        sock.sendall(b'{"v": 2, "op": "register", "signal": "SIGUSR1"}\\n')
    except OSError:
        sock.close()
        continue
    socks.append(sock)
time.sleep(1.0)
registered = 0
for sock in socks:
    sock.settimeout(0.01)
    try:
        registered += b'"registered"' in sock.recv(4096)
    except OSError:
        pass
print("ready", registered, flush=True)
time.sleep(60)
"""


def set_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, 400))


def test_a_connection_flood_cannot_exhaust_the_agents_file_descriptors(
    sim, agents, targets, throwaway_user, public_dir
):
    """A soft limit of 200 file descriptors is raised to the hard limit (400), the caps follow
    it, and one process registers once: 150 connections of one user leave the agent room for
    another user's registration, its notice file and its signals."""
    agent = agents.start(sim.url, state_dir=public_dir / "state",
                         popen={"preexec_fn": set_fd_limit})  # fmt: skip
    flood = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", FLOOD, str(agent.state_dir / "agent.sock"), "150"],
        user=throwaway_user.uid, group=throwaway_user.gid, extra_groups=[],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert flood.stdout is not None
        ready = flood.stdout.readline().split()
        victim = targets(agent.state_dir, exit_code=None)  # answered: no EMFILE
        assert ready == ["ready", "1"]  # one registration per process
        sim.control.spot()
        wait_for(lambda: victim.signals() == ["SIGUSR1"], what="the victim's signal")
        wait_for(lambda: agent.notice(), what="the notice file")
        assert "cannot accept" not in agent.log()
        assert "Too many open files" not in agent.log()
    finally:
        flood.kill()
        flood.wait()
    limits = Path(f"/proc/{agent.process.pid}/limits").read_text()
    assert any(
        line.startswith("Max open files") and line.split()[3:5] == ["400", "400"]
        for line in limits.splitlines()
    ), limits
    assert "file descriptor limit raised from 200 to 400" in agent.log()


def test_one_users_flood_cannot_hide_another_users_lifecycle_lines(
    sim, agents, targets, throwaway_user, public_dir
):
    agent = agents.start(sim.url, state_dir=public_dir / "state")
    attacker = subprocess.Popen(
        [SYSTEM_PYTHON, str(HOSTILE_SCRIPT), str(agent.state_dir / "agent.sock"), "60"],
        user=throwaway_user.uid, group=throwaway_user.gid, extra_groups=[],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "ready"
        wait_for(lambda: agent.log().count("dropped pid") >= 10, what="the flood's log lines")
        time.sleep(0.5)
        victim = targets(agent.state_dir, exit_code=75)
        sim.control.spot()
        wait_for(lambda: victim.process.poll() is not None, what="the victim to exit")
        pid = victim.pid
        wait_for(lambda: f"pid {pid} disconnected" in agent.log(), what="its disconnection")
        log = agent.log()
        assert f"pid {pid} (uid {os.getuid()}, rank 0) registered for SIGUSR1" in log
        assert f"pid {pid} reports exit code 75" in log
    finally:
        attacker.kill()
        attacker.wait()


#: Holds COUNT connections that never register; opens a new one whenever the agent drops one.
HOLD = """
import selectors, socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
selector = selectors.DefaultSelector()
def connect():
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        time.sleep(0.01)
        return
    selector.register(sock, selectors.EVENT_READ)
for _ in range(count):
    connect()
print("ready", flush=True)
while True:
    for key, _ in selector.select(0.2):
        try:
            data = key.fileobj.recv(4096)
        except OSError:
            data = b""
        if not data or b"error" in data:
            selector.unregister(key.fileobj)
            key.fileobj.close()
    while len(selector.get_map()) < count:
        connect()
"""


def small_table() -> None:
    """16 connections in all, 4 per user (``RESERVED_FDS`` = 128 below the limit, 2 each)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))


def hold(agent, uids: list[int], count: int) -> list[subprocess.Popen[str]]:
    holders = []
    for uid in uids:
        holder = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", HOLD, str(agent.state_dir / "agent.sock"), str(count)],
            user=uid, group=65534, extra_groups=[], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        holders.append(holder)
    for holder in holders:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
    return holders


def free_uids(count: int) -> list[int]:
    """Host uids without a passwd entry and outside every subordinate range, one per 65,536-uid
    block (the agent counts an unlisted uid by its block: one user namespace's worth)."""
    taken = []
    with contextlib.suppress(OSError):
        for line in Path("/etc/subuid").read_text().splitlines():
            _, first, number = line.split(":")
            taken.append((int(first), int(first) + int(number)))
    base = (1_800_000_000 // BLOCK + os.getpid() % 1000) * BLOCK
    candidates = (base + n * BLOCK for n in range(1000))
    return [uid for uid in candidates if not any(a <= uid < b for a, b in taken)][:count]


@pytest.fixture
def subordinate_uids(throwaway_user) -> Iterator[list[int]]:
    """Eight subordinate uids of the throwaway user (``usermod --add-subuids``, as Ubuntu's
    ``useradd`` gives every user 65,536), removed afterwards."""
    first = free_uids(1)[0] + 100
    span = f"{first}-{first + 7}"
    added = subprocess.run(["usermod", "--add-subuids", span, throwaway_user.name],
                           capture_output=True, text=True, check=False)  # fmt: skip
    if added.returncode != 0:
        pytest.skip(f"usermod --add-subuids failed: {added.stderr.strip()}")
    try:
        yield list(range(first, first + 8))
    finally:
        subprocess.run(["usermod", "--del-subuids", span, throwaway_user.name],
                       capture_output=True, check=False)  # fmt: skip


def test_a_users_subordinate_uids_count_as_that_user(
    sim, agents, targets, throwaway_user, subordinate_uids, public_dir
):
    """One user connects from eight uids of its subordinate range, each asking for the per-user
    cap: together they are one user, capped at 4 of the 16 places, and a trainer of another
    user registers and gets its signal."""
    agent = agents.start(sim.url, state_dir=public_dir / "state", popen={"preexec_fn": small_table})
    holders = hold(agent, subordinate_uids, 4)
    try:
        wait_for(lambda: "connection cap reached" in agent.log(), what="the cap to be logged")
        victim = targets(agent.state_dir, exit_code=None)
        sim.control.spot()
        wait_for(lambda: victim.signals() == ["SIGUSR1"], what="the victim's signal")
        # Refused as the user: four places taken by it, whichever of its uids asked.
        assert f"4 for uid {throwaway_user.uid}, refused uid" in agent.log()
        assert "making room" not in agent.log()  # the per-user cap alone kept room
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def test_a_full_table_makes_room_from_the_user_holding_the_most(sim, agents, targets, public_dir):
    """Eight users (plain uids) fill all 16 places: a trainer of a ninth user takes a place from
    one of them, and the evicted user cannot take it back (it would hold as many as others)."""
    agent = agents.start(sim.url, state_dir=public_dir / "state", popen={"preexec_fn": small_table})
    holders = hold(agent, free_uids(8), 3)
    try:
        wait_for(lambda: "connection cap reached" in agent.log(), what="the table to fill")
        victim = targets(agent.state_dir, exit_code=None)
        assert "holds the most connections: making room for another user" in agent.log()
        time.sleep(6.0)  # the holders' places expire (no register) and are taken again
        sim.control.spot()
        wait_for(lambda: victim.signals() == ["SIGUSR1"], what="the victim's signal")
        assert victim.received("error") == []
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


#: Run in the agent process: no pidfds at all (no ``SO_PEERPIDFD``, no ``pidfd_open``).
NO_PIDFD = NO_PEERPIDFD + "\nimport os; del os.pidfd_open"


@pytest.mark.parametrize("pidfds", ["so-peerpidfd", "pidfd-open", "none"])
def test_a_pid_whose_registrant_died_registers_anew(sim, agents, tmp_path, pidfds):
    """The registrant exits while its forked child keeps the connection; the next process with
    its pid registers (it was refused as "registered already") and is signalled; the orphaned
    connection is dropped."""
    preamble = {"so-peerpidfd": "", "pidfd-open": NO_PEERPIDFD, "none": NO_PIDFD}[pidfds]
    agent = agents.start(sim.url, preamble=preamble)
    orphaning = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(agent.state_dir / "agent.sock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert orphaning.stdout is not None
    child = int(orphaning.stdout.readline())
    assert orphaning.wait(10) == 0
    record = tmp_path / "successor.jsonl"
    successor = None
    try:
        successor = start_with_pid(
            orphaning.pid,
            [sys.executable, str(TARGET_SCRIPT), "--state-dir", str(agent.state_dir),
             "--record", str(record), "--register"],
        )  # fmt: skip
        if successor is None:
            pytest.skip(f"PID {orphaning.pid} could not be recycled (a busy machine took it)")
        wait_for(lambda: record.exists() and "registered" in record.read_text(),
                 what="the successor's registration")  # fmt: skip
        assert "registered already" not in record.read_text()
        assert "the registered process is gone" in agent.log()
        sim.control.spot()
        wait_for(lambda: '"SIGUSR1"' in record.read_text(), what="the successor's signal")
    finally:
        if successor is not None:
            successor.kill()
            successor.wait()
        os.kill(child, signal.SIGKILL)


def test_without_so_peerpidfd_a_setuid_trainer_registers(
    sim, agents, targets, throwaway_user, tmp_path
):
    """A trainer run from a setuid-root program: its real uid is the user's, its effective uid
    (what ``SO_PEERCRED`` reports) is root's. Where the kernel cannot vouch for the peer, the
    agent checks that the process holding the pid has the connecting uid as its real,
    effective or saved uid: the effective one counts, so it registers and is signalled."""
    agent = agents.start(sim.url, preamble=NO_PEERPIDFD)
    setuid = (
        f"import os, runpy, sys; os.setresuid({throwaway_user.uid}, 0, 0); "
        f"sys.argv = sys.argv[sys.argv.index({str(TARGET_SCRIPT)!r}):]; "
        f"runpy.run_path({str(TARGET_SCRIPT)!r}, run_name='__main__')"
    )
    trainer = targets(agent.state_dir, exit_code=None, prefix=(sys.executable, "-c", setuid),
                      python="--")  # fmt: skip
    status = Path(f"/proc/{trainer.pid}/status").read_text()
    assert f"Uid:\t{throwaway_user.uid}\t0\t0" in status
    sim.control.spot()
    wait_for(lambda: trainer.signals() == ["SIGUSR1"], what="the setuid trainer's signal")
