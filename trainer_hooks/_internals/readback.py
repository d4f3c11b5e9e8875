"""Reading a commit back before it counts: the store must hold what was sent.

Some stores "succeed" and keep other bytes (an S3-compatible server that stores botocore's
aws-chunked framing inside the object, a proxy that rewrites bodies). Checked after every
commit: the manifest's bytes and every file's size (two small requests); after the first
periodic commit of a store, every byte (its SHA-256), so a mangling store is caught at the
first save with a message naming the cause and the fix, instead of at the next resume.
"""

from __future__ import annotations

from collections.abc import Callable

from spotguard.errors import CorruptCheckpoint
from spotguard.trainer_hooks._internals.streams import HashingWriter, Sink
from spotguard.trainer_hooks.backends import Backend
from spotguard.trainer_hooks.manifest import MANIFEST_NAME, Manifest, step_dir

__all__ = ["MANGLING_HINT", "read_back"]

#: What a store that keeps other bytes than it was sent most likely does, and the fix.
MANGLING_HINT = (
    "the store keeps other bytes than it was sent. An S3-compatible server that does not "
    "decode botocore's aws-chunked uploads (flexible checksums, the default since botocore "
    "1.36, over HTTPS) stores the framing inside the object: set "
    "AWS_REQUEST_CHECKSUM_CALCULATION=when_required and "
    "AWS_RESPONSE_CHECKSUM_VALIDATION=when_required, or fix the server"
)


def read_back(
    backend: Backend,
    uri: str,
    manifest: Manifest,
    sent: bytes,
    *,
    full: bool,
    fetch: Callable[[Manifest, str, Sink], None],
) -> None:
    """:class:`CorruptCheckpoint` unless ``backend`` holds ``manifest`` as ``sent`` and its
    files with their sizes (and, when ``full``, their SHA-256, read through ``fetch``)."""
    directory = step_dir(manifest.step)
    sizes = backend.files(directory)
    stored = backend.read_small(f"{directory}/{MANIFEST_NAME}")
    if stored != sent:
        raise CorruptCheckpoint(
            f"{uri}/{directory}/{MANIFEST_NAME} reads back as "
            f"{len(stored) if stored is not None else 'nothing'} bytes, "
            f"{len(sent)} were sent: {MANGLING_HINT}"
        )
    for name, entry in manifest.files.items():
        if sizes.get(name) != entry.size:
            raise CorruptCheckpoint(
                f"{uri}/{directory}/{name} is stored as {sizes.get(name, 'nothing')} "
                f"bytes, {entry.size} were sent: {MANGLING_HINT}"
            )
        if full:
            try:
                fetch(manifest, name, HashingWriter())
            except CorruptCheckpoint:
                raise CorruptCheckpoint(
                    f"{uri}/{directory}/{name} reads back with another SHA-256 than "
                    f"was sent: {MANGLING_HINT}"
                ) from None
