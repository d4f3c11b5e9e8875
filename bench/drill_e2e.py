"""End-to-end figures of the drill: notice -> checkpoint committed, notice -> process exited,
relaunch -> first resumed step, for the built-in workload and with a 1 GiB state.

Each trial is a whole ``spotguard drill`` (real agent process polling the simulator every
0.5 s, real Lightning training process, local store). The baseline measured in the same run is
the reference launch's time to its first step (a fresh start, nothing to load): the relaunch's
excess over it is what resuming costs. The agent's poll interval is the floor of detection.
The two contenders (fresh start, resumed relaunch) alternate: every drill runs one of each, in
that order, so trial after trial they go A, B, A, B; each figure is the median over trials.

    python bench/drill_e2e.py [--trials 3] [--sizes 0,1GiB] [--store URI]

Smoke test (about a minute): python bench/drill_e2e.py --trials 1 --sizes 0
"""

from __future__ import annotations

import argparse
import statistics

from provenance import describe  # the bench folder is this script's

from spotguard.drill import DrillOptions, run_drill
from spotguard.sizes import parse_size


def _at(timeline: list[tuple[str, float]], event: str) -> float:
    return next(at for name, at in timeline if name == event)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--sizes", default="0,1GiB")
    parser.add_argument("--store")
    args = parser.parse_args()
    print(describe(), flush=True)
    print(
        "| state | trials | detect | notice -> committed | notice -> exited | margin | "
        "relaunch -> first step | fresh start -> first step | resume cost |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size_text in args.sizes.split(","):
        size = parse_size(size_text) if size_text != "0" else 0
        rows: dict[str, list[float]] = {
            k: [] for k in ("detect", "committed", "exited", "margin", "relaunch", "fresh")
        }
        for trial in range(args.trials):
            report = run_drill(DrillOptions(store=args.store, seed=100 + trial, state_bytes=size))
            if not report.passed:
                raise SystemExit(f"trial {trial} failed at {report.failed_step}: {report.failure}")
            (interruption,) = report.interruptions
            timeline = interruption.timeline
            rows["detect"].append(_at(timeline, "agent detected it"))
            rows["committed"].append(_at(timeline, "checkpoint committed"))
            rows["exited"].append(_at(timeline, "process exited with 75"))
            rows["margin"].append(interruption.margin or 0.0)
            relaunch = _at(timeline, "first resumed step done") - _at(
                timeline, "replacement launched"
            )
            rows["relaunch"].append(relaunch)
            rows["fresh"].append(report.fresh_start_seconds or 0.0)
        median = {key: statistics.median(values) for key, values in rows.items()}
        label = size_text if size else "built-in (28 KiB)"
        print(
            f"| {label} | {args.trials} | {median['detect']:.2f} s | {median['committed']:.2f} s "
            f"| {median['exited']:.2f} s | {median['margin']:.1f} s | {median['relaunch']:.2f} s "
            f"| {median['fresh']:.2f} s | {median['relaunch'] / median['fresh']:.2f} x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
