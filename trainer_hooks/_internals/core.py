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
    ExitRecord,
    Registration,
    read_notice,
    register,
    state_dir_from_env,
    unregister,
    write_exit_record,
)
from spotguard.trainer_hooks._internals.manifest import Manifest
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
    transfer: TransferSettings | None = None

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.every_seconds is not None and self.every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0, got {self.every_seconds}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {self.keep_last}")
        for name in self.signals:
            if name not in ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP"):
                raise ValueError(f"signals: {name!r} cannot be handled for a clean save")
        if not 1 <= self.exit_code <= 255 or self.exit_code == 0:
            raise ValueError(f"exit_code must be 1..255, got {self.exit_code}")
        for name in ("default_budget", "safety_margin", "notice_poll_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


class GuardCore:
    """One per process. Front ends call :meth:`install`, :meth:`at_step_boundary` and
    :meth:`close`; the state itself is theirs (``state_fn`` builds the tree to save)."""

    def __init__(
        self, settings: GuardSettings, *, rank: int = 0, file_name: str = "state.pt"
    ) -> None:
        self.settings = settings
        self.rank = rank
        self.file_name = file_name
        self.store = CheckpointStore(settings.uri, transfer=settings.transfer)
        self.state_dir = settings.state_dir or state_dir_from_env()
        self._stop_reason: str | None = None
        self._signals_received = 0
        self._early_save = False
        self._deadline: float | None = None  # wall clock, from the notice
        self._previous_handlers: dict[int, Any] = {}
        self._watcher: threading.Thread | None = None
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
        self.last_committed: Manifest | None = None

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
                Registration(os.getpid(), self._create_time, signal_name, self.rank),
            )
            self._registered = True
        self._closing.clear()
        self._watcher = threading.Thread(
            target=self._watch_notice, name="spotguard-notice", daemon=True
        )
        self._watcher.start()
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
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
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
        # Only flags: the save happens at the next step boundary, never in a handler.
        self._signals_received += 1
        if self._stop_reason is None:
            self._stop_reason = signal.Signals(signum).name

    def request_stop(self, reason: str) -> None:
        if self._stop_reason is None:
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
            if notice is None:
                continue
            if notice.signals_targets:
                log.warning("notice file says %s: stopping at the next step", notice.kind)
                self.request_stop(f"notice:{notice.kind}")
            elif not self._early_save:
                log.info("rebalance recommendation: checkpointing early, training goes on")
                self._early_save = True

    def _deadline_seconds_left(self) -> float:
        """Seconds until the instance goes away, from the notice when there is one."""
        try:
            notice = read_notice(self.state_dir)
        except ProtocolError:
            notice = None
        if notice is not None and notice.deadline is not None and notice.signals_targets:
            return (notice.deadline - datetime.now(timezone.utc)).total_seconds()
        return self.settings.default_budget

    # -- saving ---------------------------------------------------------------------------

    def periodic_due(self, step: int) -> bool:
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

    def save_async(self, step: int, epoch: int, tree: Any, kind: str = "periodic") -> bool:
        """Snapshot ``tree`` now and save it in the background; ``False`` if deferred."""
        self.raise_if_failed()
        if self.saving:
            return False  # one in flight: try again at the next step boundary
        started = time.monotonic()
        snapshot = self._snapshots.copy(tree)
        log.debug("snapshot of step %d took %.3f s", step, time.monotonic() - started)
        self._last_save_step, self._last_save_time = step, started
        self._early_save = False
        self._worker = threading.Thread(
            target=self._background_save,
            args=(step, epoch, snapshot, kind),
            name="spotguard-save",
            daemon=True,
        )
        self._worker.start()
        return True

    def _background_save(self, step: int, epoch: int, snapshot: Any, kind: str) -> None:
        try:
            self._save_now(step, epoch, snapshot, kind)
        except BaseException as exc:  # surfaced at the next save or at exit, never lost
            self.failed_saves += 1
            self._failure = exc
            log.error("checkpoint save at step %d failed: %s", step, exc)

    def _save_now(
        self, step: int, epoch: int, tree: Any, kind: str, *, prune: bool = True
    ) -> Manifest:
        if self.last_committed is not None and self.last_committed.step == step:
            return self.last_committed  # e.g. a final save right after a periodic one
        started = time.monotonic()
        manifest = self.store.save(
            step,
            {self.file_name: lambda handle: torch.save(tree, handle)},
            epoch=epoch,
            kind=kind,
        )
        elapsed = max(time.monotonic() - started, 1e-6)
        size = sum(entry.size for entry in manifest.files.values())
        rate = size / elapsed
        self._throughput = rate if self._throughput is None else 0.5 * (self._throughput + rate)
        self.last_committed = manifest
        log.info("checkpoint %s at step %d committed (%d bytes, %.2f s)", kind, step, size, elapsed)
        if prune and self.settings.keep_last:
            self.store.prune(self.settings.keep_last)
        return manifest

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the save in flight; ``True`` when none is left running."""
        if self._worker is not None:
            self._worker.join(timeout)
        return not self.saving

    def save_sync(self, step: int, epoch: int, tree: Any, kind: str) -> Manifest:
        """Save in the foreground (the final checkpoint), after the one in flight."""
        self.wait()
        self.raise_if_failed()
        self._last_save_step = step
        return self._save_now(step, epoch, tree, kind)

    # -- the emergency ----------------------------------------------------------------------

    def emergency(self, step: int, epoch: int, state_fn: Callable[[], Any]) -> NoReturn:
        """Save within the notice window if it fits, then raise :class:`Preempted`."""
        left = self._deadline_seconds_left() - self.settings.safety_margin
        reason = self._stop_reason or "request"
        log.warning("stop requested (%s) at step %d; %.1f s left before the deadline", reason,
                    step, left)  # fmt: skip
        started = time.monotonic()
        if self.saving and not self.wait(max(left / 2, 0.0)):
            log.warning("the periodic save in flight did not finish in time; saving anyway")
        if self._failure is not None:
            log.error("an earlier background save had failed: %s", self._failure)
            self._failure = None
        left -= time.monotonic() - started
        tree = state_fn()
        estimate = tree_nbytes(tree) / self._throughput if self._throughput else None
        saved = False
        if self.last_committed is not None and self.last_committed.step == step:
            log.warning("step %d is already checkpointed; nothing more to save", step)
            saved = True
        elif estimate is not None and estimate > left:
            kept = self.last_committed.step if self.last_committed else None
            log.error(
                "emergency save would take ~%.1f s but only %.1f s are left: keeping the last "
                "verified checkpoint (step %s)", estimate, left, kept,
            )  # fmt: skip
        else:
            try:
                # Not pruning: a periodic save may still be uploading into its directory.
                self._save_now(step, epoch, tree, "emergency", prune=False)
                saved = True
            except Exception as exc:
                log.error("emergency save at step %d failed: %s", step, exc)
        self.close(exit_code=self.settings.exit_code)
        raise Preempted(step, saved, self.settings.exit_code)
