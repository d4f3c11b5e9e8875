"""A stand-in training process for agent tests: records every signal it gets.

It registers with the agent (``--register``) like the trainer hooks do, and on SIGUSR1/SIGTERM
either keeps running (to count signals) or leaves an exit record and exits with ``--exit-code``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from spotguard.protocol import (
    ExitRecord,
    Registration,
    register,
    unregister,
    write_exit_record,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--register", action="store_true")
    parser.add_argument("--exit-code", type=int)
    parser.add_argument("--tag", default="trainer")
    parser.add_argument("--lifetime", type=float, default=60.0, help="seconds, then exit 0")
    args = parser.parse_args()
    create_time = psutil.Process().create_time()

    def note(event: str, **fields: object) -> None:
        with args.record.open("a") as handle:
            handle.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    def on_signal(signum: int, frame: object) -> None:
        note("signal", signal=signal.Signals(signum).name)
        if args.exit_code is not None:
            record = ExitRecord(
                os.getpid(), create_time, args.exit_code, datetime.now(timezone.utc)
            )
            write_exit_record(args.state_dir, record)
            unregister(args.state_dir, os.getpid())
            sys.exit(args.exit_code)

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if args.register:
        register(args.state_dir, Registration(os.getpid(), create_time, "SIGUSR1", 0))
    note("ready", pid=os.getpid())
    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline:
        time.sleep(0.05)


if __name__ == "__main__":
    main()
