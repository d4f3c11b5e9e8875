"""Streams that checksum what passes through them, so no second pass over the data is needed,
and the pipe that streams a payload into an upload while it is being serialized.

Both report themselves as not seekable on purpose: s3transfer then reads an upload source, and
writes a download sink, strictly in order (while still moving parts in parallel), which is what
makes a running SHA-256 correct.
"""

from __future__ import annotations

import hashlib
import io
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    # Annotations only: the backends package imports this module (its S3 backend's Pipe).
    from spotguard.trainer_hooks.backends.base import Sink


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


class Pipe:
    """An in-memory rendezvous pipe: a producer thread writes (``torch.save``), the upload reads.

    It lets the serialization and the multipart upload overlap with no spool file in between,
    and copies every byte once. ``torch.save`` hands each write a view of memory it owns only
    for the duration of the call (a tensor's storage, or a reused write buffer), so a write
    returns only after the reader has copied all of it; a part that lies inside one write (the
    bulk of a large tensor) is that one copy, a part spanning writes is joined from their
    copies. The producer runs ahead of the upload by as many parts as the transfer manager
    buffers, no more.

    Either end can give up: a producer that fails is re-raised to the reader (so the upload
    aborts instead of committing a truncated object), and a reader that stops makes the
    producer's write raise ``BrokenPipeError``.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._pending: memoryview | None = None  # the write being consumed
        self._offset = 0  # how much of it the reader has copied
        self._ended = False
        self._failure: BaseException | None = None
        self._reader_gone = False
        self.writer = _PipeWriter(self)
        self.reader = _PipeReader(self)

    def _write(self, data: ReadableBuffer) -> int:
        view = memoryview(data).cast("B")
        with self._changed:
            if self._reader_gone:
                raise BrokenPipeError("the upload stopped reading")
            if not view.nbytes:
                return 0
            self._pending, self._offset = view, 0
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._pending is not view or self._reader_gone)
            if self._pending is view:  # not all copied, and the reader is gone
                self._pending = None
                raise BrokenPipeError("the upload stopped reading")
        return view.nbytes

    def _read(self, wanted: int | None) -> bytes:
        copies: list[bytes] = []
        copied = 0
        with self._changed:
            while wanted is None or copied < wanted:
                self._changed.wait_for(
                    lambda: self._pending is not None or self._ended or self._failure is not None
                )
                if self._failure is not None:
                    error = self._failure
                    raise RuntimeError(f"the payload could not be written: {error}") from error
                if self._pending is None:
                    break  # the end of the stream
                end = self._pending.nbytes if wanted is None else self._offset + wanted - copied
                copies.append(bytes(self._pending[self._offset : end]))
                copied += len(copies[-1])
                self._offset += len(copies[-1])
                if self._offset == self._pending.nbytes:
                    self._pending = None  # all of the write copied: the producer goes on
                    self._changed.notify_all()
        return copies[0] if len(copies) == 1 else b"".join(copies)

    def finish(self) -> None:
        """The producer is done: the reader sees the end of the stream."""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        """The producer failed: the reader raises instead of seeing a (truncated) end."""
        with self._changed:
            self._failure = error
            self._changed.notify_all()

    def close_reader(self) -> None:
        """The reader is gone: a blocked or later write raises ``BrokenPipeError``."""
        with self._changed:
            self._reader_gone = True
            self._changed.notify_all()


class _PipeWriter(io.RawIOBase):
    def __init__(self, pipe: Pipe) -> None:
        super().__init__()
        self._pipe = pipe

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer, /) -> int:
        return self._pipe._write(data)


class _PipeReader(io.RawIOBase):
    def __init__(self, pipe: Pipe) -> None:
        super().__init__()
        self._pipe = pipe

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int | None = -1, /) -> bytes:
        return self._pipe._read(None if size is None or size < 0 else size)
