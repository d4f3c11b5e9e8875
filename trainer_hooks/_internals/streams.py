"""Streams that checksum what passes through them, so no second pass over the data is needed,
and the pipe that streams a payload into an upload while it is being serialized.

Both report themselves as not seekable on purpose: s3transfer then reads an upload source, and
writes a download sink, strictly in order (while still moving parts in parallel), which is what
makes a running SHA-256 correct.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import queue
import threading
from typing import TYPE_CHECKING, Protocol, cast

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


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_EOF = object()


class Pipe:
    """A bounded in-memory pipe: a producer thread writes (``torch.save``), the upload reads.

    It lets the serialization and the multipart upload overlap with no spool file in between
    (at most ``chunks`` writes are buffered). Either end can give up: a producer that fails is
    re-raised to the reader (so the upload aborts instead of committing a truncated object),
    and a reader that stops makes the producer's next write raise ``BrokenPipeError``.
    """

    def __init__(self, chunks: int = 8) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=chunks)
        self._reader_gone = threading.Event()
        self.writer = _PipeWriter(self)
        self.reader = _PipeReader(self)

    def _put(self, item: object) -> None:
        while not self._reader_gone.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise BrokenPipeError("the upload stopped reading")

    def finish(self) -> None:
        """The producer is done: the reader sees the end of the stream."""
        self._put(_EOF)

    def fail(self, error: BaseException) -> None:
        """The producer failed: the reader raises instead of seeing a (truncated) end."""
        with contextlib.suppress(BrokenPipeError):
            self._put(_Failed(error))

    def close_reader(self) -> None:
        self._reader_gone.set()


class _PipeWriter(io.RawIOBase):
    def __init__(self, pipe: Pipe) -> None:
        super().__init__()
        self._pipe = pipe

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer, /) -> int:
        chunk = bytes(data)
        if chunk:
            self._pipe._put(chunk)
        return len(chunk)


class _PipeReader(io.RawIOBase):
    def __init__(self, pipe: Pipe) -> None:
        super().__init__()
        self._pipe = pipe
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._at_end = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int | None = -1, /) -> bytes:
        wanted = None if size is None or size < 0 else size
        while not self._at_end and (wanted is None or self._buffered < wanted):
            item = self._pipe._queue.get()
            if item is _EOF:
                self._at_end = True
            elif isinstance(item, _Failed):
                raise RuntimeError(f"the payload could not be written: {item.error}") from (
                    item.error
                )
            else:
                chunk = cast(bytes, item)
                self._chunks.append(chunk)
                self._buffered += len(chunk)
        # One join per read (parts are whole multiples of the writes, so usually no remainder).
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        if wanted is None or len(data) <= wanted:
            self._chunks, self._buffered = [], 0
            return data
        self._chunks, self._buffered = [data[wanted:]], len(data) - wanted
        return data[:wanted]
