"""``spotguard imds-sim``: serve the local IMDS simulator until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from typing import Any

__all__ = ["register"]


def register(commands: Any) -> None:
    sim = commands.add_parser("imds-sim", help="run the local IMDS simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=1338, help="0 picks a free port")
    sim.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from spotguard.imds.simulator import ImdsSimulator

    try:
        sim = ImdsSimulator(args.host, args.port)
    except OSError as exc:
        print(
            f"spotguard imds-sim: cannot listen on {args.host}:{args.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"IMDS simulator listening on {sim.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        sim.serve_forever()
    return 0
