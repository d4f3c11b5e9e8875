"""Which store a URI names, decided in one place: a local path, ``file:///path`` or
``s3://bucket/prefix``.

:func:`~spotguard.trainer_hooks.backends.backend_for_uri` opens what it names;
:class:`~spotguard.trainer_hooks.GuardSettings` checks the same rule when a guard is built, so
that a URI no backend takes is a :class:`~spotguard.errors.ConfigError` before training starts,
not a failure at the first save.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from spotguard.errors import ConfigError

__all__ = ["StoreLocation", "parse_store_uri"]

_KINDS = "use a local path, file:///path or s3://bucket/prefix"


@dataclass(frozen=True)
class StoreLocation:
    """Where a store URI points: a local ``directory``, or (``directory`` ``None``) an S3
    ``bucket`` and the ``prefix`` in it."""

    directory: Path | None
    bucket: str = ""
    prefix: str = ""


def parse_store_uri(uri: str) -> StoreLocation:
    """Where ``uri`` points; :class:`ConfigError` naming it when no backend takes it."""
    if not isinstance(uri, str):
        raise ConfigError(f"store URI must be a string, got {type(uri).__name__}; {_KINDS}")
    if not uri:
        raise ConfigError(f"store URI is empty; {_KINDS}")
    try:
        parts = urlsplit(uri)
    except ValueError as exc:  # an unbalanced bracket where the host goes
        raise ConfigError(f"store URI {uri!r}: {exc}; {_KINDS}") from None
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"store URI {uri!r} names no bucket: use s3://bucket/prefix")
        return StoreLocation(None, parts.netloc, parts.path)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"store URI {uri!r}: file:// URIs take no host, use file:///path")
        return StoreLocation(Path(parts.path))
    if parts.scheme == "" or len(parts.scheme) == 1:  # a path (or a Windows drive letter)
        try:
            return StoreLocation(Path(uri).expanduser().absolute())
        except RuntimeError as exc:  # ~someone, and no such user
            raise ConfigError(f"store URI {uri!r}: {exc}") from None
    raise ConfigError(f"store URI {uri!r}: unsupported scheme {parts.scheme!r}; {_KINDS}")
