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
    pipe = Pipe(chunks=2)  # a small pipe: the producer blocks and resumes many times
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


def test_a_failed_producer_makes_the_reader_raise_not_end():
    pipe = Pipe()
    pipe.writer.write(b"partial")
    pipe.fail(ValueError("cannot pickle"))
    with pytest.raises(RuntimeError, match="cannot pickle") as caught:
        pipe.reader.read(100)
    assert isinstance(caught.value.__cause__, ValueError)


def test_a_reader_that_stops_unblocks_the_producer():
    pipe = Pipe(chunks=1)
    pipe.writer.write(b"fills the pipe")
    errors: list[BaseException] = []

    def write_more() -> None:
        try:
            pipe.writer.write(b"blocks until the reader is gone")
        except BaseException as exc:
            errors.append(exc)

    producer = threading.Thread(target=write_more)
    producer.start()
    pipe.close_reader()
    producer.join(5)
    assert not producer.is_alive()
    assert isinstance(errors[0], BrokenPipeError)
