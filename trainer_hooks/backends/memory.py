"""An in-memory checkpoint store backend: the store's rules without a disk or a network.

For unit tests of code that uses a :class:`~spotguard.trainer_hooks.CheckpointStore` (the
``Dummy*`` twin of the real backends): ``CheckpointStore(MemoryBackend())``. It keeps the
contract the real ones keep (a write that fails leaves nothing under its key, a small write is
all-or-nothing) and counts the requests made, so a test can say how many a store operation
costs. It lives in one process: it is no way to share checkpoints between processes.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import Counter
from collections.abc import Callable

from spotguard.errors import StoreError, WriterConflict
from spotguard.protocol import parse_step_dir
from spotguard.trainer_hooks.backends.base import Sink

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """Objects in a dict, keyed ``<checkpoint dir>/<file name>``."""

    def __init__(self, name: str = "memory://") -> None:
        self.uri = name
        self.objects: dict[str, bytes] = {}
        #: Requests made, by operation (``listing``, ``read_small``, ``write``, ...).
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()

    def listing(self) -> dict[str, dict[str, int]]:
        self.requests["listing"] += 1
        found: dict[str, dict[str, int]] = {}
        with self._lock:
            for key, data in self.objects.items():
                directory, _, name = key.partition("/")
                if name and parse_step_dir(directory) is not None:
                    found.setdefault(directory, {})[name] = len(data)
        return found

    def directories(self) -> list[str]:
        self.requests["directories"] += 1
        with self._lock:
            directories = {key.partition("/")[0] for key in self.objects}
        return sorted(name for name in directories if parse_step_dir(name) is not None)

    def files(self, directory: str) -> dict[str, int]:
        self.requests["files"] += 1
        root = f"{directory}/"
        with self._lock:
            return {
                key[len(root) :]: len(data)
                for key, data in self.objects.items()
                if key.startswith(root)
            }

    def read_small(self, key: str) -> bytes | None:
        self.requests["read_small"] += 1
        with self._lock:
            return self.objects.get(key)

    def write_small(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        self.requests["write_small"] += 1
        with self._lock:
            if exclusive and key in self.objects:
                raise WriterConflict(f"{self.uri}{key} exists already: two writers on one prefix")
            self.objects[key] = bytes(data)

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        self.requests["read_tagged"] += 1
        with self._lock:
            data = self.objects.get(key)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def write_tagged(self, key: str, data: bytes, *, expected: str | None) -> str:
        self.requests["write_tagged"] += 1
        with self._lock:
            current = self.objects.get(key)
            tag = None if current is None else hashlib.sha256(current).hexdigest()
            if tag != expected:
                raise WriterConflict(f"{self.uri}{key} changed: another writer")
            self.objects[key] = bytes(data)
        return hashlib.sha256(data).hexdigest()

    def write(
        self, key: str, produce: Callable[[Sink], None], size_hint: int | None = None
    ) -> None:
        self.requests["write"] += 1
        buffer = io.BytesIO()
        produce(buffer)  # raises: nothing was stored under ``key``
        with self._lock:
            self.objects[key] = buffer.getvalue()

    def download(self, key: str, sink: Sink, size_hint: int | None = None) -> None:
        self.requests["download"] += 1
        with self._lock:
            data = self.objects.get(key)
        if data is None:
            raise StoreError(f"{self.uri}{key}: no such object")
        sink.write(data)

    def delete(self, keys: list[str]) -> None:
        self.requests["delete"] += 1
        with self._lock:
            for key in keys:
                self.objects.pop(key, None)
