"""A checkpoint store in a local directory (or a mounted file system)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from spotguard.errors import StoreError
from spotguard.protocol import write_atomic
from spotguard.trainer_hooks._internals.streams import Sink

__all__ = ["LocalBackend"]

MiB = 2**20


class LocalBackend:
    """A directory. Payload files are renamed into place; the manifest is written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root)

    def listing(self) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {}
        if not self.root.is_dir():
            return found
        for directory in self.root.iterdir():
            if not directory.is_dir() or not directory.name.startswith("ckpt-"):
                continue
            found[directory.name] = {
                str(path.relative_to(directory)): path.stat().st_size
                for path in directory.rglob("*")
                if path.is_file() and not path.name.startswith(".")
            }
        return found

    def read_small(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def write_small(self, key: str, data: bytes) -> None:
        write_atomic(self.root / key, data)

    def write(
        self, key: str, produce: Callable[[Sink], None], size_hint: int | None = None
    ) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store directory {self.root}: {exc.strerror}") from None
        # A spool on the same filesystem as the store: publishing it is a rename.
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".spool-") as name:
            spool = Path(name) / "payload.part"
            with open(spool, "wb") as handle:
                produce(handle)
                handle.flush()
                os.fsync(handle.fileno())
            target = self.root / key
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(spool, target)

    def download(self, key: str, sink: Sink) -> None:
        with open(self.root / key, "rb") as source:
            shutil.copyfileobj(source, sink, 8 * MiB)

    def delete(self, keys: list[str]) -> None:
        directories = set()
        for key in keys:
            (self.root / key).unlink(missing_ok=True)
            directories.add((self.root / key).parent)
        for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty
