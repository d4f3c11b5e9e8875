"""A stand-in training process for agent tests: records every signal and message it gets.

With ``--register`` it registers through the agent's socket the way the trainer hooks do, in a
few lines of raw socket code (the agent tests need no torch): connect, send ``register``, read
what the agent pushes, reconnect when the agent restarts. On SIGUSR1/SIGTERM it either keeps
running (to count signals) or sends an ``exit`` message and exits with ``--exit-code``.
Standard library only: a throwaway user runs it with the system Python too.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--register", action="store_true")
    parser.add_argument("--once", action="store_true", help="register, then hang up for good")
    parser.add_argument("--message", default="", help="JSON fields added to the register message")
    parser.add_argument("--exit-code", type=int)
    parser.add_argument("--tag", default="trainer")
    parser.add_argument("--lifetime", type=float, default=60.0, help="seconds, then exit 0")
    args = parser.parse_args()
    path = str(args.state_dir / "agent.sock")
    conn: socket.socket | None = None
    pending = b""
    messages: list[dict[str, object]] = []
    stopping: list[int] = []

    def note(event: str, **fields: object) -> None:
        with args.record.open("a") as handle:
            handle.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    def on_signal(signum: int, frame: object) -> None:
        note("signal", signal=signal.Signals(signum).name)
        if args.exit_code is not None:
            stopping.append(signum)  # acted on by the loop, within 50 ms

    def connect() -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            register = {"v": 2, "op": "register", "signal": "SIGUSR1", "rank": 0}
            register.update(json.loads(args.message or "{}"))
            sock.sendall(json.dumps(register).encode() + b"\n")
        except OSError:
            sock.close()
            return None
        return sock

    def read() -> bool:
        """Record the messages that have arrived; ``False`` when the agent hung up."""
        nonlocal pending
        assert conn is not None
        data = conn.recv(65536)
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            message = json.loads(line)
            messages.append(message)
            note(message["op"], **{k: v for k, v in message.items() if k not in ("op", "v")})
        return bool(data)

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if args.register:
        conn = connect()
    note("ready", pid=os.getpid())
    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline:
        if stopping:
            if conn is not None:
                # The agent writes the notice before it signals: it is already here.
                while select.select([conn], [], [], 0)[0] and read():
                    pass
                exit_message = {"v": 2, "op": "exit", "code": args.exit_code, "step": 7}
                conn.sendall(json.dumps(exit_message).encode() + b"\n")
            sys.exit(args.exit_code)
        if conn is None:
            time.sleep(0.05)
            if args.register and not args.once:
                conn, pending = connect(), b""
            continue
        if select.select([conn], [], [], 0.05)[0] and not read():
            note("disconnected")
            conn.close()
            conn = None
        elif args.once and messages:
            conn.close()
            conn = None


if __name__ == "__main__":
    main()
