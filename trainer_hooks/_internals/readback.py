"""Reading a commit back before it counts: the store must hold what was sent.

Some stores "succeed" and keep other bytes (an S3-compatible server that stores botocore's
aws-chunked framing inside the object, a proxy that rewrites bodies). Checked after every
commit: the manifest's bytes and every file's size (two small requests); the first periodic
payload of a process is read back in full in the upload thread (never inside the notice), so a
mangling store is caught at the first save with a message naming the cause and the fix,
instead of at the next resume.
"""

from __future__ import annotations

from spotguard.errors import CorruptCheckpoint
from spotguard.protocol import MANIFEST_NAME, step_dir
from spotguard.trainer_hooks._internals.streams import HashingWriter
from spotguard.trainer_hooks.backends import Backend
from spotguard.trainer_hooks.manifest import FileEntry, Manifest

__all__ = ["MANGLING_HINT", "read_back"]

#: What a store that keeps other bytes than it was sent most likely does, and the fix.
MANGLING_HINT = (
    "the store keeps other bytes than it was sent. An S3-compatible server that does not "
    "decode botocore's aws-chunked uploads (flexible checksums, the default since botocore "
    "1.36, over HTTPS) stores the framing inside the object: set "
    "AWS_REQUEST_CHECKSUM_CALCULATION=when_required and "
    "AWS_RESPONSE_CHECKSUM_VALIDATION=when_required, or fix the server"
)


def read_back(backend: Backend, uri: str, manifest: Manifest, sent: bytes) -> dict[str, int]:
    """:class:`CorruptCheckpoint` unless ``backend`` holds ``manifest`` as ``sent`` and its
    files with their sizes; returns the directory's listing (name -> size)."""
    directory = step_dir(manifest.step)
    sizes = backend.files(directory)
    stored = backend.read_small(f"{directory}/{MANIFEST_NAME}")
    if stored != sent:
        raise CorruptCheckpoint(
            f"{uri}/{directory}/{MANIFEST_NAME} reads back as "
            f"{len(stored) if stored is not None else 'nothing'} bytes, "
            f"{len(sent)} were sent: {MANGLING_HINT}"
        )
    mismatch = manifest.size_mismatch(sizes)
    if mismatch is not None:
        name, found = mismatch
        raise CorruptCheckpoint(
            f"{uri}/{directory}/{name} is stored as {'nothing' if found is None else found} "
            f"bytes, {manifest.files[name].size} were sent: {MANGLING_HINT}"
        )
    return sizes


def read_back_payload(backend: Backend, uri: str, step: int, name: str, entry: FileEntry) -> None:
    """:class:`CorruptCheckpoint` unless ``name`` of ``step`` reads back with ``entry``'s size
    and SHA-256."""
    key = f"{step_dir(step)}/{name}"
    writer = HashingWriter()
    backend.download(key, writer, entry.size)
    if writer.size != entry.size or writer.hexdigest() != entry.sha256:
        raise CorruptCheckpoint(
            f"{uri}/{key} reads back as {writer.size} bytes with another SHA-256 than the "
            f"{entry.size} bytes sent: {MANGLING_HINT}"
        )
