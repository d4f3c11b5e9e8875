"""The store's backend seam: a URI picks the backend, an object is taken as given, and the
in-memory twin keeps the rules the real backends keep (unit tests of one module only)."""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path

import pytest
import torch

from spotguard.errors import CorruptCheckpoint, StoreError
from spotguard.trainer_hooks import CheckpointStore
from spotguard.trainer_hooks.backends import (
    LocalBackend,
    MemoryBackend,
    S3Backend,
    backend_for_uri,
)


def test_uris_pick_their_backend(tmp_path):
    assert isinstance(backend_for_uri(str(tmp_path)), LocalBackend)
    assert isinstance(backend_for_uri(f"file://{tmp_path}"), LocalBackend)
    s3 = backend_for_uri("s3://bucket/runs/run-1/")
    assert isinstance(s3, S3Backend)
    assert s3.uri == "s3://bucket/runs/run-1"
    for bad in ("", "s3:///prefix", "gs://bucket/x", "file://host/path"):
        with pytest.raises(StoreError):
            backend_for_uri(bad)


def test_a_malformed_s3_endpoint_is_a_one_line_store_error(monkeypatch):
    """botocore raises a plain ValueError for it, before any request."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "not a url")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(StoreError, match="cannot make an S3 client: Invalid endpoint: not a url"):
        backend_for_uri("s3://bucket/x")


def test_only_directories_named_as_the_protocol_names_them_are_checkpoints(tmp_path: Path):
    """``ckpt-<12 digits>`` (:func:`spotguard.protocol.step_dir`); a look-alike someone put
    beside them is no checkpoint, for every backend."""
    memory = MemoryBackend()
    for key in ("ckpt-000000000007/a.bin", "ckpt-notes/a.txt", "ckpt-7/a.bin", "lease.json"):
        memory.write_small(key, b"x")
    local = LocalBackend(tmp_path)
    for name in ("ckpt-000000000007", "ckpt-notes", "ckpt-7"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.bin").write_bytes(b"x")
    for backend in (memory, local):
        assert backend.directories() == ["ckpt-000000000007"]
        assert backend.listing() == {"ckpt-000000000007": {"a.bin": 1}}


def test_a_backend_object_is_used_as_given():
    backend = MemoryBackend("memory://unit/")
    store = CheckpointStore(backend)
    assert store.uri == "memory://unit/"
    store.save(3, {"a.bin": b"abc"})
    assert set(backend.objects) == {"ckpt-000000000003/a.bin", "ckpt-000000000003/manifest.json"}


def test_round_trip_through_memory():
    store = CheckpointStore(MemoryBackend())
    state = {"weight": torch.arange(12.0).reshape(3, 4), "step": 10}
    store.save(10, {"state.pt": lambda handle: torch.save(state, handle)}, epoch=2)
    manifest, loaded = store.load_state()
    assert (manifest.step, manifest.epoch) == (10, 2)
    assert torch.equal(loaded["weight"], state["weight"])


def test_a_failing_payload_leaves_nothing_under_its_key():
    backend = MemoryBackend()
    store = CheckpointStore(backend)

    def half_then_fail(handle: io.BufferedIOBase) -> None:
        handle.write(b"x" * 100)
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        store.put(5, "state.pt", half_then_fail)
    assert backend.objects == {}
    assert store.latest() is None


def test_bytes_changed_behind_the_store_are_caught_and_the_older_checkpoint_used():
    backend = MemoryBackend()
    store = CheckpointStore(backend)
    for step in (1, 2):
        store.save(step, {"state.pt": lambda handle, s=step: torch.save({"step": s}, handle)})
    key = "ckpt-000000000002/state.pt"
    data = bytearray(backend.objects[key])
    data[-10] ^= 0xFF  # same size, one byte flipped
    backend.objects[key] = bytes(data)
    with pytest.raises(CorruptCheckpoint):
        store.fetch(store.get(2), "state.pt", io.BytesIO())
    manifest, loaded = store.load_state()
    assert (manifest.step, loaded["step"]) == (1, 1)


def test_requests_are_counted_so_tests_can_price_an_operation():
    backend = MemoryBackend()
    store = CheckpointStore(backend)
    store.save(1, {"a.bin": b"a"})
    backend.requests.clear()
    assert store.latest() is not None
    assert backend.requests == {"directories": 1, "files": 1, "read_small": 1}


def test_reading_a_missing_object_is_a_store_error():
    with pytest.raises(StoreError, match="no such object"):
        MemoryBackend().download("ckpt-000000000001/a.bin", io.BytesIO())


def test_local_backend_writes_small_objects_atomically(tmp_path: Path):
    backend = LocalBackend(tmp_path)
    backend.write_small("ckpt-000000000001/manifest.json", b"{}")
    assert (tmp_path / "ckpt-000000000001" / "manifest.json").read_bytes() == b"{}"
    assert [p.name for p in (tmp_path / "ckpt-000000000001").iterdir()] == ["manifest.json"]


def every_entry(root: Path) -> list[str]:
    """Every file and directory below ``root``, dotfiles included."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_a_failing_local_payload_leaves_no_checkpoint_directory(tmp_path: Path):
    """A save that fails half way (no space left) leaves nothing: no half file, and no empty
    ``ckpt-*`` directory that verify would report for ever and prune could never remove."""
    store = CheckpointStore(LocalBackend(tmp_path))
    store.save(1, {"state.pt": lambda handle: handle.write(b"first")})

    def half_then_fail(handle: io.BufferedIOBase) -> None:
        handle.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        store.put(2, "state.pt", half_then_fail)
    assert every_entry(tmp_path) == [
        "ckpt-000000000001",
        "ckpt-000000000001/manifest.json",
        "ckpt-000000000001/state.pt",
    ]
    assert [result.ok for result in store.verify()] == [True]


def test_a_file_system_without_hard_links_cannot_commit_and_says_so(tmp_path, monkeypatch):
    """The exclusive commit links the manifest into place; where link() is refused the error
    names that, and nothing is left. Any other failure (here: no permission to make the temp
    file) stays what it is."""
    backend = LocalBackend(tmp_path)

    def no_links(source: str, target: Path) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with pytest.raises(StoreError, match="refused a hard link"):
        backend.write_small("ckpt-000000000001/manifest.json", b"{}", exclusive=True)
    assert every_entry(tmp_path) == ["ckpt-000000000001"]

    def no_temp_files(**kwargs: object) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", no_temp_files)
    with pytest.raises(PermissionError):
        backend.write_small("ckpt-000000000002/manifest.json", b"{}", exclusive=True)
