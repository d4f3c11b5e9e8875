"""The multi-node drill's timeline per node: notice -> all ranks committed -> group re-formed ->
first resumed step, for ``spotguard drill --nodes 3`` (issue 16).

Each trial is a whole ``spotguard drill --nodes 3`` (three rehearsed nodes, each its own IMDS
simulator, real agent polling every 0.5 s and torchrun with one worker, meeting at a
``spotguard rendezvous-store`` process, a local store; the notice goes to the node holding
rank 0, which is terminated once its workers have left). Two settings: ``--nnodes 3:3`` (the
survivors wait for the replacement, started 5 s after the termination) and ``--nnodes 2:3``
(they go on without the lost node; the replacement starts once they have resumed, and its
joining restarts the group once more). Times are seconds since the simulator served the
notice; medians of ``--trials``; the settings alternate trial by trial.

The baseline measured in the same run: the interrupted job's own first formation, from its
process group being up to its first step (a fresh start, nothing to load); "resume cost" is
the re-formed group's time from process group up to its first resumed step, over that.

    python bench/drill_nodes.py [--trials 3]

Smoke test (about three minutes): python bench/drill_nodes.py --trials 1
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from provenance import describe  # the bench folder is this script's

from spotguard.drill import DrillOptions, run_elastic_drill

#: The figures per trial, in the order printed.
COLUMNS = (
    "notice -> stop requested (notified node)",
    "notice -> emergency checkpoint committed (all ranks)",
    "notice -> notified node's workers gone, torchrun agent stopped",
    "notice -> group re-formed (first survivor's process group up)",
    "notice -> first resumed step",
    "re-formed -> first resumed step",
    "fresh start: group formed -> first step",
)


def _first(events: list[tuple[str, float]], prefix: str, after: float = float("-inf")) -> float:
    return min(at for what, at in events if what.startswith(prefix) and at > after)


def figures(report: dict[str, Any]) -> dict[str, float]:
    """One trial's figures from the drill's JSON report."""
    timeline = {node: [tuple(event) for event in events]
                for node, events in report["timeline"].items()}  # fmt: skip
    notified = timeline[report["notified"]]
    everyone = [event for events in timeline.values() for event in events]
    reformed = _first(everyone, "group formed", after=0.0)
    committed = max(at for what, at in everyone  # the notice's save, not a later one's
                    if what == "emergency checkpoint committed" and at < reformed)  # fmt: skip
    resumed = _first(everyone, "first step of attempt", after=reformed)
    fresh_formed = _first(everyone, "group formed")
    fresh_step = _first(everyone, "first step of attempt 0")
    values = (
        _first(notified, "stop requested"),
        committed,
        _first(notified, "workers left"),
        reformed,
        resumed,
        resumed - reformed,
        fresh_step - fresh_formed,
    )
    return dict(zip(COLUMNS, values, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    print(describe(), flush=True)
    settings = {"3:3 (waits for the replacement)": 3, "2:3 (goes on without it)": 2}
    trials: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    for trial in range(args.trials):
        for name, minimum in settings.items():
            report = run_elastic_drill(DrillOptions(nodes=3, min_nodes=minimum)).to_json()
            if not report["passed"]:
                raise SystemExit(f"trial {trial + 1}, {name}: drill failed: {report['failure']}")
            trials[name].append(figures(report))
            print(f"trial {trial + 1}, {name}: world sizes {report['world_sizes']}", flush=True)
    print("\n| setting | trials | " + " | ".join(COLUMNS) + " | resume cost |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 1))
    for name, rows in trials.items():
        medians = [statistics.median(row[column] for row in rows) for column in COLUMNS]
        cost = medians[-2] / medians[-1]
        cells = " | ".join(f"{value:.2f} s" for value in medians)
        print(f"| {name} | {len(rows)} | {cells} | {cost:.2f} x |")


if __name__ == "__main__":
    main()
