"""A one-minute rehearsal of the agent's half of an interruption, on this machine.

``python -m spotguard.agent.demo`` starts the IMDS simulator, the real agent (the same command
systemd runs) and a stand-in training process that registers itself the way the trainer hooks
do. It then schedules a spot interruption and prints what happened when: notice served, agent
detected, signal received, process exited with 75. Exit status 0 only if every step held.

The full drill, with a real training run, checkpoint and bit-exact resume, is ``spotguard drill``
once the trainer hooks are installed; this demo needs nothing but the agent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spotguard.agent.imds_sim import ImdsSimulator, SimControl
from spotguard.agent.protocol import read_notice

__all__ = ["main"]

NOTICE_LEAD = 120.0
POLL_INTERVAL = 0.5

#: The stand-in trainer: registers, records when the signal came, leaves an exit record, exits 75.
TRAINER = """
import json, os, signal, sys, time
from datetime import datetime, timezone
from pathlib import Path
import psutil
from spotguard.agent import protocol as p
state_dir, record = Path(sys.argv[1]), Path(sys.argv[2])
created = psutil.Process().create_time()
def on_signal(signum, frame):
    record.write_text(json.dumps({"signal": signal.Signals(signum).name, "time": time.time()}))
    now = datetime.now(timezone.utc)
    p.write_exit_record(state_dir, p.ExitRecord(os.getpid(), created, 75, now))
    p.unregister(state_dir, os.getpid())
    sys.exit(75)
signal.signal(signal.SIGUSR1, on_signal)
p.register(state_dir, p.Registration(os.getpid(), created))
while True:
    time.sleep(0.05)
"""


def _fail(step: str) -> int:
    print(f"demo failed: {step}", file=sys.stderr)
    return 1


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="spotguard-demo-") as name, ImdsSimulator() as sim:
        tmp = Path(name)
        state_dir, record = tmp / "state", tmp / "signal.json"
        config = tmp / "agent.toml"
        config.write_text(f'poll_interval = {POLL_INTERVAL}\nmetrics_address = ""\n')
        print(f"IMDS simulator on {sim.url}; state dir {state_dir}")
        agent = subprocess.Popen(
            [sys.executable, "-m", "spotguard.agent", "agent", "--config", str(config),
             "--imds-endpoint", sim.url, "--state-dir", str(state_dir)],
            stdout=(tmp / "agent.log").open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        trainer = subprocess.Popen(
            [sys.executable, "-c", TRAINER, str(state_dir), str(record)],
        )
        control = SimControl(sim.url)
        try:
            time.sleep(2.0)  # the agent polls, the trainer "trains"
            served = time.time()
            control.spot(in_seconds=NOTICE_LEAD)
            print(f"scheduled a spot interruption {NOTICE_LEAD:.0f} s ahead")
            try:
                code = trainer.wait(timeout=15)
            except subprocess.TimeoutExpired:
                return _fail("the training process was not signalled within 15 s")
            exited = time.time()
            notice = read_notice(state_dir)
            if notice is None:
                return _fail("the agent wrote no notice file")
            signalled = json.loads(record.read_text())
            log_path = tmp / "agent.log"
            give_up = time.monotonic() + 5 * POLL_INTERVAL + 2
            while "exit code 75" not in log_path.read_text() and time.monotonic() < give_up:
                time.sleep(0.05)
        finally:
            trainer.kill()
            agent.terminate()
            agent.wait(10)
            control.close()
        detected = notice.noticed_at.timestamp()
        deadline = notice.deadline.timestamp() if notice.deadline else served + NOTICE_LEAD
        rows = [
            ("notice served by IMDS", served),
            ("agent detected it", detected),
            (f"trainer got {signalled['signal']}", signalled["time"]),
            (f"trainer exited with code {code}", exited),
        ]
        print(f"\n{'step':34} {'+s since notice':>15}")
        for label, moment in rows:
            print(f"{label:34} {moment - served:>15.3f}")
        print(f"{'margin left to the deadline':34} {deadline - exited:>15.1f}")
        if code != 75:
            return _fail(f"the trainer exited {code}, expected 75")
        if "exit code 75" not in log_path.read_text():
            return _fail("the agent did not log the trainer's exit code")
        print("\ndemo passed: notice -> agent -> signal -> exit 75")
        return 0


if __name__ == "__main__":
    sys.exit(main())
