"""What ``spotguard drill --nodes N`` found: per node, what happened when; and the verdict.

Times are seconds since the notice was served by the notified node's (simulated) IMDS.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from spotguard.protocol import EXIT_PREEMPTED

__all__ = ["ElasticReport"]

#: A worker's exit code by the outcome it recorded as it left (no outcome: it never left by
#: itself, or crashed before it could say).
_EXIT_CODES = {"preempted": EXIT_PREEMPTED, "finished": 0}
#: What a worker's SpotGuard events are called in the timeline.
_WORKER_EVENTS = {"stop_requested": "stop requested", "save_committed": "emergency checkpoint "
                  "committed", "exiting": f"worker exiting ({EXIT_PREEMPTED})"}  # fmt: skip


class _Instance(Protocol):
    name: str
    events: list[tuple[float, str]]

    @property
    def launcher(self) -> Any: ...


@dataclass
class ElasticReport:
    nodes: int
    min_nodes: int
    store: str
    passed: bool = False
    failed_step: str | None = None
    failure: str | None = None
    #: The node that got the notice (it held rank 0) and when it was served (epoch seconds).
    notified: str | None = None
    notice_at: float | None = None
    #: Whether the notified node's torchrun agent was stopped once its workers had left.
    launcher_stopped: bool | None = None
    #: The world size of each formation of the group, in order.
    world_sizes: list[int] = field(default_factory=list)
    #: The steps the group stopped after (the notice; a node joining restarts the group too),
    #: whether the ranks of each formation agreed on theirs, and where each resume began.
    stop_steps: list[int] = field(default_factory=list)
    agreed: bool | None = None
    resumed_at: list[int] = field(default_factory=list)
    #: Every attempt started after the notice resumed from a checkpoint a stop saved, and
    #: restored that state (SHA-256 of model, optimizer and LR schedule).
    state_equal: bool | None = None
    #: Workers that recorded no outcome (killed, crashed): each one fails the drill.
    unaccounted: list[str] = field(default_factory=list)
    #: Final weights equal the uninterrupted reference's; ``None`` when the world size changed
    #: (data-parallel training then takes other steps: only ``state_equal`` applies).
    bit_exact: bool | None = None
    reference: str | None = None
    final: str | None = None
    #: Per node: its workers' exit codes (one per attempt, by the outcome each recorded as it
    #: left; ``None``: none recorded) and its torchrun's exit code (``None``: it never exited,
    #: the instance went away with it).
    exit_codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    timeline: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    def fail(self, step: str, message: str) -> None:
        if self.failed_step is None:
            self.failed_step, self.failure = step, message

    def collect(self, results: list[dict[str, Any]], instances: Sequence[_Instance]) -> None:
        """Read the workers' records and the nodes' events into the report."""
        origin = self.notice_at or 0.0
        starts = sorted((r["started_at"], r["world"]) for r in results if r.get("rank") == 0)
        self.world_sizes = [world for _, world in starts]
        preempted = [r for r in results if r.get("outcome") == "preempted"]
        self.stop_steps = sorted({int(r["step"]) for r in preempted})
        # One formation of the group: its world size and the step it resumed from. Its ranks
        # must all stop after the same step, and save one state.
        formations: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for record in preempted:
            formations.setdefault((record["world"], record["resumed_from"]), []).append(record)
        self.agreed = all(
            len({int(r["step"]) for r in group}) == 1 for group in formations.values()
        )
        saved: dict[int, set[str]] = {}
        for record in preempted:
            saved.setdefault(int(record["step"]), set()).add(str(record.get("saved_state")))
        # Every attempt started after the notice resumes, from a checkpoint a stop saved.
        resumed = [r for r in results if r["started_at"] > origin]
        self.resumed_at = sorted({int(r.get("resumed_from") or 0) for r in resumed})
        self.state_equal = bool(resumed) and all(
            saved.get(int(r.get("resumed_from") or 0)) == {r.get("restored")} for r in resumed
        )
        self.unaccounted = sorted(
            f"{r['node']} rank {r['rank']} (attempt {r['attempt']})"
            for r in results
            if r.get("outcome") not in _EXIT_CODES
        )
        finals = [r["final"] for r in results if r.get("final")]
        self.final = finals[0] if len(finals) == 1 else None
        if set(self.world_sizes) == {self.nodes}:
            self.bit_exact = self.final is not None and self.final == self.reference
        for instance in instances:
            mine = sorted((r for r in results if r["node"] == instance.name),
                          key=lambda r: r["started_at"])  # fmt: skip
            events = [(what, at - origin) for at, what in instance.events]
            for record in mine:
                formed = f"group formed: rank {record['rank']} of {record['world']}"
                events.append((formed, record["started_at"] - origin))
                if record.get("first_step_at"):
                    what = f"first step of attempt {record['attempt']} (world {record['world']})"
                    events.append((what, record["first_step_at"] - origin))
                for key, what in _WORKER_EVENTS.items():
                    if key in record.get("events", {}):
                        events.append((what, record["events"][key] - origin))
            self.timeline[instance.name] = sorted(
                ((what, round(seconds, 3)) for what, seconds in events), key=lambda e: e[1]
            )
            codes = [_EXIT_CODES.get(str(r.get("outcome"))) for r in mine]
            launcher = instance.launcher.returncode
            self.exit_codes[instance.name] = {
                "workers": codes, "torchrun": launcher if launcher is not None and launcher >= 0
                else None}  # fmt: skip

    def judge(self) -> None:
        """``passed`` when every check held (the first that did not is the failure)."""
        expected = ([self.nodes] * 2 if self.min_nodes == self.nodes
                    else [self.nodes, self.nodes - 1, self.nodes])  # fmt: skip
        checks = [
            ("interruption", self.launcher_stopped is True,
             "the notified node's torchrun agent was not stopped: it would rejoin"),
            ("interruption", not self.unaccounted,
             f"workers left without a word: {', '.join(self.unaccounted)}"),
            ("resume", self.world_sizes == expected,
             f"the group formed at world sizes {self.world_sizes}, expected {expected}"),
            ("resume", self.resumed_at == self.stop_steps,
             f"resumed at steps {self.resumed_at}, the stops were after {self.stop_steps}"),
            ("interruption", self.agreed is True,
             f"the ranks of one group stopped after different steps: {self.stop_steps}"),
            ("resume", self.state_equal is True,
             "a resumed attempt did not restore the state that was saved"),
            ("bit-exact", self.bit_exact is not False,
             "the final weights differ from the uninterrupted reference's"),
        ]  # fmt: skip
        if self.failed_step is None:
            for step, held, message in checks:
                if not held:
                    self.fail(step, message)
                    break
        self.passed = self.failed_step is None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def render_text(self) -> str:
        verdict = "drill passed" if self.passed else f"drill FAILED at {self.failed_step}"
        lines = [f"{verdict}: {self.nodes} nodes (torchrun --nnodes {self.min_nodes}:"
                 f"{self.nodes}), notice to {self.notified}"]  # fmt: skip
        if self.failure:
            lines.append(f"  {self.failure}")
        lines.append(f"world sizes: {' -> '.join(map(str, self.world_sizes))}; stopped after "
                     f"step {self.stop_steps}, resumed at {self.resumed_at}")  # fmt: skip
        lines.append(f"state restored equal to the saved one: {self.state_equal}; bit-exact "
                     f"against the uninterrupted run: {self.bit_exact}")  # fmt: skip
        for node, events in self.timeline.items():
            codes = self.exit_codes.get(node, {})
            lines.append(f"{node}: workers exited {codes.get('workers')}, torchrun "
                         f"{codes.get('torchrun')}")  # fmt: skip
            lines.extend(f"  {seconds:+8.2f} s  {what}" for what, seconds in events)
        return "\n".join(lines)
