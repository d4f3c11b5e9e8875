"""The machinery shared by SpotGuard (plain PyTorch) and SpotCheckpoint (Lightning).

* **Stop requests** come from a signal (SIGUSR1 from the agent, SIGTERM from the OS), from the
  agent's notice file (the only channel inside a container), or from a rebalance notice (an
  early periodic save, training goes on). Signal handlers only set a flag: no I/O, no
  collective, no save inside a handler; the save happens at the next step boundary.
* **Saving** copies the state into reused CPU buffers at a step boundary (the only stall) and
  serializes, checksums and uploads it in one background thread. One save is in flight at a
  time: a periodic save that comes due meanwhile is deferred to the first step boundary after
  the running one finished. A failed background save is logged at once and raised at the next
  save or at exit.
* **Emergencies** honour the deadline: wait for an in-flight save while that leaves time,
  estimate from measured throughput whether the emergency save fits, save (or keep the last
  verified checkpoint and say so), then leave with exit code 75.
* **Several ranks** (``torch.distributed``): one small all-reduce per step boundary decides,
  for all ranks at once, whether to stop, to save, and whether an upload is still running or
  failed; any rank notified means every rank stops after the same step. Each rank puts its own
  file (rank 0 the whole, replicated state; the others their RNG streams) and, once every rank
  is done, rank 0 commits the manifest with the entries gathered from all.
* **Registration** with the agent: ``<state_dir>/targets/<pid>.json`` while running, an exit
  record when leaving.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import psutil
import torch

from spotguard.agent.errors import ProtocolError
from spotguard.agent.protocol import (
    ALLOWED_SIGNALS,
    ExitRecord,
    Notice,
    Registration,
    read_notice,
    register,
    state_dir_from_env,
    unregister,
    write_exit_record,
)
from spotguard.trainer_hooks._internals.manifest import FileEntry
from spotguard.trainer_hooks._internals.snapshot import Snapshotter, tree_nbytes
from spotguard.trainer_hooks.errors import UploadFailed
from spotguard.trainer_hooks.store import CheckpointStore, TransferSettings

log = logging.getLogger("spotguard.trainer_hooks")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "preempted, resume me"


class Preempted(SystemExit):
    """Raised after the emergency checkpoint: the process exits 75 unless someone catches it."""

    def __init__(self, step: int, saved: bool, code: int = EXIT_PREEMPTED) -> None:
        super().__init__(code)
        self.step, self.saved = step, saved


@dataclass(frozen=True)
class GuardSettings:
    """Settings shared by both front ends; every value is validated here, once."""

    uri: str
    every_n_steps: int | None = None
    every_seconds: float | None = None
    keep_last: int | None = 3
    state_dir: Path | None = None
    signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM")
    exit_code: int = EXIT_PREEMPTED
    #: Seconds assumed left after a stop request that came with no notice (a bare SIGTERM).
    default_budget: float = 30.0
    #: Seconds kept free before the deadline: the process must still exit after the save.
    safety_margin: float = 5.0
    notice_poll_interval: float = 0.5
    #: Poll IMDS in-process (spot notice and rebalance) when no agent runs on the node.
    imds_endpoint: str | None = None
    imds_poll_interval: float = 1.0
    transfer: TransferSettings | None = None

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.every_seconds is not None and self.every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0, got {self.every_seconds}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {self.keep_last}")
        for name in self.signals:
            if name not in ALLOWED_SIGNALS:
                raise ValueError(f"signals: {name!r} cannot be handled for a clean save")
        if not 1 <= self.exit_code <= 255 or self.exit_code == 0:
            raise ValueError(f"exit_code must be 1..255, got {self.exit_code}")
        for name in (
            "default_budget",
            "safety_margin",
            "notice_poll_interval",
            "imds_poll_interval",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


class Ranks:
    """The ranks of a ``torch.distributed`` job, or a single process: the same small API.

    Collectives run in the training thread only, at step boundaries: never in a signal
    handler and never in the upload thread (they would interleave with DDP's own).
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        nccl = self.active and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over all ranks."""
        if not self.active:
            return flags
        import torch.distributed as dist

        tensor = torch.tensor([int(flag) for flag in flags], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tuple(bool(value) for value in tensor.tolist())

    def gather(self, item: Any) -> list[Any]:
        if not self.active:
            return [item]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, item)
        return gathered


class GuardCore:
    """One per process. Front ends call :meth:`install`, :meth:`at_step_boundary` and
    :meth:`close`; the state itself is theirs (``state_fn`` builds the tree to save)."""

    def __init__(self, settings: GuardSettings, *, file_name: str = "state.pt") -> None:
        self.settings = settings
        self.file_name = file_name
        self.store = CheckpointStore(settings.uri, transfer=settings.transfer)
        self.state_dir = settings.state_dir or state_dir_from_env()
        self._stop_reason: str | None = None
        self._early_save = False
        self._previous_handlers: dict[int, Any] = {}
        self._watchers: list[threading.Thread] = []
        self._notice_deadline: datetime | None = None
        self._closing = threading.Event()
        self._registered = False
        self._create_time = psutil.Process().create_time()
        self._snapshots = Snapshotter()
        self._worker: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.failed_saves = 0
        self._throughput: float | None = None  # bytes per second, serialize + upload
        self._last_save_step = -1
        self._last_save_time = time.monotonic()
        #: A save whose file this rank has put but that is not committed yet.
        self._pending: tuple[int, int, str, FileEntry] | None = None
        self.last_committed_step: int | None = None
        self.ranks = Ranks()
        #: Wall-clock times (``time.time()``) of the preemption path on this rank, for logs
        #: and drills: ``stop_requested``, ``save_started``, ``save_committed``, ``exiting``.
        self.events: dict[str, float] = {}

    # -- set-up and tear-down -------------------------------------------------------------

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for name in self.settings.signals:
                signum = signal.Signals[name]
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        else:
            log.warning("not in the main thread: signals cannot be handled, relying on notices")
        if self.state_dir.is_dir():
            signal_name = self.settings.signals[0] if self.settings.signals else "SIGUSR1"
            register(
                self.state_dir,
                Registration(os.getpid(), self._create_time, signal_name, self.ranks.rank),
            )
            self._registered = True
        self._closing.clear()
        self._watchers = [
            threading.Thread(target=self._watch_notice, name="spotguard-notice", daemon=True)
        ]
        if self.settings.imds_endpoint:
            self._watchers.append(
                threading.Thread(
                    target=self._watch_imds,
                    args=(self.settings.imds_endpoint,),
                    name="spotguard-imds",
                    daemon=True,
                )
            )
        for watcher in self._watchers:
            watcher.start()
        # Our threads must be gone before the interpreter finalizes: a daemon thread that
        # wakes up then is ended with pthread_exit, and unwinding through torch's C++ frame
        # evaluator aborts the process ("terminate called without an active exception").
        atexit.register(self._stop_threads)

    def reinstall_signal_handlers(self) -> None:
        """Take the signals back from a framework that replaced our handlers."""
        if threading.current_thread() is threading.main_thread():
            for name in self.settings.signals:
                signal.signal(signal.Signals[name], self._on_signal)

    def _stop_threads(self) -> None:
        self._closing.set()
        for watcher in self._watchers:
            watcher.join()
        self._watchers = []
        if self._worker is not None:
            self._worker.join()

    def close(self, exit_code: int | None = None) -> None:
        self._stop_threads()
        atexit.unregister(self._stop_threads)
        for signum, handler in self._previous_handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous_handlers.clear()
        if self._registered:
            if exit_code is not None:
                record = ExitRecord(
                    os.getpid(), self._create_time, exit_code, datetime.now(timezone.utc)
                )
                write_exit_record(self.state_dir, record)
            unregister(self.state_dir, os.getpid())
            self._registered = False

    # -- stop requests --------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the save happens at the next step boundary, never in a handler, and a
        # second signal during the save changes nothing.
        self.request_stop(signal.Signals(signum).name)

    def request_stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self.events.setdefault("stop_requested", time.time())
            self._stop_reason = reason

    @property
    def stop_requested(self) -> bool:
        return self._stop_reason is not None

    def _watch_notice(self) -> None:
        path = self.state_dir / "notice.json"
        seen: tuple[int, int] | None = None
        while not self._closing.wait(self.settings.notice_poll_interval):
            try:
                stat = path.stat()
            except OSError:
                continue
            if (stat.st_mtime_ns, stat.st_size) == seen:
                continue
            seen = (stat.st_mtime_ns, stat.st_size)
            try:
                notice = read_notice(self.state_dir)
            except ProtocolError as exc:
                log.warning("ignoring unreadable notice file: %s", exc)
                continue
            if notice is not None:
                self._on_notice(notice, "notice file")

    def _watch_imds(self, endpoint: str) -> None:
        """Poll IMDS from the training process itself, for nodes where no agent runs."""
        from spotguard.agent.errors import ImdsError
        from spotguard.agent.imds import ImdsClient
        from spotguard.agent.watches import evaluate_rebalance, evaluate_spot_action

        watches = (
            ("latest/meta-data/spot/instance-action", evaluate_spot_action),
            ("latest/meta-data/events/recommendations/rebalance", evaluate_rebalance),
        )
        client = ImdsClient(endpoint, timeout=1.0)
        failures = 0
        try:
            while not self._closing.wait(self.settings.imds_poll_interval):
                for path, evaluate in watches:
                    try:
                        notice = evaluate(client.get(path), datetime.now(timezone.utc))
                    except ImdsError as exc:
                        failures += 1
                        if failures in (1, 60) or failures % 600 == 0:  # not one line a poll
                            log.warning("IMDS gave no usable answer (%d times): %s", failures, exc)
                        break
                    failures = 0
                    if notice is not None:
                        self._on_notice(notice, "IMDS")
        finally:
            client.close()

    def _on_notice(self, notice: Notice, source: str) -> None:
        if notice.signals_targets:
            if notice.deadline is not None:
                self._notice_deadline = notice.deadline
            if self._stop_reason is None:
                log.warning("%s says %s: stopping at the next step", source, notice.kind)
            self.request_stop(f"{source}:{notice.kind}")
        elif not self._early_save:
            log.info("rebalance recommendation: checkpointing early, training goes on")
            self._early_save = True

    def _deadline_seconds_left(self) -> float:
        """Seconds until the instance goes away, from the notice when there is one."""
        try:
            notice = read_notice(self.state_dir)
        except ProtocolError:
            notice = None
        deadline = self._notice_deadline
        if notice is not None and notice.deadline is not None and notice.signals_targets:
            deadline = notice.deadline  # the agent writes it before it signals
        if deadline is not None:
            return (deadline - datetime.now(timezone.utc)).total_seconds()
        return self.settings.default_budget

    # -- saving ---------------------------------------------------------------------------

    @property
    def my_file(self) -> str:
        """Rank 0 writes the whole state; every other rank only what is its own (RNG)."""
        return self.file_name if self.ranks.rank == 0 else f"rank-{self.ranks.rank}.pt"

    def _periodic_due(self, step: int) -> bool:
        if step <= self._last_save_step:
            return False
        if self._early_save:
            return True
        settings = self.settings
        if settings.every_n_steps and step % settings.every_n_steps == 0:
            return True
        return bool(
            settings.every_seconds
            and time.monotonic() - self._last_save_time >= settings.every_seconds
        )

    @property
    def saving(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def raise_if_failed(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise UploadFailed(f"a background checkpoint save failed: {failure}") from failure

    def at_step_boundary(self, step: int, epoch: int, tree_fn: Callable[[], Any]) -> None:
        """Everything that happens between two steps; the same call on every rank.

        One small all-reduce agrees on whether any rank must stop, wants a save (time-based
        and rebalance saves differ per node), is still uploading, or failed; with one rank
        there is no collective at all.
        """
        stop, want_save, busy, failed = self.ranks.any(
            self.stop_requested, self._periodic_due(step), self.saving, self._failure is not None
        )
        if failed:
            self._pending = None
            if self._failure is None:
                self._failure = UploadFailed("a checkpoint save failed on another rank")
            self.raise_if_failed()
        if self._pending is not None and not busy:
            self._commit_pending()
        if stop:
            self.request_stop("another rank was notified")
            self.emergency(step, epoch, tree_fn)
        if want_save and not busy:
            self._save_async(step, epoch, tree_fn())

    def _save_async(self, step: int, epoch: int, tree: Any) -> None:
        started = time.monotonic()
        snapshot = self._snapshots.copy(tree)
        log.debug("snapshot of step %d took %.3f s", step, time.monotonic() - started)
        self._last_save_step, self._last_save_time = step, started
        self._early_save = False
        self._worker = threading.Thread(
            target=self._background_put, args=(step, epoch, snapshot), name="spotguard-save",
            daemon=True,
        )  # fmt: skip
        self._worker.start()

    def _background_put(self, step: int, epoch: int, snapshot: Any) -> None:
        try:
            entry = self._put(step, snapshot)
        except BaseException as exc:  # surfaced at the next step boundary or at exit
            self.failed_saves += 1
            self._failure = exc
            log.error("checkpoint save at step %d failed: %s", step, exc)
            return
        self._pending = (step, epoch, "periodic", entry)
        if not self.ranks.active:  # nobody to wait for: commit from here
            self._commit_pending()

    def _put(self, step: int, tree: Any) -> FileEntry:
        started = time.monotonic()
        entry = self.store.put(
            step,
            self.my_file,
            lambda handle: torch.save(tree, handle),
            size_hint=tree_nbytes(tree),
        )
        rate = entry.size / max(time.monotonic() - started, 1e-6)
        self._throughput = rate if self._throughput is None else 0.5 * (self._throughput + rate)
        return entry

    def _commit_pending(self, *, prune: bool = True) -> None:
        """Commit the save whose files every rank has put (collective with several ranks)."""
        assert self._pending is not None
        step, epoch, kind, entry = self._pending
        self._pending = None
        entries = self.ranks.gather((self.my_file, entry))
        if self.ranks.rank == 0:  # rank 0 owns the manifest
            files = dict(entries)
            self.store.commit(step, files, epoch=epoch, kind=kind)
            log.info("checkpoint %s at step %d committed (%d bytes)", kind, step,
                     sum(e.size for e in files.values()))  # fmt: skip
            if prune and self.settings.keep_last:
                self.store.prune(self.settings.keep_last)
        self.last_committed_step = step

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the upload in flight; ``True`` when none is left running."""
        if self._worker is not None:
            self._worker.join(timeout)
        return not self.saving

    def save_sync(self, step: int, epoch: int, tree: Any, kind: str) -> None:
        """Save in the foreground on every rank (the final checkpoint)."""
        self.wait()
        self.ranks.any(False)  # every rank finished its upload before anyone commits
        if self._pending is not None:
            self._commit_pending()
        self.raise_if_failed()
        if self.last_committed_step == step:
            return  # e.g. a final save right after a periodic one at the same step
        self._last_save_step = step
        self._pending = (step, epoch, kind, self._put(step, tree))
        self._commit_pending()

    # -- the emergency ----------------------------------------------------------------------

    def emergency(self, step: int, epoch: int, tree_fn: Callable[[], Any]) -> NoReturn:
        """Save within the notice window if it fits, then raise :class:`Preempted`.

        Called at the same step on every rank; every decision below is agreed on by all.
        """
        self.events["save_started"] = time.time()
        left = self._deadline_seconds_left() - self.settings.safety_margin
        log.warning("stop requested (%s) at step %d; %.1f s left before the deadline",
                    self._stop_reason or "request", step, left)  # fmt: skip
        started = time.monotonic()
        if self.saving and not self.wait(max(left / 2, 0.0)):
            log.warning("the periodic save in flight did not finish in time; saving anyway")
        (busy,) = self.ranks.any(self.saving)
        if self._pending is not None and not busy:
            self._commit_pending(prune=False)  # a finished periodic save: keep it as fallback
        if self._failure is not None:
            log.error("an earlier background save had failed: %s", self._failure)
            self._failure = None
        left -= time.monotonic() - started
        saved = self.last_committed_step == step
        if saved:
            log.warning("step %d is already checkpointed; nothing more to save", step)
        else:
            tree = tree_fn()
            estimate = tree_nbytes(tree) / self._throughput if self._throughput else None
            (too_slow,) = self.ranks.any(estimate is not None and estimate > left)
            if too_slow:
                log.error(
                    "emergency save would take ~%.1f s but only %.1f s are left: keeping the "
                    "last verified checkpoint (step %s)", estimate or 0.0, left,
                    self.last_committed_step,
                )  # fmt: skip
            else:
                saved = self._emergency_put_and_commit(step, epoch, tree)
        if saved:
            self.events["save_committed"] = time.time()
        self.events["exiting"] = time.time()
        self.close(exit_code=self.settings.exit_code)
        raise Preempted(step, saved, self.settings.exit_code)

    def _emergency_put_and_commit(self, step: int, epoch: int, tree: Any) -> bool:
        try:
            entry: FileEntry | None = self._put(step, tree)
        except Exception as exc:
            log.error("emergency save at step %d failed: %s", step, exc)
            entry = None
        (failed,) = self.ranks.any(entry is None)
        if failed or entry is None:
            return False
        # Not pruning: a periodic save may still be uploading into its directory.
        self._pending = (step, epoch, "emergency", entry)
        self._commit_pending(prune=False)
        return True
