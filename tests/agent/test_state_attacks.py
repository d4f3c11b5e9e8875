"""``agent-state.json`` stays small whatever local users do, a big one left by an older version
never makes the agent signal a process twice, and the state dir cannot be redirected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil

import spotguard.agent.state as state_module
from spotguard.agent.state import HandledNotice, HandledState
from tests.agent.support import wait_polls
from tests.support import wait_for

#: Registers, then waits to be signalled (SIGUSR1's default action ends it).
SHORT_LIVED = """
import socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.sendall(b'{"v": 2, "op": "register", "signal": "SIGUSR1"}\\n')
time.sleep(20)
"""


def signalled(state_dir: Path) -> dict[str, list[str]]:
    """The identities signalled per notice, as ``agent-state.json`` has them now."""
    try:
        payload = json.loads((state_dir / "agent-state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {notice_id: entry["signalled"] for notice_id, entry in payload["notices"].items()}


def identity_in(state_dir: Path, pid: int) -> str | None:
    return next(
        (i for ids in signalled(state_dir).values() for i in ids if i.startswith(f"{pid}@")), None
    )


def test_processes_that_are_gone_are_not_kept_in_the_state(sim, agents, targets):
    """While a notice is active, every newcomer is signalled and remembered: only as long as
    it runs (each one gone cannot be signalled twice anyway)."""
    agent = agents.start(sim.url)
    victim = targets(agent.state_dir, exit_code=None)
    sim.control.spot()
    wait_for(lambda: victim.signals() == ["SIGUSR1"], what="the victim's signal")
    path = str(agent.state_dir / "agent-state.json")
    sock = str(agent.state_dir / "agent.sock")
    for _ in range(3):
        batch = [subprocess.Popen([sys.executable, "-c", SHORT_LIVED, sock]) for _ in range(8)]
        for process in batch:
            assert process.wait(10) != 0  # ended by the signal
    wait_for(lambda: sum(map(len, signalled(agent.state_dir).values())) == 1,
             what=f"{path} to keep only the live process")  # fmt: skip
    assert identity_in(agent.state_dir, victim.pid)
    assert victim.signals() == ["SIGUSR1"]


def signalled_then_stopped(sim, agents, targets, tmp_path: Path):
    """An agent signals a registered target for a spot notice, saves that, and stops; returns
    the state dir, the target (it reconnects to the next agent by itself), the state file and
    its payload."""
    state_dir = tmp_path / "state"
    first = agents.start(sim.url, state_dir=state_dir)
    target = targets(state_dir, exit_code=None)
    sim.control.spot()
    wait_for(lambda: target.signals() == ["SIGUSR1"], what="the signal")
    wait_for(lambda: identity_in(state_dir, target.pid), what="the signal to be saved")
    assert first.stop() == 0
    path = state_dir / "agent-state.json"
    return state_dir, target, path, json.loads(path.read_text())


def test_a_big_state_file_of_an_older_version_signals_no_one_twice(sim, agents, targets, tmp_path):
    """An older version let ``agent-state.json`` grow past 1 MiB: the next agent read it as
    corrupt and signalled everyone again for the same notice. It is read, and pruned."""
    state_dir, target, path, payload = signalled_then_stopped(sim, agents, targets, tmp_path)
    (entry,) = payload["notices"].values()
    entry["signalled"] += [f"{30000 + i % 2000}@{1796187111.87 + i:.2f}" for i in range(60000)]
    path.write_text(json.dumps(payload))
    assert path.stat().st_size > 1 << 20

    second = agents.start(sim.url, state_dir=state_dir)
    wait_for(lambda: len(target.received("registered")) == 2, what="the target to reconnect")
    wait_for(lambda: path.stat().st_size < 4096, what="the state file to be pruned")
    wait_polls(sim, 3)  # serving the notice
    assert target.signals() == ["SIGUSR1"]
    assert identity_in(state_dir, target.pid)
    assert "unreadable" not in second.log()


def test_a_symlinked_state_dir_is_refused_and_its_target_untouched(sim, agents, tmp_path):
    """A symlink to a directory of root's: the agent would chmod it 0755 and remove its
    ``targets/`` and ``exits/``."""
    protected = tmp_path / "protected"
    (protected / "targets").mkdir(parents=True)
    (protected / "targets" / "keep").write_text("x")
    protected.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(protected)
    agent = agents.start(sim.url, state_dir=link, check=False)
    assert agent.process.wait(10) != 0
    assert f"{link} is a symlink" in agent.log()
    assert oct(protected.stat().st_mode & 0o777) == "0o700"
    assert (protected / "targets" / "keep").exists()


def test_a_state_dir_below_a_directory_others_can_write_is_refused(sim, agents, tmp_path):
    """Another user could swap the state dir for a symlink there once the agent checked it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # world-writable, not sticky
    state_dir = shared / "state"
    agent = agents.start(sim.url, state_dir=state_dir, check=False)
    assert agent.process.wait(10) != 0
    assert f"lies below {shared}" in agent.log()
    assert not os.path.exists(state_dir / "agent.sock")


