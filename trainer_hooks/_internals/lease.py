"""One writer per prefix: a lease with a heartbeat, taken and renewed by conditional writes.

The lease is one small object at the store's root, ``writer.lease``::

    {"writer": {"id", "host", "pid", "started_at"}, "renewed_at": <unix time>, "ttl": 60,
     "released": false}

* **Taking it** is a conditional write: create-only-if-absent (S3 ``If-None-Match: *``), or,
  over a lease that was released or has expired, replace-only-if-unchanged (S3 ``If-Match``
  with the ETag read): of two writers racing for it exactly one wins.
* **Holding it**: the holder renews it every ``ttl / 4`` seconds, again only if unchanged; a
  renewal that finds someone else's write means the lease was lost, and from then on this
  writer's commits are refused (:meth:`Lease.check`).
* **Waiting for it**: a new writer (a replacement instance that EC2 started while the
  interrupted one still writes its emergency checkpoint, or a duplicated launch) polls until
  the holder releases it (a clean exit, 75 included) or it expires (the holder's instance is
  gone): ``ttl`` after the last renewal. It then resumes from what the holder committed. It
  waits at most ``wait`` seconds (default: the spot notice plus one ``ttl``) and otherwise
  stops with :class:`~spotguard.errors.WriterConflict` naming the holder.

Expiry is judged from the holder's ``renewed_at`` (wall clock; EC2 instances keep theirs in
sync with the Amazon Time Sync Service): ``ttl`` (60 s by default) is far above any skew.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from spotguard.errors import WriterConflict
from spotguard.trainer_hooks.backends import Backend
from spotguard.trainer_hooks.manifest import Writer

__all__ = ["LEASE_KEY", "Lease"]

LEASE_KEY = "writer.lease"
log = logging.getLogger("spotguard.trainer_hooks")


def _boot_clock() -> float:
    """Seconds on a clock that keeps counting while the machine sleeps (EC2 spot hibernation):
    a monotonic clock stops, and a lease would look fresher than it is."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


class Lease:
    """This process's claim to be the one writer of a store."""

    def __init__(
        self,
        backend: Backend,
        writer: Writer,
        *,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.writer = writer
        self.ttl = ttl
        self._clock = clock
        self._tag: str | None = None
        self._renewed = 0.0  # _boot_clock() when the last successful write was stamped
        self._lost: str | None = None
        #: False when the store was seen ignoring a conditional write (see acquire).
        self.honours_conditions = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back ---------------------------------------------------------

    def _record(self, *, released: bool = False) -> bytes:
        return json.dumps({
            "writer": self.writer.to_json(), "renewed_at": self._clock(), "ttl": self.ttl,
            "released": released,
        }).encode()  # fmt: skip

    def acquire(self, wait: float, poll: float = 1.0) -> None:
        """Take the lease, waiting up to ``wait`` seconds for a live holder to finish."""
        give_up = time.monotonic() + wait
        said = False
        while True:
            current = self.backend.read_tagged(LEASE_KEY)
            try:
                if current is None:
                    self._write(expected=None)
                    self._check_the_store_honours_conditions()
                    return
                data, tag = current
                holder, left = self._judge(data)
                if left <= 0:
                    self._write(expected=tag)
                    if holder:
                        log.warning("took over the writer lease of %s (%s)", holder,
                                    "released" if left == -1 else "expired")  # fmt: skip
                    self._check_the_store_honours_conditions()
                    return
            except WriterConflict:
                # Someone else wrote it between our read and our write: look again, after the
                # same pause and within the same limit as any other wait.
                holder, left = "another writer", self.ttl
            if time.monotonic() >= give_up:
                raise WriterConflict(
                    f"{self.backend.uri}: {holder} holds the writer lease (it expires in "
                    f"{left:.0f} s unless renewed); waited {wait:.0f} s. Two runs on one prefix? "
                    "Give each run a prefix of its own"
                )
            if not said:
                log.warning("another writer, %s, holds %s: waiting for it to finish (at most "
                            "%.0f s)", holder, self.backend.uri, wait)  # fmt: skip
                said = True
            time.sleep(min(poll, max(give_up - time.monotonic(), 0.0)))

    def _check_the_store_honours_conditions(self) -> None:
        """Some S3-compatible servers (s3rver, older MinIO and Ceph releases) ignore
        ``If-None-Match`` / ``If-Match``: there, nothing can keep a second writer out. A
        create-only-if-absent and a replace-only-if-unchanged (with a tag that cannot match)
        over the lease just taken tell; never silently."""
        ignored = []
        for condition, expected in (("If-None-Match", None), ("If-Match", '"0-not-a-tag"')):
            try:
                self.backend.write_tagged(LEASE_KEY, b'{"probe": "conditional"}', expected=expected)
            except WriterConflict:
                continue  # refused, as it must be
            ignored.append(condition)
        if not ignored:
            return
        self.backend.write_small(LEASE_KEY, self._record())  # ours again
        current = self.backend.read_tagged(LEASE_KEY)
        self._tag = current[1] if current is not None else None
        self.honours_conditions = False
        log.warning(
            "%s ignores conditional writes (%s): two writers on this prefix cannot be kept "
            "apart, by the lease or by the commit. Run one job per prefix, or use a store "
            "that supports conditional writes (AWS S3, recent MinIO)",
            self.backend.uri,
            " and ".join(ignored),
        )

    def _judge(self, data: bytes) -> tuple[str, float]:
        """Who holds the lease described by ``data``, and seconds until it may be taken:
        ``-1`` when released, ``0`` when expired or unreadable."""
        try:
            record = json.loads(data)
            holder = Writer.from_json(record["writer"])
            if record.get("released"):
                return holder.describe(), -1
            left = float(record["renewed_at"]) + float(record["ttl"]) - self._clock()
        except (ValueError, KeyError, TypeError):
            return "an unreadable lease", 0
        return holder.describe(), max(left, 0.0)

    def _write(self, *, expected: str | None, released: bool = False) -> None:
        stamped = _boot_clock()  # what others judge the expiry from: before the PUT's retries
        self._tag = self.backend.write_tagged(
            LEASE_KEY, self._record(released=released), expected=expected
        )
        self._renewed = stamped

    def release(self, timeout: float | None = None) -> None:
        """Give the lease back (a waiting writer may take it at once); stops the heartbeat.
        Within ``timeout`` seconds or not at all (the lease then expires by itself); never
        raises: the process is leaving."""
        give_up = None if timeout is None else time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the writer lease renewal is stuck: leaving it to expire")
                return
            self._thread = None
        if self._tag is None or self._lost:
            return
        if give_up is not None and give_up - time.monotonic() < 1.0:
            log.warning("no time left to release the writer lease: it expires by itself")
            return
        try:
            self._write(expected=self._tag, released=True)
        except Exception as exc:
            log.warning("could not release the writer lease (it expires by itself): %s", exc)
        self._tag = None

    # -- holding ------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="spotguard-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._write(expected=self._tag)
            except WriterConflict as exc:
                if self._adopt_own_write():
                    continue
                self._lost = f"another writer took the lease ({exc})"
                log.error("writer lease lost: %s", self._lost)
                return
            except Exception as exc:  # the network, the disk: retried at the next beat
                log.warning("could not renew the writer lease: %s", exc)

    def _adopt_own_write(self) -> bool:
        """After a conflict: whether the lease is still ours (an earlier renewal landed but
        its answer was lost, so our tag was stale); then its tag is taken as ours."""
        try:
            current = self.backend.read_tagged(LEASE_KEY)
            if current is None:
                return False
            record = json.loads(current[0])
            if record["writer"]["id"] != self.writer.id or record.get("released"):
                return False
        except Exception:
            return False
        self._tag = current[1]
        return True

    def check(self) -> None:
        """:class:`WriterConflict` unless this process still holds the lease with time to
        spare: renewed within half its ttl (a commit must not land once someone else may have
        taken over; a later renewal makes it good again), and never lost to another writer."""
        if self._lost is not None:
            raise WriterConflict(f"{self.backend.uri}: writer lease lost: {self._lost}")
        age = _boot_clock() - self._renewed
        if age > self.ttl / 2:
            raise WriterConflict(
                f"{self.backend.uri}: writer lease not renewed for {age:.0f} s (ttl "
                f"{self.ttl:.0f} s): it may be taken over, so nothing is committed"
            )
