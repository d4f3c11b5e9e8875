"""What a drill found: a timeline per interruption, rendered as text, JSON or an HTML chart.

Times in the timeline are seconds since the notice was served by (simulated) IMDS; the margin
is what was left of EC2's two minutes when the preempted process had exited.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DrillReport", "Interruption"]


@dataclass
class Interruption:
    """One interruption and the relaunch that followed it."""

    notified_rank: int
    scheduled_at_step: int
    interrupted_at_step: int | None = None
    resumed_at_step: int | None = None
    #: Exit code of each rank of the preempted run (rank 0's from the process itself, the
    #: others' from the records the hooks leave for the agent).
    rank_exit_codes: list[int | None] = field(default_factory=list)
    #: (event, seconds since the notice was served), in order.
    timeline: list[tuple[str, float]] = field(default_factory=list)
    #: Seconds left to the two-minute deadline when the preempted process had exited.
    margin: float | None = None


@dataclass
class DrillReport:
    seed: int
    ranks: int
    store: str
    workload: str
    passed: bool = False
    failed_step: str | None = None
    failure: str | None = None
    bit_exact: bool | None = None
    reference_sha256: str | None = None
    final_sha256: str | None = None
    #: Exit code of every launch in order: each interrupted run, then the final one.
    exit_codes: list[int] = field(default_factory=list)
    interruptions: list[Interruption] = field(default_factory=list)
    final_step: int | None = None
    #: Launch to first step done for the reference run (no checkpoint to load): the baseline
    #: for "replacement launched" to "first resumed step done".
    fresh_start_seconds: float | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        report = asdict(self)
        report["interrupted_at_step"] = [i.interrupted_at_step for i in self.interruptions]
        report["resumed_at_step"] = [i.resumed_at_step for i in self.interruptions]
        report["seconds"] = round(self.seconds, 3)
        # Every interruption's events in one list, for tools that want a single timeline.
        report["timeline"] = [
            {"interruption": number, "event": name, "seconds_since_notice": round(at, 3)}
            for number, interruption in enumerate(self.interruptions, 1)
            for name, at in interruption.timeline
        ]
        for entry, interruption in zip(report["interruptions"], self.interruptions, strict=True):
            entry["margin"] = None if interruption.margin is None else round(interruption.margin, 3)
            entry["timeline"] = [
                {"event": name, "seconds_since_notice": round(at, 3)}
                for name, at in interruption.timeline
            ]
        return report

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def render_text(self) -> str:
        lines = [
            f"spotguard drill: {self.workload}, {self.ranks} rank(s), seed {self.seed}, "
            f"store {self.store}"
        ]
        for number, interruption in enumerate(self.interruptions, 1):
            lines.append("")
            lines.append(
                f"interruption {number}: notice to rank {interruption.notified_rank}'s node "
                f"at step {interruption.scheduled_at_step}; stopped at step "
                f"{interruption.interrupted_at_step}, resumed at step "
                f"{interruption.resumed_at_step}"
            )
            lines.append(f"  {'event':38} {'s since notice':>14} {'delta':>8}")
            previous = 0.0
            for name, at in interruption.timeline:
                lines.append(f"  {name:38} {at:>14.3f} {at - previous:>+8.3f}")
                previous = at
            if interruption.margin is not None:
                label = "margin left to the 2-minute deadline"
                lines.append(f"  {label:38} {interruption.margin:>14.1f}")
        lines.append("")
        if self.bit_exact is not None:
            verdict = "equal" if self.bit_exact else "DIFFER from"
            lines.append(
                f"final weights {verdict} the uninterrupted run's "
                f"(sha256 {(self.final_sha256 or '?')[:16]}...)"
            )
        lines.append(f"exit codes: {' then '.join(str(code) for code in self.exit_codes)}")
        if self.passed:
            lines.append(f"drill passed in {self.seconds:.1f} s")
        else:
            lines.append(f"drill FAILED at {self.failed_step}: {self.failure}")
        return "\n".join(lines)

    def render_html(self) -> str:
        """A self-contained page: one lane per interruption, events as labelled ticks."""
        lanes = []
        for number, interruption in enumerate(self.interruptions, 1):
            end = max((at for _, at in interruption.timeline), default=1.0) or 1.0
            scale = 760 / end
            ticks = []
            for row, (name, at) in enumerate(interruption.timeline):
                x = 20 + at * scale
                y = 30 + row * 22
                ticks.append(
                    f'<line x1="{x:.1f}" y1="18" x2="{x:.1f}" y2="{y:.0f}" class="tick"/>'
                    f'<circle cx="{x:.1f}" cy="{y:.0f}" r="4"/>'
                    f'<text x="{x + 8:.1f}" y="{y + 4:.0f}">{html.escape(name)} '
                    f"(+{at:.2f} s)</text>"
                )
            height = 50 + 22 * len(interruption.timeline)
            margin = (
                ""
                if interruption.margin is None
                else (f", {interruption.margin:.1f} s of the 2-minute window left at exit")
            )
            lanes.append(
                f"<h2>Interruption {number}: step {interruption.interrupted_at_step} → resumed "
                f"at {interruption.resumed_at_step}{html.escape(margin)}</h2>"
                f'<svg width="1100" height="{height}" role="img">'
                f'<line x1="20" y1="18" x2="780" y2="18" class="axis"/>{"".join(ticks)}</svg>'
            )
        verdict = "passed" if self.passed else f"FAILED at {self.failed_step}: {self.failure}"
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>spotguard drill</title>"
            "<style>body{font-family:sans-serif;margin:2em}text{font-size:12px}"
            ".axis{stroke:#333;stroke-width:2}.tick{stroke:#bbb}circle{fill:#d62}</style>"
            f"</head><body><h1>spotguard drill {html.escape(verdict)}</h1>"
            f"<p>{html.escape(self.workload)}, {self.ranks} rank(s), seed {self.seed}, store "
            f"{html.escape(self.store)}; bit-exact: {self.bit_exact}; exit codes "
            f"{self.exit_codes}.</p>{''.join(lanes)}"
            f"<pre>{html.escape(self.dumps())}</pre></body></html>"
        )
