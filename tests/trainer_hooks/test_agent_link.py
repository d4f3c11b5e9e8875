"""The hooks' end of the registration socket in real processes: forks, deaths, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from spotguard.protocol import NOTICE_GRACE_SECONDS, Notice, write_notice
from spotguard.trainer_hooks import SpotGuard
from tests.support import wait_for
from tests.trainer_hooks.agent_double import AgentDouble

ROOT = Path(__file__).resolve().parents[2]
#: An unprivileged uid that exists on Debian-like systems ("nobody"), and a Python it may run
#: (the venv's lives under /root); the fake agent needs the standard library only.
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"

FORKS_A_WORKER_THEN_DIES = textwrap.dedent(
    """
    import os
    import sys
    import time

    from spotguard.trainer_hooks import SpotGuard

    guard = SpotGuard(sys.argv[1], state_dir=sys.argv[2])
    guard.restore({})
    while guard._core.stops._link.registered_pid is None:
        time.sleep(0.05)
    worker = os.fork()  # as a DataLoader worker is forked after the guard connected
    if worker == 0:
        time.sleep(60)
        os._exit(0)
    print(worker, flush=True)
    time.sleep(0.5)
    os._exit(1)  # the trainer dies without closing anything (OOM killer, a crash)
    """
)


def test_a_forked_worker_does_not_keep_a_dead_trainer_registered(tmp_path):
    state_dir = tmp_path / "state"
    with AgentDouble(state_dir) as agent:
        trainer = subprocess.Popen(
            [sys.executable, "-c", FORKS_A_WORKER_THEN_DIES, str(tmp_path / "store"),
             str(state_dir)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        worker = int(trainer.stdout.readline())
        try:
            assert trainer.pid in agent.wait_registered(1)
            assert trainer.wait(30) == 1
            # The worker still runs; the registration ended with the trainer all the same.
            wait_for(lambda: not agent.registered, timeout=10, what="the registration to end")
            assert trainer.pid in agent.ever_registered
        finally:
            os.kill(worker, signal.SIGKILL)


def notice(deadline_in: float) -> Notice:
    now = datetime.now(timezone.utc)
    return Notice("spot-interruption", "terminate", now + timedelta(seconds=deadline_in), now,
                  key=f"k{time.time()}")  # fmt: skip


def test_a_notice_file_placed_by_another_user_does_not_stop_training(tmp_path, caplog):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with SpotGuard(str(tmp_path / "store"), state_dir=state_dir, notice_poll_interval=0.05) as g:
        g.restore({})
        path = write_notice(state_dir, notice(120))
        os.chown(path, NOBODY, NOBODY)
        wait_for(lambda: f"is not a regular file of the agent's (uid {NOBODY})" in caplog.text,
                 what="the notice file refused")  # fmt: skip
        assert not g.stop_requested


def test_a_notice_long_past_its_deadline_is_a_leftover_not_news(tmp_path, caplog):
    """The agent of an earlier boot (or a stuck one) left it: a new job must not stop."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with SpotGuard(str(tmp_path / "store"), state_dir=state_dir, notice_poll_interval=0.05) as g:
        g.restore({})
        write_notice(state_dir, notice(-NOTICE_GRACE_SECONDS - 60))
        wait_for(lambda: "ignored" in caplog.text, what="the stale notice ignored")
        assert not g.stop_requested


FAKE_AGENT = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path

    from tests.trainer_hooks.agent_double import AgentDouble

    double = AgentDouble(Path(sys.argv[1]))
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_a_socket_served_by_another_user_is_not_trusted(tmp_path, public_dir, caplog):
    """Whoever could write the state dir could serve the socket and push fake notices."""
    state_dir = public_dir / "state"
    state_dir.mkdir()
    state_dir.chmod(0o777)
    fake = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", FAKE_AGENT, str(state_dir)], user=NOBODY, group=NOBODY,
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert fake.stdout.readline().strip() == "ready"
        with SpotGuard(str(tmp_path / "store"), state_dir=state_dir) as guard:
            guard.restore({})
            wait_for(lambda: f"is served by uid {NOBODY}, not root" in caplog.text,
                     what="the fake agent refused")  # fmt: skip
            assert guard._core.stops._link.registered_pid is None
    finally:
        fake.kill()
        fake.wait()


def test_an_agent_run_as_the_owner_of_its_state_dir_is_trusted(public_dir, caplog):
    """systemd runs the agent as a dynamic user owning /run/spotguard: its socket and its
    notices count, as long as nobody else could have made that directory."""
    state_dir = public_dir / "state"
    state_dir.mkdir(mode=0o755)
    os.chown(state_dir, NOBODY, NOBODY)
    fake = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", FAKE_AGENT, str(state_dir)], user=NOBODY, group=NOBODY,
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert fake.stdout.readline().strip() == "ready"
        with SpotGuard(str(public_dir / "store"), state_dir=state_dir) as guard:
            guard.restore({})
            wait_for(lambda: guard._core.stops._link.registered_pid == os.getpid(),
                     what="the registration")  # fmt: skip
    finally:
        fake.kill()
        fake.wait()
