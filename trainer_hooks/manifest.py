"""The manifest: the commit marker of a checkpoint, written after every payload file.

A checkpoint exists only when its manifest exists and every file it lists has the listed size
and SHA-256. File names are plain relative names (no ``..``, no absolute paths, no backslashes)
so that a hostile manifest cannot make a reader write or read outside the checkpoint.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from typing import Any

from spotguard.errors import CorruptCheckpoint
from spotguard.protocol import format_time, parse_time

MANIFEST_NAME = "manifest.json"
FORMAT = 1
KINDS = ("periodic", "emergency", "final")
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_name(name: str) -> str:
    """Refuse names that could escape the checkpoint's directory or prefix."""
    if (
        not isinstance(name, str)
        or not SAFE_NAME.match(name)
        or any(part in (".", "..") for part in name.split("/"))
        or name == MANIFEST_NAME
    ):
        raise CorruptCheckpoint(f"unsafe checkpoint file name {name!r}")
    return name


def step_dir(step: int) -> str:
    return f"ckpt-{step:012d}"


def parse_step_dir(name: str) -> int | None:
    match = re.fullmatch(r"ckpt-(\d{12})", name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


def _versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "spotguard": version("spotguard"),
        "torch": version("torch"),
        "python": platform.python_version(),
    }


@dataclass(frozen=True)
class Manifest:
    step: int
    epoch: int
    kind: str
    created_at: datetime
    files: dict[str, FileEntry]
    versions: dict[str, str | None] = field(default_factory=_versions)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CorruptCheckpoint(f"checkpoint kind {self.kind!r} is not one of {KINDS}")
        if self.step < 0 or self.epoch < 0:
            raise CorruptCheckpoint("checkpoint step and epoch must be >= 0")
        for name in self.files:
            check_name(name)

    def to_bytes(self) -> bytes:
        payload = {
            "format": FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "kind": self.kind,
            "created_at": format_time(self.created_at),
            "files": {
                name: {"size": entry.size, "sha256": entry.sha256}
                for name, entry in sorted(self.files.items())
            },
            "versions": self.versions,
            "extra": self.extra,
        }
        return json.dumps(payload, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            payload = json.loads(data)
            if payload.get("format") != FORMAT:
                raise ValueError(f"unknown manifest format {payload.get('format')!r}")
            files = {}
            for name, entry in payload["files"].items():
                size, digest = entry["size"], entry["sha256"]
                if not isinstance(size, int) or size < 0 or not SHA256.match(str(digest)):
                    raise ValueError(f"bad size or checksum for {name!r}")
                files[check_name(name)] = FileEntry(size, digest)
            return cls(
                step=int(payload["step"]),
                epoch=int(payload["epoch"]),
                kind=str(payload["kind"]),
                created_at=parse_time(payload["created_at"]),
                files=files,
                versions=dict(payload.get("versions") or {}),
                extra=dict(payload.get("extra") or {}),
            )
        except CorruptCheckpoint as exc:
            raise CorruptCheckpoint(f"{where}: {exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptCheckpoint(f"{where}: malformed manifest ({exc})") from None
