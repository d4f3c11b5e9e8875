"""CheckpointStore: verified checkpoints in a local directory or under an S3 prefix.

Layout and commit protocol (DESIGN.md)::

    <uri>/ckpt-000000001200/<payload files>
    <uri>/ckpt-000000001200/manifest.json      written last: the commit marker

Payload files are serialized straight into the upload (S3) or a spool file renamed into place
(local) while their SHA-256 is computed, and only then is the manifest written, in one atomic
PUT (S3) or rename (local). A checkpoint whose manifest is missing, unreadable, or lists a
file that is absent or of another size does not exist for :meth:`list` and :meth:`latest`; a
payload whose bytes do not match the manifest's checksum is refused by :meth:`fetch` and
skipped by :meth:`load_state`, which falls back to the next older checkpoint. Loading uses
``torch.load(weights_only=True)``: a store is data, not trusted code.
"""

from __future__ import annotations

import builtins
import io
import logging
import pickle
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, BinaryIO

from spotguard.errors import CorruptCheckpoint, StoreError
from spotguard.trainer_hooks._internals.streams import HashingWriter, Sink
from spotguard.trainer_hooks.backends import Backend, backend_for_uri
from spotguard.trainer_hooks.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    check_name,
    parse_step_dir,
    step_dir,
)
from spotguard.trainer_hooks.settings import TransferSettings

__all__ = ["CheckpointStore", "Payload", "Sink", "TransferSettings", "VerifyResult"]

log = logging.getLogger(__name__)

#: A payload file: raw bytes, or a function that writes the file to a binary stream
#: (``lambda f: torch.save(state, f)``).
Payload = bytes | Callable[[BinaryIO], None]


@dataclass(frozen=True)
class VerifyResult:
    step: int
    ok: bool
    problem: str = ""