def test_live_processes_past_the_saved_cap_are_never_forgotten(tmp_path, monkeypatch):
    """Forgetting a live, signalled process signals it again at the next tick: only what is
    written to disk is capped."""
    monkeypatch.setattr(state_module, "MAX_SIGNALLED", 3)
    handled = HandledState(tmp_path / "agent-state.json")
    now = datetime.now(timezone.utc)
    live = {f"{pid}@1.0" for pid in range(100, 110)}
    handled.notices["spot-interruption/x"] = HandledNotice(noticed_at=now, signalled=set(live))
    handled.prune({"spot-interruption/x"}, lambda identity: True, now)
    assert handled.notices["spot-interruption/x"].signalled == live
    handled.save()
    saved = json.loads((tmp_path / "agent-state.json").read_text())
    assert len(saved["notices"]["spot-interruption/x"]["signalled"]) == 3


def test_a_long_active_notice_dropped_for_one_poll_is_not_forgotten(tmp_path):
    """Kept ``KEEP_INACTIVE`` after it went inactive, not after it was noticed: a maintenance
    notice active for seven hours that IMDS misses once would otherwise be forgotten at once,
    and everyone signalled (and every action run) again when it comes back. Across a restart
    too: the time it went inactive is saved."""
    path = tmp_path / "agent-state.json"
    handled = HandledState(path)
    noticed = datetime(2026, 1, 1, tzinfo=timezone.utc)
    notice_id = "scheduled-maintenance/x"
    handled.notices[notice_id] = HandledNotice(noticed_at=noticed, signalled={"10@5@b"})
    seven_hours = noticed + timedelta(hours=7)
    handled.prune({notice_id}, lambda identity: True, seven_hours)
    handled.prune(set(), lambda identity: True, seven_hours + timedelta(seconds=5))
    assert handled.notices[notice_id].signalled == {"10@5@b"}
    handled.save()
    reloaded = HandledState(path)
    reloaded.load()
    assert reloaded.notices[notice_id].inactive_since == seven_hours + timedelta(seconds=5)
    later = seven_hours + timedelta(seconds=5 + state_module.KEEP_INACTIVE - 1)
    reloaded.prune(set(), lambda identity: True, later)
    assert notice_id in reloaded.notices
    reloaded.prune({notice_id}, lambda identity: True, later)  # served again: active anew
    assert reloaded.notices[notice_id].inactive_since is None
    much_later = later + timedelta(seconds=state_module.KEEP_INACTIVE + 10)
    reloaded.prune(set(), lambda identity: True, much_later)  # inactive from here on
    assert notice_id in reloaded.notices
    reloaded.prune(set(), lambda identity: True, much_later + timedelta(seconds=1 + 6 * 3600))
    assert notice_id not in reloaded.notices


def test_an_agent_upgraded_during_a_notice_signals_no_one_twice(sim, agents, targets, tmp_path):
    """The state file of the earlier version names processes ``pid@create time``: the upgraded
    agent reads them in today's form (``pid@start ticks@boot id``), so a trainer signalled
    before the upgrade is not signalled again when it reconnects."""
    state_dir, target, path, payload = signalled_then_stopped(sim, agents, targets, tmp_path)
    (entry,) = payload["notices"].values()
    legacy = f"{target.pid}@{psutil.Process(target.pid).create_time():.2f}"
    entry["signalled"] = [legacy]
    path.write_text(json.dumps(payload))

    agents.start(sim.url, state_dir=state_dir)
    wait_for(lambda: len(target.received("registered")) == 2, what="the target to reconnect")
    wait_polls(sim, 3)  # serving the notice
    assert target.signals() == ["SIGUSR1"]
    wait_for(lambda: identity_in(state_dir, target.pid) not in (None, legacy),
             what="the identity saved in today's form")  # fmt: skip
