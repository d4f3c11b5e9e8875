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

from spotguard.errors import CorruptCheckpoint, UnloadableCheckpoint
from spotguard.protocol import MANIFEST_NAME, format_time, parse_time

__all__ = [
    "FORMATS",
    "KINDS",
    "QUARANTINE_NAME",
    "VERSIONS",
    "WHOLE_STATE_FILE",
    "FileEntry",
    "Manifest",
    "Writer",
    "check_name",
]

#: Put beside the payload of a checkpoint that failed verification, in place of its manifest
#: (:data:`~spotguard.protocol.MANIFEST_NAME`: the store's directory and manifest names are
#: the protocol's, as readers outside the hooks look for them too).
QUARANTINE_NAME = "quarantined.json"
#: The file holding the whole state of a ``torch`` checkpoint (rank 0's): what
#: :meth:`~spotguard.trainer_hooks.CheckpointStore.resume` and ``load_state`` load by default.
WHOLE_STATE_FILE = "state.pt"
#: The manifest's own schema version, per format: 2 for ``torch`` checkpoints (what every
#: spotguard reads), 3 for ``dcp``. A spotguard that knows only version 2 raises
#: :class:`UnloadableCheckpoint` for a version 3 manifest (never quarantined), where a version
#: 2 manifest with a format it does not know would fail its check as corrupt: quarantined for
#: good, and an older checkpoint resumed instead.
VERSIONS = {"torch": 2, "dcp": 3}
KINDS = ("periodic", "emergency", "final")
#: How the payload is laid out: ``torch``, one ``torch.save`` file per rank; ``dcp``, the
#: shards of ``torch.distributed.checkpoint`` written by every rank (plus its metadata file),
#: resharded on load to any world size.
FORMATS = ("torch", "dcp")
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_name(name: str) -> str:
    """Refuse names that could escape the checkpoint's directory or prefix."""
    if (
        not isinstance(name, str)
        or not SAFE_NAME.match(name)
        or any(part in (".", "..") for part in name.split("/"))
        or name in (MANIFEST_NAME, QUARANTINE_NAME)
    ):
        raise CorruptCheckpoint(f"unsafe checkpoint file name {name!r}")
    return name


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Writer:
    """Who wrote a checkpoint: one process's session on one host. ``id`` is new for every
    process that writes, so two launches of the same job on one prefix tell each other apart."""

    id: str
    host: str
    pid: int
    started_at: float

    def describe(self) -> str:
        return f"{self.host} pid {self.pid} (writer {self.id[:8]})"

    @classmethod
    def from_json(cls, payload: Any) -> Writer:
        return cls(
            id=str(payload["id"]),
            host=str(payload["host"]),
            pid=int(payload["pid"]),
            started_at=float(payload["started_at"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "host": self.host, "pid": self.pid, "started_at": self.started_at}


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
    writer: Writer | None = None
    #: The step the writing run resumed from (``None``: it started fresh).
    resumed_from: int | None = None
    world_size: int = 1
    format: str = "torch"
    versions: dict[str, str | None] = field(default_factory=_versions)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CorruptCheckpoint(f"checkpoint kind {self.kind!r} is not one of {KINDS}")
        if self.step < 0 or self.epoch < 0:
            raise CorruptCheckpoint("checkpoint step and epoch must be >= 0")
        if self.format not in FORMATS:  # from_bytes refuses it first: UnloadableCheckpoint
            raise ValueError(f"checkpoint format {self.format!r} is not one of {FORMATS}")
        if self.world_size < 1:
            raise CorruptCheckpoint("checkpoint world size must be >= 1")
        for name in self.files:
            check_name(name)

    def size_mismatch(self, sizes: dict[str, int]) -> tuple[str, int | None] | None:
        """The first listed file whose size in ``sizes`` (a listing) differs from the
        manifest's, with the size found (``None``: missing); ``None`` when all match."""
        for name, entry in self.files.items():
            if sizes.get(name) != entry.size:
                return name, sizes.get(name)
        return None

    def to_bytes(self) -> bytes:
        payload = {
            "version": VERSIONS[self.format],
            "format": self.format,
            "world_size": self.world_size,
            "writer": self.writer.to_json() if self.writer else None,
            "resumed_from": self.resumed_from,
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
            if isinstance(payload, dict) and "step" in payload:
                _check_version(payload, where)
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
                writer=Writer.from_json(payload["writer"]) if payload.get("writer") else None,
                resumed_from=(
                    int(payload["resumed_from"])
                    if payload.get("resumed_from") is not None
                    else None
                ),
                world_size=int(payload.get("world_size", 1)),
                format=str(payload.get("format", "torch")),
                versions=dict(payload.get("versions") or {}),
                extra=dict(payload.get("extra") or {}),
            )
        except CorruptCheckpoint as exc:
            raise CorruptCheckpoint(f"{where}: {exc}") from None
        except UnloadableCheckpoint:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptCheckpoint(f"{where}: malformed manifest ({exc})") from None


def _check_version(payload: dict[str, Any], where: str) -> None:
    """Another spotguard wrote a manifest of another version or format: the checkpoint may be
    fine, this one cannot load it. :class:`UnloadableCheckpoint`, never quarantined."""
    version, layout = payload.get("version"), payload.get("format", "torch")
    if version not in VERSIONS.values():
        raise UnloadableCheckpoint(
            f"{where}: manifest version {version!r}, this spotguard reads versions "
            f"{sorted(set(VERSIONS.values()))}: use the spotguard that wrote it"
        )
    if VERSIONS.get(layout) != version:
        raise UnloadableCheckpoint(
            f"{where}: checkpoint format {layout!r} in a version {version} manifest; this "
            f"spotguard reads {', '.join(f'{f!r} (version {v})' for f, v in VERSIONS.items())}:"
            " use the spotguard that wrote it"
        )
