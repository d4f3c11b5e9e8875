"""Streams that checksum what passes through them, so no second pass over the data is needed.

Both report themselves as not seekable on purpose: s3transfer then reads an upload source, and
writes a download sink, strictly in order (while still moving parts in parallel), which is what
makes a running SHA-256 correct.
"""

from __future__ import annotations

import hashlib
import io
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


class Sink(Protocol):
    """Anything bytes can be written to: a file, a spool, a hashing writer."""

    def write(self, data: bytes | memoryview, /) -> int | None: ...


class HashingWriter(io.RawIOBase):
    """Writes through to ``sink`` (or nowhere) while counting bytes and hashing them."""

    def __init__(self, sink: Sink | None = None) -> None:
        super().__init__()
        self._sink = sink
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: ReadableBuffer, /) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.size += view.nbytes
        if self._sink is not None:
            self._sink.write(view)
        return view.nbytes

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