class CheckpointStore:
    """List, save, verify, load and prune checkpoints under one URI."""

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
        if isinstance(where, str):
            self._backend = backend_for_uri(where, transfer, s3_client)
        else:
            self._backend = where

    @property
    def uri(self) -> str:
        return self._backend.uri

    def __repr__(self) -> str:
        return f"CheckpointStore({self.uri!r})"

    # -- reading ------------------------------------------------------------------------

    def list(self) -> list[Manifest]:
        """Committed checkpoints (manifest present, every file present with its size),
        oldest first. Broken ones are skipped with a warning."""
        listing = self._backend.listing()
        committed = []
        for directory in sorted(listing):
            manifest = self._committed(directory, listing[directory])
            if manifest is not None:
                committed.append(manifest)
        return committed

    def latest(self) -> Manifest | None:
        """The newest committed checkpoint, or ``None`` for an empty store."""
        listing = self._backend.listing()
        for directory in sorted(listing, reverse=True):
            manifest = self._committed(directory, listing[directory])
            if manifest is not None:
                return manifest
        return None

    def _committed(self, directory: str, sizes: dict[str, int]) -> Manifest | None:
        step = parse_step_dir(directory)
        if step is None or MANIFEST_NAME not in sizes:
            return None  # not ours, or an upload that never committed: invisible
        where = f"{self.uri}/{directory}"
        data = self._backend.read_small(f"{directory}/{MANIFEST_NAME}")
        if data is None:
            return None
        try:
            manifest = Manifest.from_bytes(data, where)
            if manifest.step != step:
                raise CorruptCheckpoint(f"{where}: manifest says step {manifest.step}")
            for name, entry in manifest.files.items():
                if sizes.get(name) != entry.size:
                    raise CorruptCheckpoint(
                        f"{where}: {name} is {sizes.get(name, 'missing')}, "
                        f"manifest says {entry.size} bytes"
                    )
        except CorruptCheckpoint as exc:
            log.warning("skipping checkpoint: %s", exc)
            return None
        return manifest

    def get(self, step: int) -> Manifest:
        """The committed checkpoint at ``step``; :class:`StoreError` when there is none."""
        directory = step_dir(step)
        sizes = self._backend.listing().get(directory, {})
        manifest = self._committed(directory, sizes)
        if manifest is None:
            raise StoreError(f"{self.uri}: no committed checkpoint at step {step}")
        return manifest

    def fetch(self, manifest: Manifest, name: str, sink: Sink) -> None:
        """Stream one payload file into ``sink``, checking size and SHA-256 on the way.

        Raises :class:`CorruptCheckpoint` after the last byte when they do not match: the
        caller must then discard what it received.
        """
        entry = manifest.files.get(check_name(name))
        if entry is None:
            raise CorruptCheckpoint(f"checkpoint {manifest.step} has no file {name!r}")
        writer = HashingWriter(sink)
        self._backend.download(f"{step_dir(manifest.step)}/{name}", writer)
        if writer.size != entry.size or writer.hexdigest() != entry.sha256:
            raise CorruptCheckpoint(
                f"{self.uri}/{step_dir(manifest.step)}/{name}: content does not match its "
                "manifest (size or SHA-256); the checkpoint is corrupt or was tampered with"
            )

    def verify(self, step: int | None = None) -> builtins.list[VerifyResult]:
        """Re-read every byte of one checkpoint (or all) and compare with the manifests.

        Unlike :meth:`list`, this reports broken checkpoints instead of hiding them.
        """
        listing = self._backend.listing()
        results = []
        for directory in sorted(listing):
            found = parse_step_dir(directory)
            if found is None or (step is not None and found != step):
                continue
            results.append(self._verify_one(found, directory, listing[directory]))
        if step is not None and not results:
            results.append(VerifyResult(step, False, "no such checkpoint"))
        return results

    def _verify_one(self, step: int, directory: str, sizes: dict[str, int]) -> VerifyResult:
        if MANIFEST_NAME not in sizes:
            return VerifyResult(step, False, "no manifest: an upload that never committed")
        data = self._backend.read_small(f"{directory}/{MANIFEST_NAME}") or b""
        try:
            manifest = Manifest.from_bytes(data, f"{self.uri}/{directory}")
            for name, entry in manifest.files.items():
                if sizes.get(name) != entry.size:
                    raise CorruptCheckpoint(f"{name}: size {sizes.get(name)} != {entry.size}")
                self.fetch(manifest, name, HashingWriter())
        except CorruptCheckpoint as exc:
            return VerifyResult(step, False, str(exc))
        return VerifyResult(step, True)

    def load_state(self, step: int | None = None, name: str = "state.pt") -> tuple[Manifest, Any]:
        """Load ``name`` from the newest verified checkpoint (or ``step``) with torch.

        A checkpoint that fails verification is skipped with a warning and the next older one
        is tried; :class:`StoreError` when none is left.
        """
        import torch

        candidates = [self.get(step)] if step is not None else list(reversed(self.list()))
        for manifest in candidates:
            with tempfile.TemporaryFile() as spool:
                try:
                    self.fetch(manifest, name, spool)
                except CorruptCheckpoint as exc:
                    log.warning("skipping checkpoint %s: %s", manifest.step, exc)
                    continue
                spool.seek(0)
                try:
                    state = torch.load(spool, map_location="cpu", weights_only=True)
                except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
                    # Checksums match but the content is not plain tensors and containers:
                    # refusing to unpickle it is the point of weights_only.
                    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    log.warning(
                        "skipping checkpoint %s: %s is not weights-only data (%s)",
                        manifest.step,
                        name,
                        first_line[:200],
                    )
                    continue
            return manifest, state
        raise StoreError(f"{self.uri}: no verified checkpoint to load")

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
        # Saving a step again: un-commit it first, so that no reader ever pairs the old
        # manifest with a new payload.
        self._backend.delete([f"{step_dir(step)}/{MANIFEST_NAME}"])
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
        hashed: list[HashingWriter] = []

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
    ) -> Manifest:
        """Write the manifest of files already put: from now on the checkpoint exists."""
        if not files:
            raise ValueError("a checkpoint needs at least one file")
        now = datetime.now(timezone.utc)
        manifest = Manifest(
            step=step,
            epoch=epoch,
            kind=kind,
            created_at=now.replace(microsecond=now.microsecond // 1000 * 1000),  # as stored
            files=dict(files),
            extra=extra or {},
        )
        self._backend.write_small(f"{step_dir(step)}/{MANIFEST_NAME}", manifest.to_bytes())
        return manifest

    def delete(self, step: int) -> None:
        """Delete one checkpoint, committed or not (manifest first: never left half-valid)."""
        directory = step_dir(step)
        sizes = self._backend.listing().get(directory, {})
        self._backend.delete([f"{directory}/{MANIFEST_NAME}"])
        self._backend.delete([f"{directory}/{name}" for name in sizes if name != MANIFEST_NAME])

    def prune(self, keep_last: int) -> builtins.list[int]:
        """Delete all but the newest ``keep_last`` committed checkpoints (at least one is
        always kept), and uploads that never committed and are older than the newest
        committed checkpoint. Returns the steps deleted."""
        if keep_last < 1:
            raise ValueError(
                f"keep_last must be >= 1 (the newest is never deleted), got {keep_last}"
            )
        listing = self._backend.listing()
        committed = [m.step for m in self.list()]
        if not committed:
            return []
        keep = set(committed[-keep_last:])
        newest = committed[-1]
        deleted = []
        for directory, sizes in sorted(listing.items()):
            step = parse_step_dir(directory)
            if step is None or step in keep:
                continue
            if step not in committed and step > newest:
                continue  # possibly a save in flight right now
            # Manifest first: a checkpoint half-deleted is an uncommitted one, never a broken one.
            if MANIFEST_NAME in sizes:
                self._backend.delete([f"{directory}/{MANIFEST_NAME}"])
            self._backend.delete([f"{directory}/{name}" for name in sizes if name != MANIFEST_NAME])
            deleted.append(step)
        return deleted
