"""The pipe between serialization and upload (unit tests of one module)."""

from __future__ import annotations

import random
import threading

import pytest

from spotguard.trainer_hooks._internals.streams import Pipe


def _produce(pipe: Pipe, chunks: list[bytes]) -> threading.Thread:
    def run() -> None:
        for chunk in chunks:
            pipe.writer.write(chunk)
        pipe.finish()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("read_size", [1, 7, 4096, 10_000, -1])
def test_reads_of_any_size_return_the_bytes_in_order(read_size):
    rng = random.Random(read_size)
    chunks = [rng.randbytes(rng.randint(0, 5000)) for _ in range(40)]
    pipe = Pipe()
    producer = _produce(pipe, chunks)
    received = bytearray()
    while True:
        data = pipe.reader.read(read_size)
        if not data:
            break
        assert read_size < 0 or len(data) <= read_size
        received += data
    producer.join()
    assert bytes(received) == b"".join(chunks)


def test_a_write_returns_only_once_its_bytes_are_copied():
    # torch.save hands each write a view it may overwrite as soon as the call returns (its
    # write buffer) or that belongs to a live tensor: the pipe must not keep a reference.
    reused = bytearray(b"a" * 1000)

    def run() -> None:
        for fill in b"abc":
            reused[:] = bytes([fill]) * 1000
            pipe.writer.write(reused)
        pipe.finish()

    pipe = Pipe()
    producer = threading.Thread(target=run)
    producer.start()
    parts = [pipe.reader.read(600) for _ in range(6)]
    producer.join()
    assert b"".join(parts) == b"a" * 1000 + b"b" * 1000 + b"c" * 1000
    assert [len(part) for part in parts] == [600, 600, 600, 600, 600, 0]


def test_a_failed_producer_makes_the_reader_raise_not_end():
    pipe = Pipe()

    def run() -> None:
        pipe.writer.write(b"partial")
        pipe.fail(ValueError("cannot pickle"))

    producer = threading.Thread(target=run)
    producer.start()
    with pytest.raises(RuntimeError, match="cannot pickle") as caught:
        pipe.reader.read(100)
    producer.join(5)
    assert isinstance(caught.value.__cause__, ValueError)


def test_a_reader_that_stops_unblocks_the_producer():
    pipe = Pipe()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            pipe.writer.write(b"blocks until the reader has copied it, or is gone")
        except BaseException as exc:
            errors.append(exc)

    producer = threading.Thread(target=write)
    producer.start()
    assert pipe.reader.read(6) == b"blocks"  # the rest of the write is never read
    pipe.close_reader()
    producer.join(5)
    assert not producer.is_alive()
    assert isinstance(errors[0], BrokenPipeError)
    with pytest.raises(BrokenPipeError):
        pipe.writer.write(b"later writes fail at once")
