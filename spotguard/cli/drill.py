"""``spotguard drill``: run the drill (or the budget check) and print what happened.

The drill's own options (store, ranks, interruptions, ...) are declared once, on
:class:`~spotguard.drill.DrillOptions`; this module adds the flags about output and the budget
check. Exit codes: 0 every step held (or the save fits), 1 a step failed (or it does not fit),
2 a usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from spotguard.errors import CheckpointError

__all__ = ["register"]


def register(commands: Any) -> None:
    from spotguard.drill.options import add_arguments

    drill = commands.add_parser(
        "drill", help="rehearse an interruption end to end on this machine (or size a save)"
    )
    add_arguments(drill)
    drill.add_argument("--json", action="store_true", help="print the report as JSON")
    drill.add_argument("--report", type=Path, metavar="FILE.html", help="write an HTML timeline")
    drill.add_argument(
        "--budget",
        action="store_true",
        help="instead: does an emergency save of --state-size fit in the 2-minute notice?",
    )
    drill.add_argument("--probe-size", default="256MiB", help="with --budget: bytes to time")
    drill.add_argument(
        "--step-seconds",
        type=float,
        default=2.0,
        help="with --budget: the longest training step (the save starts after it)",
    )
    drill.set_defaults(handler=_run)


def _say(line: str) -> None:
    print(f"... {line}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    if args.budget:
        return _budget(args)
    from spotguard.drill import from_args, run_drill

    options = from_args(args)  # a ConfigError: one line, exit 2
    say = _say if not args.json else lambda line: None
    if options.nodes > 1:
        return _elastic(args, options, say)
    report = run_drill(options, say=say)
    print(report.dumps() if args.json else report.render_text())
    if args.report:
        args.report.write_text(report.render_html())
        if not args.json:
            print(f"timeline chart: {args.report}")
    return 0 if report.passed else 1


def _elastic(args: argparse.Namespace, options: Any, say: Any) -> int:
    from spotguard.drill import run_elastic_drill

    if args.report:
        print("spotguard drill: --report (the HTML chart) is not made with --nodes",
              file=sys.stderr)  # fmt: skip
        return 2
    report = run_elastic_drill(options, say=say)
    print(report.dumps() if args.json else report.render_text())
    return 0 if report.passed else 1


def _budget(args: argparse.Namespace) -> int:
    from spotguard.drill import check_budget, parse_flag
    from spotguard.sizes import parse_size

    if not args.store:
        print(
            "spotguard drill --budget: --store is required (where the saves would go)",
            file=sys.stderr,
        )
        return 2
    try:
        budget = check_budget(
            args.store,
            state_size=parse_flag(args, "state_bytes"),
            probe_size=parse_size(args.probe_size),
            step_seconds=args.step_seconds,
        )
    except (ValueError, CheckpointError) as exc:
        print(f"spotguard drill --budget: {exc}", file=sys.stderr)
        return 2
    print(budget.dumps() if args.json else budget.render_text())
    return 0 if budget.fits else 1
