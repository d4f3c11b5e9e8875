"""Where checkpoint bytes live: the seam between :class:`~spotguard.trainer_hooks.CheckpointStore`
and a storage service, in the spirit of httpx's transports.

A backend moves opaque objects under keys ``<checkpoint dir>/<file name>`` relative to its
root; the store builds the commit protocol, checksums and verification on top. Three come with
spotguard::

    LocalBackend    a directory (``/path``, ``file:///path``): spool file + fsync + rename
    S3Backend       an ``s3://bucket/prefix``: boto3's transfer manager, parallel multipart
    MemoryBackend   a dict in this process, for unit tests of code that uses a store

``CheckpointStore("s3://...")`` picks one from the URI (:func:`backend_for_uri`);
``CheckpointStore(MemoryBackend())`` or ``CheckpointStore(S3Backend(..., client=...))`` takes
the one given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from spotguard.errors import StoreError
from spotguard.trainer_hooks._internals.streams import Sink
from spotguard.trainer_hooks.backends.local import LocalBackend
from spotguard.trainer_hooks.backends.memory import MemoryBackend
from spotguard.trainer_hooks.backends.s3 import S3Backend
from spotguard.trainer_hooks.settings import TransferSettings

__all__ = ["Backend", "LocalBackend", "MemoryBackend", "S3Backend", "backend_for_uri"]


class Backend(Protocol):
    """What a store needs from where its bytes live."""

    #: How the store names itself in messages (``s3://bucket/prefix``, a path, ``memory://``).
    uri: str

    def listing(self) -> dict[str, dict[str, int]]:
        """Every object below the root: checkpoint dir → file name → size."""

    def read_small(self, key: str) -> bytes | None:
        """A small object (a manifest), ``None`` when it does not exist."""

    def directories(self) -> list[str]:
        """The checkpoint directories (``ckpt-*``) below the root, without their files: one
        cheap request however many files they hold."""

    def files(self, directory: str) -> dict[str, int]:
        """The files of one checkpoint directory: name → size."""

    def write_small(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """An atomic write of a small object: readers see all of it or nothing. With
        ``exclusive``, only if ``key`` does not exist yet (S3 ``If-None-Match: *``, locally an
        exclusive link); :class:`~spotguard.errors.WriterConflict` if it does."""

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        """A small object and its version tag (S3: the ETag), ``None`` when absent."""

    def write_tagged(self, key: str, data: bytes, *, expected: str | None) -> str:
        """Compare-and-swap a small object: create it only if absent (``expected`` ``None``)
        or replace it only if its tag is still ``expected``; returns the new tag.
        :class:`~spotguard.errors.WriterConflict` when the condition does not hold."""

    def write(
        self, key: str, produce: Callable[[Sink], None], size_hint: int | None = None
    ) -> None:
        """Store what ``produce`` writes (about ``size_hint`` bytes, when known) as ``key``;
        nothing is left under ``key`` if it fails."""

    def download(self, key: str, sink: Sink, size_hint: int | None = None) -> None:
        """Stream the object (about ``size_hint`` bytes, when known) into ``sink`` in
        order."""

    def delete(self, keys: list[str]) -> None: ...


def backend_for_uri(
    uri: str, transfer: TransferSettings | None = None, s3_client: Any = None
) -> Backend:
    """The backend a store URI names: a local path, ``file:///path`` or ``s3://bucket/prefix``."""
    if not isinstance(uri, str) or not uri:
        raise StoreError("store URI is empty; use a local path, file:///path or s3://bucket/prefix")
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise StoreError(f"store URI {uri!r} names no bucket: use s3://bucket/prefix")
        return S3Backend(parts.netloc, parts.path, transfer or TransferSettings(), s3_client)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"store URI {uri!r}: file:// URIs take no host, use file:///path")
        return LocalBackend(Path(parts.path))
    if parts.scheme == "" or len(parts.scheme) == 1:  # a path (or a Windows drive letter)
        return LocalBackend(Path(uri).expanduser().absolute())
    raise StoreError(
        f"store URI {uri!r}: unsupported scheme {parts.scheme!r}; "
        "use a local path, file:///path or s3://bucket/prefix"
    )
