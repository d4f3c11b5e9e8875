"""What a backend is: the :class:`Backend` protocol a store's bytes go through, and the
:class:`Sink` its streams write to.

Both are protocols, so a backend of your own needs no base class: any object with these
methods will do (:class:`~spotguard.trainer_hooks.backends.MemoryBackend` is the smallest
example).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ["Backend", "Sink"]


class Sink(Protocol):
    """Anything bytes can be written to: a file, a spool, a hashing writer."""

    def write(self, data: bytes | memoryview, /) -> int | None: ...


class Backend(Protocol):
    """What a store needs from where its bytes live."""

    #: How the store names itself in messages (``s3://bucket/prefix``, a path, ``memory://``).
    uri: str

    def listing(self) -> dict[str, dict[str, int]]:
        """Every object below the root: checkpoint dir → file name → size."""

    def read_small(self, key: str) -> bytes | None:
        """A small object (a manifest), ``None`` when it does not exist."""

    def directories(self) -> list[str]:
        """The checkpoint directories below the root (the names
        :func:`~spotguard.protocol.step_dir` gives), without their files: one cheap request
        however many files they hold."""

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
