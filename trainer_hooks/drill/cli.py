"""``spotguard drill``: run the drill (or the budget check) and print what happened.

The parser lives with the rest of the CLI in :mod:`spotguard.agent.cli`. Exit codes: 0 every
step held (or the save fits), 1 a step failed (or it does not fit), 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys

from spotguard.trainer_hooks._internals.sizes import parse_size
from spotguard.trainer_hooks.drill.budget import check_budget
from spotguard.trainer_hooks.drill.runner import DrillOptions, run_drill
from spotguard.trainer_hooks.errors import CheckpointError

__all__ = ["run_drill_command"]


def _say(line: str) -> None:
    print(f"... {line}", file=sys.stderr, flush=True)


def run_drill_command(args: argparse.Namespace) -> int:
    if args.budget:
        return _budget(args)
    try:
        state_bytes = parse_size(args.state_size) if args.state_size else 0
        options = DrillOptions(
            store=args.store,
            ranks=args.ranks,
            interruptions=args.interruptions,
            seed=args.seed,
            script=args.script,
            state_bytes=state_bytes,
        )
    except ValueError as exc:
        print(f"spotguard drill: {exc}", file=sys.stderr)
        return 2
    report = run_drill(options, say=_say if not args.json else lambda line: None)
    print(report.dumps() if args.json else report.render_text())
    if args.report:
        args.report.write_text(report.render_html())
        if not args.json:
            print(f"timeline chart: {args.report}")
    return 0 if report.passed else 1


def _budget(args: argparse.Namespace) -> int:
    if not args.store:
        print(
            "spotguard drill --budget: --store is required (where the saves would go)",
            file=sys.stderr,
        )
        return 2
    try:
        state_size = parse_size(args.state_size) if args.state_size else None
        probe_size = parse_size(args.probe_size)
        budget = check_budget(
            args.store, state_size=state_size, probe_size=probe_size, step_seconds=args.step_seconds
        )
    except (ValueError, CheckpointError) as exc:
        print(f"spotguard drill --budget: {exc}", file=sys.stderr)
        return 2
    print(budget.dumps() if args.json else budget.render_text())
    return 0 if budget.fits else 1
