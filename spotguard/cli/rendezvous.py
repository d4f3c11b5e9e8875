"""``spotguard rendezvous-store``: host the c10d store of a torchrun elastic job.

Every node's ``torchrun --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-conf
is_host=false`` keeps the job's rendezvous state in this store. It must live on a host that
outlasts any training node: when a node hosts it (torchrun's default: the first one to bind the
endpoint), losing that node ends the rendezvous for every other. The multi-node drill runs this
very command; on AWS it runs on the fleet's rendezvous host, which is not a spot instance.

It prints ``serving HOST:PORT`` once the store listens (``--port 0``: a free port, named in
that line), then serves until SIGTERM or SIGINT (exit 0). A store that cannot listen is a
one-line error, exit 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

__all__ = ["register"]

#: torchrun's own default port for the c10d rendezvous endpoint.
DEFAULT_PORT = 29400


def register(commands: Any) -> None:
    store = commands.add_parser(
        "rendezvous-store", help="host the c10d rendezvous store of a torchrun elastic job"
    )
    store.add_argument("--host", required=True,
                       help="address to listen on: the private one (no default)")  # fmt: skip
    store.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"port (default {DEFAULT_PORT}; 0: a free one)")  # fmt: skip
    store.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # taken by sigwait below, not a handler
    try:
        store = TCPStore(args.host, args.port, is_master=True, wait_for_workers=False)
    except Exception as exc:  # torch's DistNetworkError, RuntimeError: many lines; keep one
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"spotguard rendezvous-store: cannot listen on {args.host}:{args.port}: {reason}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"spotguard rendezvous-store: serving {args.host}:{store.port}", flush=True)
    received = signal.sigwait(stop)
    print(f"spotguard rendezvous-store: {signal.Signals(received).name}, stopping", flush=True)
    del store
    return 0
