"""``spotguard drill --nodes N``: a torchrun elastic job over N rehearsed nodes loses one.

Every node is what an instance of the fleet runs: its own IMDS simulator and real agent
(:class:`~spotguard.drill._node.Node`), its own state dir, and torch's real elastic launcher
(``torchrun --nnodes MIN:N --rdzv-backend c10d``) with one worker
(:mod:`~spotguard.drill.elastic_workload`). They meet at a rendezvous store
(``spotguard rendezvous-store``), as the fleet's nodes meet at its rendezvous host's.

The drill runs the job once uninterrupted (the reference), then again: it serves a spot
interruption to the node that holds rank 0 (the one whose address every worker's process group
uses), lets the real path happen (its agent signals, every rank stops after the same step and
commits one emergency checkpoint, its workers exit 75 and its torchrun agent is stopped so it
neither restarts them nor rejoins), then terminates that node as EC2 would and starts a fresh
replacement: 5 s later when the survivors cannot train without it, or once they have resumed
without it. The survivors' launchers restart their workers and re-form the group (with the
replacement, or at the smaller world size and then again when the replacement joins), and
the job resumes from the emergency checkpoint. Checked: every rank stopped at the same step, every
resume restored the state that was saved (digests), and when the world size never changed,
the final weights equal the reference's bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from spotguard.drill._node import Node
from spotguard.drill.elastic_report import ElasticReport
from spotguard.drill.options import DrillOptions, WorkloadRun
from spotguard.errors import CheckpointError, DrillFailed
from spotguard.protocol import STATE_DIR_ENV
from spotguard.trainer_hooks import CheckpointStore

__all__ = ["run_elastic_drill"]

#: Optimizer steps of the job, whatever the world size, and the periodic checkpoint interval.
STEPS, EVERY = 160, 20
#: Seconds each step sleeps (the job's own pace, not ``DrillOptions.step_time``): the notice
#: must land mid-run, a few polls before the job's end.
STEP_TIME = 0.1
#: The notice is served once the job has trained this many steps.
NOTICE_AT_STEP = 30
#: Seconds between the node's termination and its replacement's start when ``min_nodes`` is
#: all of them (a late replacement: the survivors wait for it); with fewer, the replacement
#: starts once the survivors have resumed without it.
REPLACEMENT_DELAY = 5.0
#: torchrun's rendezvous settings: a node silent for ``keep_alive_interval`` x
#: ``keep_alive_max_attempt`` seconds is dead; a round closes ``last_call_timeout`` seconds
#: after it has its minimum.
RDZV_CONF = "is_host=false,join_timeout=300,last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3"  # noqa: E501


@dataclass
class _Instance:
    """One rehearsed node of the job: simulator + agent, and its torchrun."""

    name: str
    node: Node | None
    launcher: subprocess.Popen[bytes]
    log: Path
    started_at: float
    events: list[tuple[float, str]] = field(default_factory=list)

    def terminate(self) -> None:
        """What EC2 does at the end of the notice: everything on the instance is gone. Its
        processes are collected before any is killed (torchrun starts its workers in sessions
        of their own; once torchrun is gone they would be orphans nobody finds); a torchrun
        already reaped is not signalled (its pid may be another process's by now)."""
        if self.launcher.returncode is None:
            with suppress(psutil.Error):
                doomed = psutil.Process(self.launcher.pid).children(recursive=True)
                for process in doomed:
                    with suppress(psutil.Error):
                        process.kill()
            with suppress(ProcessLookupError):
                os.killpg(self.launcher.pid, signal.SIGKILL)
            self.launcher.wait()
        for process in psutil.process_iter(["cmdline"]):  # a worker's thaw script (.launcher)
            argv = process.info["cmdline"] or []
            if any(arg.endswith("thaw.py") for arg in argv) and str(self.launcher.pid) in argv:
                with suppress(psutil.Error):
                    process.kill()
        if self.node is not None:
            self.node.stop()


def _workers_of(launcher: int, *, live_only: bool = True) -> list[psutil.Process]:
    try:
        children = psutil.Process(launcher).children()
    except psutil.Error:
        return []
    found = []
    for child in children:
        with suppress(psutil.Error):
            if not live_only or child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
    return found


class _ElasticDrill:
    def __init__(self, options: DrillOptions, folder: Path, say: Callable[[str], None]) -> None:
        self.options, self.folder, self.say = options, folder, say
        self.min_nodes = options.min_nodes or options.nodes
        # The very command the fleet's rendezvous host runs.
        self.rdzv = subprocess.Popen(
            [sys.executable, "-m", "spotguard", "rendezvous-store", "--host", "127.0.0.1",
             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert self.rdzv.stdout is not None
        served = self.rdzv.stdout.readline().strip()
        if " serving " not in served:
            self.rdzv.wait(30)
            raise DrillFailed("rendezvous", f"the rendezvous store did not start: {served}")
        self.rdzv_port = int(served.rsplit(":", 1)[1])
        self.instances: list[_Instance] = []
        self.launched = 0

    def _launch(self, results: Path, store: str, run_id: str, *, agent: bool) -> _Instance:
        name = f"node-{self.launched}"
        self.launched += 1
        folder = self.folder / run_id / name
        node = Node(name, folder, poll_interval=self.options.poll_interval) if agent else None
        if node is not None:
            node.wait_ready()
        folder.mkdir(parents=True, exist_ok=True)
        state_dir = node.state_dir if node is not None else folder / "no-agent"
        env = {**os.environ, STATE_DIR_ENV: str(state_dir), "SPOTGUARD_DRILL_NODE": name,
               # Each round's rank 0 hosts its workers' store: never the first node for good
               # (torch's default), which breaks the job once that node is gone.
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # fmt: skip
        run = WorkloadRun(replace(self.options, step_time=STEP_TIME), results, store,
                          steps=STEPS, every=EVERY)  # fmt: skip
        log = folder / "torchrun.log"
        with log.open("w") as handle:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run",
                 "--nnodes", f"{self.min_nodes}:{self.options.nodes}", "--nproc-per-node", "1",
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.rdzv_port}",
                 "--rdzv-id", run_id, "--rdzv-conf", RDZV_CONF, "--max-restarts", "3",
                 "--monitor-interval", "0.5", "-m", "spotguard.drill.elastic_workload",
                 run.to_json()],
                env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        instance = _Instance(name, node, launcher, log, time.time())
        instance.events.append((instance.started_at, "node started"))
        self.instances.append(instance)
        return instance

    def _wait(self, condition: Callable[[], Any], what: str, timeout: float) -> Any:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            found = condition()
            if found:
                return found
            for instance in self.instances:
                code = instance.launcher.poll()
                if code not in (None, 0, -signal.SIGKILL):
                    raise DrillFailed(
                        "launch", f"torchrun on {instance.name} exited with {code} while "
                        f"waiting for {what}: {_last_line(instance.log)}")  # fmt: skip
            time.sleep(0.1)
        raise DrillFailed("launch", f"no {what} within {timeout:.0f} s")

    def _finish(self, what: str) -> None:
        """Wait for every launcher still running to end the job (exit 0)."""
        running = [i for i in self.instances if i.launcher.returncode is None]
        self._wait(lambda: all(i.launcher.poll() is not None for i in running), what,
                   self.options.launch_timeout)  # fmt: skip
        for instance in running:
            if instance.launcher.returncode != 0:
                raise DrillFailed(
                    "launch",
                    f"torchrun on {instance.name} ended with "
                    f"{instance.launcher.returncode}: {_last_line(instance.log)}",
                )

    def reference(self, store: str) -> str:
        self.say(f"reference: {self.options.nodes} nodes, {STEPS} steps, uninterrupted")
        results = self.folder / "reference-results"
        for _ in range(self.options.nodes):
            self._launch(results, store, "reference", agent=False)
        self._finish("the reference job's end")
        final = [r.get("final") for r in _results(results) if r.get("final")]
        if len(final) != 1:
            raise DrillFailed("reference", f"the reference left {len(final)} final digests")
        self.instances.clear()
        return str(final[0])

    def interrupted(self, report: ElasticReport) -> None:
        results = self.folder / "results"
        store = report.store
        self.launched = 0
        for _ in range(self.options.nodes):
            self._launch(results, store, "drill", agent=True)
        self._wait(lambda: _progress(results) >= NOTICE_AT_STEP, f"step {NOTICE_AT_STEP}",
                   self.options.launch_timeout)  # fmt: skip
        target = self._rank0_instance(results)
        assert target.node is not None
        served = target.node.interrupt()
        report.notice_at, report.notified = served, target.name
        target.events.append((served, "spot interruption notice served (holds rank 0)"))
        self.say(f"notice served to {target.name} (it holds rank 0)")
        # Its workers save with every rank and leave; its torchrun agent is stopped.
        self._wait(lambda: not _workers_of(target.launcher.pid), "the notified node's workers "
                   "to leave", self.options.launch_timeout)  # fmt: skip
        if target.launcher.poll() is not None:
            raise DrillFailed(
                "interruption",
                f"torchrun on {target.name} ended (code "
                f"{target.launcher.returncode}) before the notice stopped it",
            )
        stopped = psutil.Process(target.launcher.pid).status() == psutil.STATUS_STOPPED
        target.events.append((time.time(), "workers left; torchrun agent " +
                              ("stopped" if stopped else "NOT stopped")))  # fmt: skip
        report.launcher_stopped = stopped
        target.terminate()
        target.events.append((time.time(), "instance terminated"))
        if self.min_nodes < self.options.nodes:  # the survivors go on without it first
            stop = max(int(r["step"]) for r in _results(results) if r.get("outcome"))
            self._wait(lambda: _progress(results) > stop, "the survivors' first resumed step",
                       self.options.launch_timeout)  # fmt: skip
            self.say(f"{target.name} terminated; the survivors resumed; replacement now")
        else:
            self.say(f"{target.name} terminated; replacement in {REPLACEMENT_DELAY:.0f} s")
            time.sleep(REPLACEMENT_DELAY)
        replacement = self._launch(results, store, "drill", agent=True)
        replacement.events.append((replacement.started_at, "replacement node started"))
        self._finish("the interrupted job's end")
        report.collect(_results(results), self.instances)

    def _rank0_instance(self, results: Path) -> _Instance:
        def found() -> _Instance | None:
            for result in _results(results):
                if result.get("rank") == 0:
                    return next(i for i in self.instances if i.name == result["node"])
            return None

        instance: _Instance = self._wait(found, "rank 0's start", 30)
        return instance

    def close(self) -> None:
        for instance in self.instances:
            instance.terminate()
        self.rdzv.terminate()
        self.rdzv.wait(30)


def _results(folder: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(folder.glob("*-attempt-*-rank-*-pid-*.json")):
        with suppress(OSError, ValueError):
            found.append(json.loads(path.read_text()))
    return found


def _progress(folder: Path) -> int:
    with suppress(OSError, ValueError, IndexError):
        return int((folder / "progress").read_text().split()[-1])
    return 0


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def run_elastic_drill(
    options: DrillOptions, say: Callable[[str], None] = lambda line: None
) -> ElasticReport:
    """Rehearse losing one node of an ``options.nodes``-node torchrun job; never raises for
    a failed step (the report says which and why)."""
    with tempfile.TemporaryDirectory(prefix="spotguard-drill-nodes-") as scratch:
        folder = Path(scratch)
        store = options.store or str(folder / "store")
        prefix = f"{store.rstrip('/')}/spotguard-drill-{int(time.time())}"
        report = ElasticReport(options.nodes, options.min_nodes or options.nodes, prefix)
        drill: _ElasticDrill | None = None
        try:
            drill = _ElasticDrill(options, folder, say)
            report.reference = drill.reference(f"{prefix}/reference")
            drill.interrupted(report)
        except DrillFailed as exc:
            report.fail(exc.step, str(exc))
        finally:
            if drill is not None:
                drill.close()
            with suppress(CheckpointError):  # the drill's own prefix; a failure to tidy is moot
                for used in (CheckpointStore(prefix), CheckpointStore(f"{prefix}/reference")):
                    for manifest in used.list():
                        used.delete(manifest.step)
        report.judge()
        return report
