"""The drill itself: reference run, interruptions through the real agent, relaunch, compare.

Every moving part is the real one: the agent is a ``spotguard agent`` subprocess polling a
simulated IMDS over HTTP; the training is a separate process (Lightning's real ``Trainer``
with :class:`~spotguard.trainer_hooks.lightning.SpotCheckpoint`, or the user's script);
signals, exit codes and the checkpoint store are real. What the drill adds is the schedule
(when the notice is served) and the bookkeeping (what happened when), and it never waits
forever: every wait has a limit and a sentence for when it runs out.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

from spotguard.drill._launch import Launch
from spotguard.drill._node import Node
from spotguard.drill.options import DrillOptions, WorkloadRun
from spotguard.drill.report import DrillReport, Interruption
from spotguard.drill.workload import STEPS_PER_EPOCH
from spotguard.errors import CheckpointError, DrillFailed
from spotguard.protocol import EXIT_PREEMPTED, SPOT_NOTICE_SECONDS, STATE_DIR_ENV, socket_path
from spotguard.trainer_hooks import CheckpointStore

__all__ = ["run_drill"]

#: Epochs of the built-in workload per interruption: each notice lands in a segment of its own,
#: in its first half, so the stop (a poll interval or so later) still falls inside it.
EPOCHS_PER_INTERRUPTION = 4
SEGMENT = EPOCHS_PER_INTERRUPTION * STEPS_PER_EPOCH


class _Drill:
    def __init__(self, options: DrillOptions, folder: Path, say: Callable[[str], None]) -> None:
        self.options = options
        self.folder = folder
        self.say = say
        self.seed = options.seed if options.seed is not None else random.randrange(2**31)
        self.random = random.Random(self.seed)
        base = options.store or str(folder / "store")
        self.store_uri = f"{base.rstrip('/')}/spotguard-drill-{int(time.time())}-{self.seed}"
        workload = f"script {options.script}" if options.script else "built-in Lightning workload"
        self.report = DrillReport(self.seed, options.ranks, self.store_uri, workload)
        self.launches = 0
        self.reference_seconds = 10.0
        #: The last interruption and when its notice was served, until its replacement ran.
        self._previous: tuple[Interruption, float] | None = None
        self._launched: list[Launch] = []

    # -- launching ----------------------------------------------------------------------------

    def _launch(self, role: str, *, hooks: bool, nodes: list[Node], store: str) -> Launch:
        self.launches += 1
        results = self.folder / f"{self.launches:02d}-{role}"
        results.mkdir()
        env = dict(os.environ)
        env["SPOTGUARD_CHECKPOINT_URI"] = store
        # No state dir = no registration: the reference run is nobody's target.
        env[STATE_DIR_ENV] = str(nodes[0].state_dir if nodes else results / "no-agent")
        if self.options.script is not None:
            env["SPOTGUARD_DRILL_OUTPUT"] = str(results / "final.pt")
            command = [sys.executable, str(self.options.script)]
        else:
            epochs = EPOCHS_PER_INTERRUPTION * self.options.interruptions
            if hooks:
                template = None
                if nodes:  # rank r registers with node r's agent
                    root = nodes[0].state_dir.parent.parent  # as _nodes lays them out
                    template = str(root / "node-{rank}" / "state")
                run = WorkloadRun(self.options, results, store, template, epochs=epochs)
            else:  # the reference: no notice to land mid-run, so no need to slow its steps
                run = WorkloadRun(replace(self.options, step_time=0.0), results, epochs=epochs)
            command = [sys.executable, "-m", "spotguard.drill.workload", run.to_json()]
        launch = Launch.start(command, env, results)
        self._launched.append(launch)
        return launch

    @contextmanager
    def _nodes(self, label: str) -> Iterator[list[Node]]:
        """Fresh instances (one per rank) with running, IMDS-connected agents."""
        root = self.folder / f"{label}-nodes"
        nodes: list[Node] = []
        try:
            for rank in range(self.options.ranks):
                nodes.append(
                    Node(
                        f"node-{rank}",
                        root / f"node-{rank}",
                        poll_interval=self.options.poll_interval,
                        imds_endpoint=self.options.agent_imds_endpoint,
                    )
                )
            for node in nodes:
                node.wait_ready()
            yield nodes
        finally:
            for node in nodes:
                node.stop()

    def _wait_exit(self, launch: Launch, what: str) -> int:
        try:
            return launch.process.wait(self.options.launch_timeout)
        except subprocess.TimeoutExpired:
            raise DrillFailed(
                what, f"the {what} run did not finish within {self.options.launch_timeout:.0f} s"
            ) from None

    # -- the steps ----------------------------------------------------------------------------

    def check_store(self) -> CheckpointStore:
        self.say(f"checking that {self.store_uri} takes writes")
        try:
            store = CheckpointStore(self.store_uri)
            store.save(0, {"probe": b"spotguard drill write probe"})
            store.delete(0)
        except (CheckpointError, OSError) as exc:
            raise DrillFailed("store", f"the store rejects writes: {exc}") from None
        return store

    def reference(self) -> None:
        self.say("reference run (no interruption)")
        launch = self._launch(
            "reference", hooks=False, nodes=[], store=f"{self.store_uri}/reference"
        )
        code = self._wait_exit(launch, "reference")
        if code != 0:
            raise DrillFailed(
                "reference", f"the uninterrupted run exited {code}: {launch.last_error()}"
            )
        self.report.reference_sha256 = self._digest(launch)
        self.reference_seconds = time.time() - launch.started_at
        first_step = launch.result(0).get("first_step_at")
        if first_step:
            self.report.fresh_start_seconds = first_step - launch.started_at

    def _digest(self, launch: Launch) -> str | None:
        if self.options.script is None:
            digest = launch.result(0).get("weights_sha256")
            return str(digest) if digest else None
        output = launch.results / "final.pt"
        if not output.exists():
            return None  # the script does not write SPOTGUARD_DRILL_OUTPUT: not compared
        import torch

        from spotguard.drill.workload import weights_digest

        return weights_digest(torch.load(output, weights_only=True))

    def _wait_registered(self, launch: Launch, node: Node) -> None:
        give_up = time.monotonic() + self.options.launch_timeout
        while not node.registered_pids():
            code = launch.process.poll()
            if code not in (None, 0):
                raise DrillFailed(
                    "registration",
                    f"the training exited with code {code} before it registered with the "
                    f"agent: {launch.last_error()}",
                )
            if code == 0 or time.monotonic() > give_up:
                how = "exited with code 0" if code == 0 else "kept running"
                raise DrillFailed(
                    "registration",
                    f"the training {how} without registering with the agent (nothing "
                    f"connected to {socket_path(node.state_dir)}): does it use SpotCheckpoint "
                    f"or SpotGuard, with the state dir from {STATE_DIR_ENV}?",
                )
            time.sleep(0.05)

    def _wait_for_trigger(self, launch: Launch, target_step: int, delay: float) -> None:
        """Until the built-in run reaches ``target_step``, or ``delay`` s for a script."""
        give_up = time.monotonic() + self.options.launch_timeout
        ready = time.monotonic() + delay
        while True:
            if launch.process.poll() is not None:
                raise DrillFailed(
                    "interruption",
                    f"the training exited with code "
                    f"{launch.process.returncode} before the notice was served: "
                    f"{launch.last_error()}",
                )
            if self.options.script is None and launch.progress() >= target_step:
                return
            if self.options.script is not None and time.monotonic() >= ready:
                return
            if time.monotonic() > give_up:
                raise DrillFailed(
                    "interruption", f"the training did not reach step {target_step} in time"
                )
            time.sleep(0.01)

    def interrupt(self, number: int, previous_step: int) -> Interruption:
        segment_start = number * SEGMENT
        # In the first half of this interruption's segment, after the last stop; a slow machine
        # that stopped late in the previous segment gets the next notice right away.
        low = max(segment_start, previous_step) + 4
        target = self.random.randint(low, max(low, segment_start + SEGMENT // 2))
        notified = self.random.randrange(self.options.ranks)
        record = Interruption(notified_rank=notified, scheduled_at_step=target)
        self.report.interruptions.append(record)
        resumes_from = self._newest_step()
        with self._nodes(f"interruption-{number + 1}") as nodes:
            launch = self._launch(
                f"interrupted-{number + 1}", hooks=True, nodes=nodes, store=self.store_uri
            )
            self.say(
                f"interruption {number + 1}: training; notice to rank {notified}'s node "
                f"at step {target}"
            )
            for node in nodes:
                self._wait_registered(launch, node)
            # A script reports no steps: serve the notice a random share of the way through
            # what is left of its run, split between the interruptions still to come.
            share = self.reference_seconds / self.options.interruptions
            delay = self.random.uniform(0.2, 0.5) * share
            self._wait_for_trigger(launch, target, delay)
            node = nodes[notified]
            served = node.interrupt()
            try:
                code = launch.process.wait(SPOT_NOTICE_SECONDS)
            except subprocess.TimeoutExpired:
                raise DrillFailed(
                    "interruption",
                    "the training was still running when the two-minute window closed",
                ) from None
            exited = time.time()
            self.report.exit_codes.append(code)
            notice = node.notice()
            record.rank_exit_codes = [code]
            for rank in range(1, self.options.ranks):
                pid = int(launch.result(rank).get("pid", -1))
                record.rank_exit_codes.append(nodes[rank].recorded_exit_code(pid))
        self._relaunched(launch, resumes_from)
        if notice is None:
            raise DrillFailed(
                "agent",
                f"the agent wrote no notice file for the interruption: {node.last_log_line()}",
            )
        if code != EXIT_PREEMPTED:
            why = "finished as if done" if code == 0 else launch.last_error()
            raise DrillFailed(
                "interruption",
                f"the preempted training exited {code}, not {EXIT_PREEMPTED} (resume me): {why}",
            )
        if any(rank_code != EXIT_PREEMPTED for rank_code in record.rank_exit_codes):
            raise DrillFailed(
                "interruption",
                f"not every rank exited {EXIT_PREEMPTED}: {record.rank_exit_codes}",
            )
        latest = CheckpointStore(self.store_uri).latest()
        if latest is None or latest.kind != "emergency":
            raise DrillFailed(
                "checkpoint", f"no emergency checkpoint was committed (newest: {latest})"
            )
        record.interrupted_at_step = latest.step
        rank0 = launch.result(0)
        if self.options.script is None and rank0.get("step") != latest.step:
            raise DrillFailed(
                "checkpoint",
                f"training stopped at step {rank0.get('step')} but "
                f"the emergency checkpoint is step {latest.step}",
            )
        notified_events = launch.result(notified).get("events", {})
        events = rank0.get("events", {})
        timeline = [
            ("notice served by IMDS", served),
            ("agent detected it", notice.noticed_at.timestamp()),
        ]
        if "stop_requested" in notified_events:
            timeline.append(
                (f"rank {notified} got the stop request", notified_events["stop_requested"])
            )
        for key, label in (
            ("save_started", "emergency save started"),
            ("save_committed", "checkpoint committed"),
        ):
            if key in events:
                timeline.append((label, events[key]))
        timeline.append((f"process exited with {EXIT_PREEMPTED}", exited))
        record.timeline = [(label, at - served) for label, at in timeline]
        deadline = notice.deadline.timestamp() if notice.deadline else served + SPOT_NOTICE_SECONDS
        record.margin = deadline - exited
        self._previous = (record, served)
        return record

    def _newest_step(self) -> int | None:
        latest = CheckpointStore(self.store_uri).latest()
        return latest.step if latest else None

    def final(self) -> None:
        resumes_from = self._newest_step()
        with self._nodes("final") as nodes:
            self.say(f"replacement instance: resuming from step {resumes_from}")
            launch = self._launch("replacement", hooks=True, nodes=nodes, store=self.store_uri)
            code = self._wait_exit(launch, "replacement")
            finished_at = time.time()
        self.report.exit_codes.append(code)
        if code != 0:
            raise DrillFailed("resume", f"the replacement run exited {code}: {launch.last_error()}")
        self.report.final_sha256 = self._digest(launch)
        self.report.final_step = launch.result(0).get("step")
        self._relaunched(launch, resumes_from, finished_at)

    def _relaunched(
        self, launch: Launch, resumes_from: int | None, finished_at: float | None = None
    ) -> None:
        """After a launch that replaced a preempted one: which step it resumed at, and when.

        A script does not report its resume step; it resumes from the newest verified
        checkpoint by contract (and the weights comparison shows whether it did).
        """
        if self._previous is None:
            return
        record, served = self._previous
        self._previous = None
        rank0 = launch.result(0)
        record.resumed_at_step = rank0.get("resumed_from", resumes_from)
        record.timeline.append(("replacement launched", launch.started_at - served))
        if rank0.get("first_step_at"):
            record.timeline.append(("first resumed step done", rank0["first_step_at"] - served))
        if finished_at is not None:
            record.timeline.append(("training finished (exit 0)", finished_at - served))
        if record.resumed_at_step != record.interrupted_at_step:
            raise DrillFailed(
                "resume",
                f"interrupted at step {record.interrupted_at_step} but "
                f"resumed at step {record.resumed_at_step}",
            )

    def run(self) -> None:
        started = time.monotonic()
        store = self.check_store()
        try:
            self.reference()
            previous = 0
            for number in range(self.options.interruptions):
                # Each launch after the first is the replacement of the one before.
                record = self.interrupt(number, previous)
                previous = record.interrupted_at_step or previous
            self.final()
            self.compare()
        finally:
            self.report.seconds = time.monotonic() - started
            for launch in self._launched:  # whatever failed, no training outlives the drill
                launch.kill()
            with suppress(CheckpointError):  # the drill's own prefix; a failure to tidy is moot
                for used in (store, CheckpointStore(f"{self.store_uri}/reference")):
                    for manifest in used.list():
                        used.delete(manifest.step)

    def compare(self) -> None:
        reference, final = self.report.reference_sha256, self.report.final_sha256
        if reference is None or final is None:
            self.report.bit_exact = None
            self.say("final weights not compared: the script writes no SPOTGUARD_DRILL_OUTPUT")
            return
        self.report.bit_exact = reference == final
        if not self.report.bit_exact:
            raise DrillFailed(
                "bit-exact", "the resumed run's final weights differ from the uninterrupted run's"
            )


def run_drill(options: DrillOptions, say: Callable[[str], None] = lambda line: None) -> DrillReport:
    """Run the whole drill; the report says whether every step held and, if not, which."""
    with tempfile.TemporaryDirectory(prefix="spotguard-drill-") as name:
        drill = _Drill(options, Path(name), say)
        try:
            drill.run()
            drill.report.passed = True
        except DrillFailed as exc:
            drill.report.failed_step, drill.report.failure = exc.step, str(exc)
        return drill.report
