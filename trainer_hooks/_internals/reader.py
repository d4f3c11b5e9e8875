"""The read side of a checkpoint store: listing, verifying and loading, never changing it.

:class:`~spotguard.trainer_hooks.CheckpointStore` builds the writes on top of it. Reading
walks the checkpoint directories newest first and reads one manifest in the common case,
however long the history; only :meth:`StoreReader.list`, :meth:`~StoreReader.quarantined`
and :meth:`~StoreReader.verify` (inspection, not the training path) read them all.
"""

from __future__ import annotations

import builtins
import json
import logging
from collections.abc import Iterator
from typing import Any

from spotguard.errors import CorruptCheckpoint, StoreError, UnloadableCheckpoint
from spotguard.protocol import MANIFEST_NAME, parse_step_dir, step_dir
from spotguard.trainer_hooks._internals.streams import HashingWriter
from spotguard.trainer_hooks.backends import Backend, Sink
from spotguard.trainer_hooks.manifest import (
    QUARANTINE_NAME,
    WHOLE_STATE_FILE,
    Manifest,
    check_name,
)
from spotguard.trainer_hooks.results import Quarantined, VerifyResult

__all__ = ["StoreReader"]

log = logging.getLogger("spotguard.trainer_hooks.store")


class StoreReader:
    """List, verify and load the checkpoints behind one backend."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @property
    def uri(self) -> str:
        return self._backend.uri

    # -- reading ------------------------------------------------------------------------

    def _newest_first(self) -> list[tuple[int, str]]:
        found = []
        for directory in self._backend.directories():
            step = parse_step_dir(directory)
            if step is not None:
                found.append((step, directory))
        return sorted(found, reverse=True)

    def _manifest(self, directory: str, sizes: dict[str, int]) -> Manifest:
        """The manifest of a committed checkpoint, checked against the listed sizes;
        :class:`CorruptCheckpoint` when it cannot be read or does not match."""
        where = f"{self.uri}/{directory}"
        data = self._backend.read_small(f"{directory}/{MANIFEST_NAME}")
        if data is None:
            raise CorruptCheckpoint(f"{where}: the manifest vanished while reading")
        manifest = Manifest.from_bytes(data, where)
        if manifest.step != parse_step_dir(directory):
            raise CorruptCheckpoint(f"{where}: manifest says step {manifest.step}")
        mismatch = manifest.size_mismatch(sizes)
        if mismatch is not None:
            name, found = mismatch
            raise CorruptCheckpoint(
                f"{where}: {name} is {'missing' if found is None else found}, manifest says "
                f"{manifest.files[name].size} bytes"
            )
        return manifest

    def _committed_newest_first(self) -> Iterator[tuple[int, str, dict[str, int]]]:
        """Committed checkpoint directories, newest first, one listing request each."""
        for step, directory in self._newest_first():
            sizes = self._backend.files(directory)
            if MANIFEST_NAME in sizes:
                yield step, directory, sizes

    def list(self) -> list[Manifest]:
        """Committed checkpoints whose manifests read and match, oldest first (every manifest
        is read: for inspection, not for the training path). Broken ones are skipped with a
        warning."""
        committed = []
        for step, directory, sizes in self._committed_newest_first():
            try:
                committed.append(self._manifest(directory, sizes))
            except CorruptCheckpoint as exc:
                log.warning("skipping checkpoint %d: %s", step, exc)
        return committed[::-1]

    def latest(self) -> Manifest | None:
        """The newest committed checkpoint whose manifest reads and matches, or ``None``.
        Reads one manifest when the newest is fine."""
        for step, directory, sizes in self._committed_newest_first():
            try:
                return self._manifest(directory, sizes)
            except CorruptCheckpoint as exc:
                log.warning("skipping checkpoint %d: %s", step, exc)
        return None

    def walk(self) -> Iterator[tuple[int, Manifest | None, str]]:
        """Every checkpoint that was committed, newest first, as a resume walks them:
        ``(step, manifest, "")`` for one whose manifest reads and matches the listed sizes (a
        file missing or truncated does not), ``(step, None, reason)`` for one that does not
        (``quarantined earlier: ...`` when it was moved aside before). Uploads that never
        committed are left out. Lazily: the common case reads one manifest."""
        for step, directory in self._newest_first():
            sizes = self._backend.files(directory)
            if MANIFEST_NAME not in sizes:
                if QUARANTINE_NAME in sizes:
                    yield step, None, f"quarantined earlier ({self._reason(directory)})"
                continue
            try:
                yield step, self._manifest(directory, sizes), ""
            except CorruptCheckpoint as exc:
                yield step, None, str(exc)

    def quarantined(self) -> builtins.list[Quarantined]:
        """Checkpoints moved aside after failing verification, oldest first."""
        found = []
        for step, directory in reversed(self._newest_first()):
            data = self._backend.read_small(f"{directory}/{QUARANTINE_NAME}")
            if data is None or self._backend.read_small(f"{directory}/{MANIFEST_NAME}"):
                continue  # not quarantined, or committed again since
            try:
                record = json.loads(data)
                found.append(Quarantined(step, str(record["reason"]), str(record["at"])))
            except (ValueError, KeyError, TypeError):
                found.append(Quarantined(step, "unreadable quarantine record", ""))
        return found

    def _reason(self, directory: str) -> str:
        data = self._backend.read_small(f"{directory}/{QUARANTINE_NAME}")
        try:
            return str(json.loads(data or b"")["reason"])
        except (ValueError, KeyError, TypeError):
            return "unreadable quarantine record"

    def get(self, step: int) -> Manifest:
        """The committed checkpoint at ``step``; :class:`StoreError` when there is none."""
        directory = step_dir(step)
        sizes = self._backend.files(directory)
        if MANIFEST_NAME not in sizes:
            raise StoreError(f"{self.uri}: no committed checkpoint at step {step}")
        try:
            return self._manifest(directory, sizes)
        except CorruptCheckpoint as exc:
            raise StoreError(f"{self.uri}: no usable checkpoint at step {step}: {exc}") from None

    def manifest(self, step: int) -> Manifest:
        """The manifest of the checkpoint at ``step``, checked against the listed sizes.

        Unlike :meth:`get`, a broken one raises :class:`CorruptCheckpoint` (what a loader must
        tell apart from "not there": :class:`StoreError`)."""
        directory = step_dir(step)
        sizes = self._backend.files(directory)
        if MANIFEST_NAME not in sizes:
            raise StoreError(f"{self.uri}: no committed checkpoint at step {step}")
        return self._manifest(directory, sizes)

    def fetch(self, manifest: Manifest, name: str, sink: Sink) -> None:
        """Stream one payload file into ``sink``, checking size and SHA-256 on the way.

        Raises :class:`CorruptCheckpoint` after the last byte when they do not match: the
        caller must then discard what it received.
        """
        entry = manifest.files.get(check_name(name))
        if entry is None:  # verifies, but was written by something else: not corrupt
            raise UnloadableCheckpoint(f"checkpoint {manifest.step} has no file {name!r}")
        writer = HashingWriter(sink)
        self._backend.download(f"{step_dir(manifest.step)}/{name}", writer, entry.size)
        if writer.size != entry.size or writer.hexdigest() != entry.sha256:
            raise CorruptCheckpoint(
                f"{self.uri}/{step_dir(manifest.step)}/{name}: content does not match its "
                "manifest (size or SHA-256); the checkpoint is corrupt or was tampered with"
            )

    def verify(self, step: int | None = None) -> builtins.list[VerifyResult]:
        """Re-read every byte of one checkpoint (or all) and compare with the manifests.

        Unlike :meth:`list`, this reports broken checkpoints instead of hiding them.
        """
        results = []
        for found, directory in reversed(self._newest_first()):
            if step is not None and found != step:
                continue
            results.append(self._verify_one(found, directory))
        if step is not None and not results:
            results.append(VerifyResult(step, False, "no such checkpoint"))
        return results

    def _verify_one(self, step: int, directory: str) -> VerifyResult:
        sizes = self._backend.files(directory)
        if MANIFEST_NAME not in sizes:
            if QUARANTINE_NAME in sizes:
                return VerifyResult(step, False, "quarantined: failed verification earlier")
            return VerifyResult(step, False, "no manifest: an upload that never committed")
        try:
            manifest = self._manifest(directory, sizes)
            for name in manifest.files:
                self.fetch(manifest, name, HashingWriter())
        except CorruptCheckpoint as exc:
            return VerifyResult(step, False, str(exc))
        return VerifyResult(step, True)

    def load_state(
        self, step: int | None = None, name: str = WHOLE_STATE_FILE
    ) -> tuple[Manifest, Any]:
        """Load ``name`` from the newest verified checkpoint (or ``step``) with torch.

        Read-only: a checkpoint that fails verification is skipped with a warning and the
        next older one is tried (so is one whose file is not weights-only data); one of another
        format or manifest version (a sharded checkpoint) raises
        :class:`UnloadableCheckpoint`: the state is newer than any older whole-state
        checkpoint, and going back to one would go back in time silently.
        :class:`StoreError` when none is left. With ``step`` there is
        nothing to fall back on: its own :class:`CorruptCheckpoint` or
        :class:`UnloadableCheckpoint` is raised. The writer resuming training uses
        :meth:`resume`, which quarantines instead.
        """
        candidates = (
            [(step, step_dir(step), self._backend.files(step_dir(step)))]
            if step is not None
            else self._committed_newest_first()
        )
        for found, directory, sizes in candidates:
            try:
                if MANIFEST_NAME not in sizes:
                    raise CorruptCheckpoint(f"{self.uri}: no committed checkpoint at {found}")
                manifest = self._manifest(directory, sizes)
            except CorruptCheckpoint as exc:
                if step is not None:
                    raise
                log.warning("skipping checkpoint %s: %s", found, exc)
                continue
            # Another format (a sharded checkpoint) or manifest version is the newest state:
            # raised, never skipped for an older whole-state one (that goes back in time).
            self._check_format(manifest)
            try:
                return manifest, self._load(manifest, name)
            except (CorruptCheckpoint, UnloadableCheckpoint) as exc:
                if step is not None:
                    raise
                log.warning("skipping checkpoint %s: %s", found, exc)
        raise StoreError(f"{self.uri}: no verified checkpoint to load")

    def _check_format(self, manifest: Manifest) -> None:
        if manifest.format != "torch":
            raise UnloadableCheckpoint(
                f"{self.uri}: step {manifest.step} is a {manifest.format!r} checkpoint (sharded "
                "state, torch.distributed.checkpoint), not one torch.save file per rank: load it "
                "on every rank through the sharded path"
            )

    def _load(self, manifest: Manifest, name: str) -> Any:
        """``name`` of ``manifest``, verified while streaming into a spool file of our own,
        then loaded weights-only and memory-mapped: the tensors are backed by the spool's
        pages (copy-on-write, the file unlinked when this returns) instead of a second copy
        in memory, so a restore needs the state's size once, not twice."""
        import pickle
        import tempfile

        import torch

        self._check_format(manifest)
        with tempfile.NamedTemporaryFile(prefix="spotguard-restore-") as spool:
            self.fetch(manifest, name, spool)
            spool.flush()
            try:
                return torch.load(spool.name, map_location="cpu", weights_only=True, mmap=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, MemoryError) as exc:
                # Checksums match: the bytes are as written. Not plain tensors and containers
                # (refusing to unpickle them is the point of weights_only), or no memory.
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise UnloadableCheckpoint(
                    f"{self.uri}: {name} of step {manifest.step} verifies but cannot be loaded "
                    f"here: not weights-only data, or not enough memory ({first_line[:200]}). "
                    "Register the classes it needs with torch.serialization.add_safe_globals, "
                    "or give the process more memory"
                ) from None
