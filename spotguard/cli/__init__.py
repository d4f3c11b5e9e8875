"""The ``spotguard`` command: one console script for every part.

Each subcommand is a module of this package that declares its own arguments next to the code
that runs them (``register(commands)`` adds the parser and sets ``handler``)::

    agent, status      spotguard.cli.agent      the on-node daemon; one look at IMDS
    imds-sim           spotguard.cli.imds_sim   the local IMDS simulator
    ckpt               spotguard.cli.ckpt       list | verify | prune | pull a checkpoint store
    drill              spotguard.cli.drill      the interruption loop rehearsed on this machine
    fleet              spotguard.cli.fleet      render | package | job-end | wait-clear
    rendezvous-store   spotguard.cli.rendezvous the c10d store of a torchrun elastic job
    install-units      spotguard.cli.units      copy the shipped systemd unit files

A handler imports what it needs when it runs, so ``spotguard agent`` never loads torch, boto3
or the trainer hooks. Exit codes: 0 ok, 1 the command ran but what it checks failed (or any
other failure), 2 a usage or configuration error, reported as one line that names the culprit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from spotguard.cli import agent, ckpt, drill, fleet, imds_sim, rendezvous, units
from spotguard.errors import ConfigError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are exit 2 with a single line (no usage dump to wade through)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spotguard", description="Keep spot GPU training alive.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (agent, ckpt, drill, fleet, units, imds_sim, rendezvous):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.environ = dict(os.environ) if environ is None else environ
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(f"spotguard {args.command}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
