"""A checkpoint store in a local directory (or a mounted file system)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

from spotguard.errors import StoreError, WriterConflict
from spotguard.protocol import parse_step_dir, write_atomic
from spotguard.trainer_hooks.backends.base import Sink

__all__ = ["LocalBackend"]

MiB = 2**20
#: What link() says on a file system without hard links (FUSE, SMB, mountpoint-s3).
_NO_HARD_LINKS = frozenset(
    {errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}
)


class LocalBackend:
    """A directory. Payload files are renamed into place; the manifest is written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root)

    def listing(self) -> dict[str, dict[str, int]]:
        return {directory: self.files(directory) for directory in self.directories()}

    def directories(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [
            d.name for d in self.root.iterdir() if d.is_dir() and parse_step_dir(d.name) is not None
        ]

    def files(self, directory: str) -> dict[str, int]:
        folder = self.root / directory
        if not folder.is_dir():
            return {}
        return {
            str(path.relative_to(folder)): path.stat().st_size
            for path in folder.rglob("*")
            if path.is_file() and not path.name.startswith(".")
        }

    def read_small(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def write_small(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        path = self.root / key
        if not exclusive:
            write_atomic(path, data)
            return
        try:
            # Complete in a temp file first, then linked into place: link() fails if the name
            # exists, so of two writers exactly one wins and nobody reads half a file.
            write_atomic(path, data, exclusive=True)
        except FileExistsError:
            raise WriterConflict(f"{path} exists already: two writers on one prefix") from None
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            raise StoreError(
                f"cannot commit {path}: the file system refused a hard link ({exc.strerror}); "
                "a local store needs one that supports them (mountpoint-s3 and some FUSE or SMB "
                "mounts do not: use s3:// instead)"
            ) from None

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        data = self.read_small(key)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def write_tagged(self, key: str, data: bytes, *, expected: str | None) -> str:
        # Compare and swap under an advisory lock: a local store is shared by the processes of
        # one host (or a file system with working locks).
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / f".{key}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                current = self.read_tagged(key)
                if (None if current is None else current[1]) != expected:
                    raise WriterConflict(f"{self.root / key} changed: another writer")
                write_atomic(self.root / key, data)
        except OSError as exc:  # no locks on this file system, no space, a stale handle
            raise StoreError(f"cannot write {self.root / key}: {exc.strerror or exc}") from None
        return hashlib.sha256(data).hexdigest()

    def write(
        self, key: str, produce: Callable[[Sink], None], size_hint: int | None = None
    ) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store directory {self.root}: {exc.strerror}") from None
        # Spooled at the store's root, on the same file system: publishing it is a rename, and
        # a save that fails or is killed leaves no checkpoint directory behind (one that
        # prune and verify would find half made).
        write_atomic(self.root / key, produce, spool_dir=self.root)

    def download(self, key: str, sink: Sink, size_hint: int | None = None) -> None:
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
