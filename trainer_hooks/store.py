"""CheckpointStore: verified checkpoints in a local directory or under an S3 prefix.

Layout and commit protocol (DESIGN.md)::

    <uri>/ckpt-000000001200/<payload files>
    <uri>/ckpt-000000001200/manifest.json      written last, only if absent: the commit
    <uri>/ckpt-000000001100/quarantined.json   in place of the manifest: failed verification

Payload files are serialized straight into the upload (S3) or a spool file renamed into place
(local) while their SHA-256 is computed; then the manifest is created *only if absent* (S3
``If-None-Match: *``, locally an exclusive link), so of two writers on one prefix exactly one
commits a step, and a writer that finds a newer checkpoint of another writer stops
(:class:`~spotguard.errors.WriterConflict`). A commit is read back before it counts (sizes and
the manifest; the first periodic commit of a store in full), so a store that keeps other bytes
than it was sent is caught at the first save, not at the next resume.

Reading walks the checkpoints newest first and reads one manifest in the common case, however
long the history. :meth:`resume` is the writer's way back in: a checkpoint that fails
verification (an unreadable manifest, a missing or resized file, a wrong checksum) is
*quarantined*: its manifest is replaced by
``quarantined.json`` with the reason, so it never counts as newest again, never takes a slot
of the retention, and stays for inspection (``spotguard ckpt list``) until ``ckpt prune
--quarantined`` removes it. When the store holds checkpoint data and nothing verifies,
:meth:`resume` raises :class:`~spotguard.errors.ResumeRefused` instead of reporting an empty
store, on every later attempt too. Loading uses ``torch.load(weights_only=True)``: a store is
data, not trusted code.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, BinaryIO

from spotguard.errors import (
    ConfigError,
    CorruptCheckpoint,
    ResumeRefused,
    StoreError,
    WriterConflict,
)
from spotguard.protocol import MANIFEST_NAME, format_time, parse_step_dir, step_dir
from spotguard.trainer_hooks._internals.lease import Lease
from spotguard.trainer_hooks._internals.readback import read_back, read_back_payload
from spotguard.trainer_hooks._internals.reader import StoreReader
from spotguard.trainer_hooks._internals.streams import HashingWriter
from spotguard.trainer_hooks.backends import Backend, Sink, backend_for_uri
from spotguard.trainer_hooks.manifest import (
    QUARANTINE_NAME,
    WHOLE_STATE_FILE,
    FileEntry,
    Manifest,
    Writer,
    check_name,
)
from spotguard.trainer_hooks.settings import TransferSettings

__all__ = ["CheckpointStore", "Payload", "TransferSettings"]

log = logging.getLogger(__name__)

#: A payload file: raw bytes, or a function that writes the file to a binary stream
#: (``lambda f: torch.save(state, f)``).
Payload = bytes | Callable[[BinaryIO], None]


def _this_writer() -> Writer:
    import psutil

    return Writer(
        id=uuid.uuid4().hex,
        host=socket.gethostname(),
        pid=os.getpid(),
        started_at=psutil.Process().create_time(),
    )


class CheckpointStore(StoreReader):
    """List, save, verify, load and prune checkpoints under one URI.

    Reading (inherited from the store's read-only side, which changes nothing): ``uri``,
    ``list``, ``latest``, ``walk``, ``get``, ``manifest``, ``fetch``, ``verify``
    (:class:`~spotguard.trainer_hooks.results.VerifyResult`), ``quarantined``
    (:class:`~spotguard.trainer_hooks.results.Quarantined`) and ``load_state``. Writing, here:
    :meth:`resume`, :meth:`save` (or :meth:`put` then :meth:`commit`), :meth:`quarantine`,
    :meth:`delete`, :meth:`prune`, and the writer lease (:meth:`hold`, :meth:`release`).
    """

    def __init__(
        self,
        where: str | Backend,
        *,
        transfer: TransferSettings | None = None,
        s3_client: Any = None,
    ) -> None:
        """``where`` is a URI (a local path, ``file:///path``, ``s3://bucket/prefix``) or a
        :mod:`~spotguard.trainer_hooks.backends` object; ``transfer`` and ``s3_client`` apply
        to an ``s3://`` URI (a client of your own: other credentials, endpoint or retries)."""
        super().__init__(
            backend_for_uri(where, transfer, s3_client) if isinstance(where, str) else where
        )
        #: This process's identity in the manifests it commits.
        self.writer = _this_writer()
        #: The writer lease, while this store holds it (:meth:`hold`): commits check it.
        self.lease: Lease | None = None

    def hold(self, *, ttl: float, wait: float) -> None:
        """Become the one writer of this prefix: take the writer lease (waiting up to ``wait``
        seconds for a live holder to finish) and keep renewing it until :meth:`release`."""
        lease = Lease(self._backend, self.writer, ttl=ttl)
        lease.acquire(wait)
        lease.start_heartbeat()
        self.lease = lease

    def release(self, timeout: float | None = None) -> None:
        """Give the writer lease back, within ``timeout`` seconds or not at all (it then
        expires by itself): a waiting writer may take over at once. Never raises."""
        if self.lease is not None:
            self.lease.release(timeout)
            self.lease = None

    def __repr__(self) -> str:
        return f"CheckpointStore({self.uri!r})"

    def resume(
        self, name: str = WHOLE_STATE_FILE, *, quarantine: bool = True
    ) -> tuple[Manifest, Any] | None:
        """The writer's way back in: load ``name`` from the newest checkpoint that verifies.

        Those above it whose manifest, sizes or checksums fail are quarantined (with
        ``quarantine``). ``None`` when the store holds no checkpoint data at all (uploads that
        never committed do not count); :class:`ResumeRefused`, listing what failed and why,
        when it holds some and nothing verifies. A checkpoint that verifies but cannot be
        loaded here raises :class:`~spotguard.errors.UnloadableCheckpoint`: it is not
        quarantined, and no older one is used instead (that would lose its steps silently).
        """
        failed: builtins.list[str] = []
        for step, directory in self._newest_first():
            sizes = self._backend.files(directory)
            if MANIFEST_NAME not in sizes:
                if QUARANTINE_NAME in sizes:
                    failed.append(f"step {step}: quarantined earlier ({self._reason(directory)})")
                continue
            try:
                manifest = self._manifest(directory, sizes)
                return manifest, self._load(manifest, name)
            except CorruptCheckpoint as exc:
                failed.append(f"step {step}: {exc}")
                log.error("checkpoint %d failed verification: %s", step, exc)
                if quarantine:
                    self.quarantine(step, str(exc))
        if not failed:
            return None
        raise ResumeRefused(
            f"{self.uri} holds checkpoints but none verifies ({'; '.join(failed)}). Starting "
            "from step 0 would lose the run: inspect with `spotguard ckpt list`, or pass "
            "allow_fresh_start=True to start over"
        )

    # -- writing ------------------------------------------------------------------------

    def save(
        self,
        step: int,
        files: Mapping[str, Payload],
        *,
        epoch: int = 0,
        kind: str = "periodic",
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write and commit one checkpoint; it is visible only once this returns."""
        if not files:
            raise ValueError("a checkpoint needs at least one file")
        entries = {name: self.put(step, name, payload) for name, payload in files.items()}
        return self.commit(step, entries, epoch=epoch, kind=kind, extra=extra)

    def put(
        self, step: int, name: str, payload: Payload, *, size_hint: int | None = None
    ) -> FileEntry:
        """Write one payload file of a checkpoint that is not committed yet.

        Several processes (ranks) may each put their own files; one of them then commits.
        ``size_hint`` (about how many bytes a callable payload writes) lets an S3 upload size
        its parts for a file beyond ``10,000 x part_size``.
        """
        check_name(name)
        if self.lease is not None:
            self.lease.check()  # a writer that lost the lease must not touch payloads either
        if MANIFEST_NAME in self._backend.files(step_dir(step)):
            raise WriterConflict(
                f"{self.uri}: step {step} is committed already; writing {name} into it would "
                "change a checkpoint someone may resume from (two writers on one prefix?)"
            )
        hashed: builtins.list[HashingWriter] = []

        def produce(sink: Sink) -> None:
            writer = HashingWriter(sink)
            hashed.append(writer)
            if isinstance(payload, (bytes, bytearray, memoryview)):
                writer.write(payload)
            else:
                # Buffered: torch.save issues many small writes.
                buffered = io.BufferedWriter(writer, buffer_size=8 * 2**20)
                payload(buffered)
                buffered.flush()
                buffered.detach()

        if isinstance(payload, (bytes, bytearray, memoryview)):
            size_hint = memoryview(payload).nbytes
        self._backend.write(f"{step_dir(step)}/{name}", produce, size_hint)
        (writer,) = hashed
        return FileEntry(writer.size, writer.hexdigest())

    def commit(
        self,
        step: int,
        files: Mapping[str, FileEntry],
        *,
        epoch: int = 0,
        kind: str = "periodic",
        extra: dict[str, Any] | None = None,
        resumed_from: int | None = None,
        world_size: int = 1,
        format: str = "torch",
    ) -> Manifest:
        """Create the manifest of files already put: from now on the checkpoint exists.

        ``format`` says how the files are laid out (``torch`` or ``dcp``: manifest.FORMATS),
        so that a reader picks the right loader instead of guessing from file names.

        Refuses (:class:`WriterConflict`) when another writer committed this step or a newer
        one; reads the manifest and the sizes back (:class:`CorruptCheckpoint` naming the
        likely cause when the store kept other bytes: the checkpoint is then quarantined).
        """
        if not files:
            raise ValueError("a checkpoint needs at least one file")
        self.check_writer(step)
        now = datetime.now(timezone.utc)
        manifest = Manifest(
            step=step,
            epoch=epoch,
            kind=kind,
            created_at=now.replace(microsecond=now.microsecond // 1000 * 1000),  # as stored
            files=dict(files),
            writer=self.writer,
            resumed_from=resumed_from,
            world_size=world_size,
            format=format,
            extra=extra or {},
        )
        directory = step_dir(step)
        data = manifest.to_bytes()
        self._backend.write_small(f"{directory}/{MANIFEST_NAME}", data, exclusive=True)
        # From here on the commit is durable: what fails below is reported, but only a store
        # that holds other bytes than were sent undoes it (quarantined).
        try:
            stored = read_back(self._backend, self.uri, manifest, data)
        except CorruptCheckpoint as exc:
            self.quarantine(step, f"read back after commit: {exc}")
            raise
        except StoreError as exc:
            log.warning("checkpoint %d committed, but reading it back failed: %s", step, exc)
            stored = {QUARANTINE_NAME: 0}  # unknown: clear it to be sure
        if QUARANTINE_NAME in stored:  # an older attempt at this step was quarantined
            try:
                self._backend.delete([f"{directory}/{QUARANTINE_NAME}"])
            except StoreError as exc:
                log.warning("could not remove the old quarantine record of step %d: %s",
                            step, exc)  # fmt: skip
        return manifest

    def read_back_payload(self, step: int, name: str, entry: FileEntry) -> None:
        """Read a payload file just put back in full: :class:`CorruptCheckpoint` naming the
        likely cause and the fix when the store kept other bytes than were sent."""
        read_back_payload(self._backend, self.uri, step, name, entry)

    def check_writer(self, step: int) -> None:
        """Raise unless this process may still commit ``step``: it holds the writer lease (when
        it took one) and no other writer committed this step or a newer one
        (:class:`WriterConflict`). A sharded save asks before any rank writes a byte."""
        if self.lease is not None:
            self.lease.check()
        self._check_no_newer_writer(step)

    def _check_no_newer_writer(self, step: int) -> None:
        """Stop when the newest committed checkpoint at or above ``step`` is not ours."""
        for found, directory in self._newest_first():
            if found < step:
                return
            sizes = self._backend.files(directory)
            if MANIFEST_NAME not in sizes:
                continue  # an upload in flight, or quarantined: nobody's commit
            try:
                theirs = self._manifest(directory, sizes).writer
            except CorruptCheckpoint:
                continue  # not a commit anyone can resume from; resume quarantines it
            if theirs is None or theirs.id != self.writer.id:
                who = theirs.describe() if theirs else "an unknown writer"
                raise WriterConflict(
                    f"{self.uri}: step {found} was committed by {who}, not by this process "
                    f"({self.writer.describe()}): two writers on one prefix. Stopping instead "
                    "of overwriting; give each run a prefix of its own"
                )
            return  # our own newer commit: no one else has written since

    def quarantine(self, step: int, reason: str) -> None:
        """Move a checkpoint aside: ``quarantined.json`` (with ``reason``) replaces its
        manifest, so it is no longer committed; its payload stays for inspection."""
        directory = step_dir(step)
        old = self._backend.read_small(f"{directory}/{MANIFEST_NAME}")
        record = {
            "reason": reason,
            "at": format_time(datetime.now(timezone.utc)),
            "by": self.writer.to_json(),
            "manifest": old.decode("utf-8", "replace") if old else None,
        }
        self._backend.write_small(
            f"{directory}/{QUARANTINE_NAME}", json.dumps(record, indent=1).encode()
        )
        self._backend.delete([f"{directory}/{MANIFEST_NAME}"])
        log.warning("checkpoint %d quarantined: %s", step, reason)

    def delete(self, step: int) -> None:
        """Delete one checkpoint, committed or not (manifest first: never left half-valid)."""
        directory = step_dir(step)
        sizes = self._backend.files(directory)
        self._backend.delete([f"{directory}/{MANIFEST_NAME}"])
        self._backend.delete([f"{directory}/{name}" for name in sizes if name != MANIFEST_NAME])

    def prune(
        self, keep_last: int, *, newest_verified: int | None = None, quarantined: bool = False
    ) -> builtins.list[int]:
        """Delete all but the newest ``keep_last`` committed checkpoints, and uploads that never
        committed below the newest kept one; returns the steps deleted. One listing, no
        manifest reads.

        ``newest_verified`` (the writer's own last commit, or what it resumed from; default:
        the newest checkpoint whose manifest reads) is never deleted, and nothing above it is
        judged: that is either a save in flight or another writer's. Quarantined checkpoints
        stay unless ``quarantined`` (``ckpt prune --quarantined``).
        """
        if keep_last < 1:
            raise ConfigError(
                f"keep_last must be >= 1 (the newest is never deleted), got {keep_last}"
            )
        if newest_verified is None:  # not the writer: the newest whose manifest reads
            latest = self.latest()
            if latest is None:
                return []
            newest_verified = latest.step
        listing = self._backend.listing()
        steps = {
            step: (directory, sizes)
            for directory, sizes in listing.items()
            if (step := parse_step_dir(directory)) is not None
        }
        committed = sorted(s for s, (_, sizes) in steps.items() if MANIFEST_NAME in sizes)
        if newest_verified is not None:
            committed = [s for s in committed if s <= newest_verified]
        if not committed:
            return []
        keep = set(committed[-keep_last:])
        if newest_verified is not None:
            keep.add(newest_verified)
        newest = max(keep)
        deleted = []
        for step, (directory, sizes) in sorted(steps.items()):
            if step in keep or step > newest:
                continue
            if QUARANTINE_NAME in sizes and MANIFEST_NAME not in sizes and not quarantined:
                continue
            # Manifest first: a checkpoint half-deleted is an uncommitted one, never a broken one.
            if MANIFEST_NAME in sizes:
                self._backend.delete([f"{directory}/{MANIFEST_NAME}"])
            self._backend.delete([f"{directory}/{name}" for name in sizes if name != MANIFEST_NAME])
            deleted.append(step)
        return deleted
