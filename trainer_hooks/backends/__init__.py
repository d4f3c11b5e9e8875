"""Where checkpoint bytes live: the seam between :class:`~spotguard.trainer_hooks.CheckpointStore`
and a storage service, in the spirit of httpx's transports.

A backend moves opaque objects under keys ``<checkpoint dir>/<file name>`` relative to its
root; the store builds the commit protocol, checksums and verification on top. Three come with
spotguard::

    LocalBackend    a directory (``/path``, ``file:///path``): spool file + fsync + rename
    S3Backend       an ``s3://bucket/prefix``: boto3's transfer manager, parallel multipart
    MemoryBackend   a dict in this process, for unit tests of code that uses a store

``CheckpointStore("s3://...")`` picks one from the URI (:func:`backend_for_uri`);
``CheckpointStore(MemoryBackend())`` or ``CheckpointStore(S3Backend(..., client=...))`` takes
the one given. What any backend must offer, :class:`Backend` (and the :class:`Sink` its streams
write to), is in :mod:`.base`.
"""

from __future__ import annotations

from typing import Any

from spotguard.errors import ConfigError, StoreError
from spotguard.trainer_hooks._internals.store_uri import parse_store_uri
from spotguard.trainer_hooks.backends.base import Backend, Sink
from spotguard.trainer_hooks.backends.local import LocalBackend
from spotguard.trainer_hooks.backends.memory import MemoryBackend
from spotguard.trainer_hooks.backends.s3 import S3Backend
from spotguard.trainer_hooks.settings import TransferSettings

__all__ = ["Backend", "LocalBackend", "MemoryBackend", "S3Backend", "Sink", "backend_for_uri"]


def backend_for_uri(
    uri: str, transfer: TransferSettings | None = None, s3_client: Any = None
) -> Backend:
    """The backend a store URI names: a local path, ``file:///path`` or ``s3://bucket/prefix``;
    :class:`StoreError` for one that names none of them."""
    try:
        where = parse_store_uri(uri)
    except ConfigError as exc:  # the store cannot be used, as with a missing bucket
        raise StoreError(str(exc)) from None
    if where.directory is not None:
        return LocalBackend(where.directory)
    return S3Backend(where.bucket, where.prefix, transfer or TransferSettings(), s3_client)
