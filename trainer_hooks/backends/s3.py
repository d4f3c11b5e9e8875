"""A checkpoint store under an S3 prefix, through boto3 (imported only when one is used)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from spotguard.errors import StoreError, WriterConflict
from spotguard.protocol import parse_step_dir
from spotguard.trainer_hooks._internals.streams import Pipe
from spotguard.trainer_hooks.backends.base import Sink
from spotguard.trainer_hooks.settings import TransferSettings

__all__ = ["S3Backend"]

MiB = 2**20
#: botocore's own switches for flexible checksums: when a user sets one, it is theirs.
_CHECKSUM_VARIABLES = ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")
log = logging.getLogger("spotguard.trainer_hooks.store")
#: S3's limit on the parts of one multipart upload.
_MAX_PARTS = 10_000


def _add_content_md5(request: Any, **_: Any) -> None:
    body = request.body
    if isinstance(body, bytes) and "Content-MD5" not in request.headers:
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        request.headers["Content-MD5"] = base64.b64encode(digest).decode()


class S3Backend:
    """An ``s3://bucket/prefix``, through boto3's standard credential chain and endpoint
    settings (``AWS_ENDPOINT_URL`` reaches a local S3 such as moto)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        settings: TransferSettings | None = None,
        client: Any = None,
    ) -> None:
        try:
            import boto3  # noqa: F401 - only to say so early when it is missing
        except ImportError:
            raise StoreError("s3:// stores need boto3: pip install 'spotguard[s3]'") from None
        settings = settings or TransferSettings()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        try:
            self.client = client or self.make_client(settings)
        except ValueError as exc:  # botocore: AWS_ENDPOINT_URL or the region is malformed
            raise StoreError(f"{self.uri}: cannot make an S3 client: {exc}") from None
        self.settings = settings

    @staticmethod
    def make_client(settings: TransferSettings) -> Any:
        """The S3 client spotguard uses: a session of its own (the shared default session
        caches credentials across stores), a connection pool sized to the transfer threads,
        botocore's "standard" retries.

        On an endpoint that is not AWS (``AWS_ENDPOINT_URL``: MinIO, Ceph RGW, s3rver, moto)
        botocore computes checksums only where the operation requires them, unless
        ``AWS_REQUEST_CHECKSUM_CALCULATION`` / ``AWS_RESPONSE_CHECKSUM_VALIDATION`` say
        otherwise: its default since 1.36 sends uploads over HTTPS as ``aws-chunked`` bodies
        with a checksum trailer, and servers that do not decode them store the framing inside
        the object. spotguard's own SHA-256 and read-back cover what those checksums would.
        """
        import boto3
        from botocore.config import Config

        session = boto3.session.Session()
        config = Config(
            retries={"mode": "standard", "max_attempts": settings.max_attempts},
            max_pool_connections=settings.threads + 4,
            tcp_keepalive=True,
        )
        client = session.client("s3", config=config)
        host = urlsplit(client.meta.endpoint_url).hostname or ""
        on_aws = host.endswith((".amazonaws.com", ".amazonaws.com.cn"))
        chosen = any(os.environ.get(name) for name in _CHECKSUM_VARIABLES)
        if on_aws or chosen:
            return client
        log.info("S3 endpoint %s is not AWS: checksums only where required", host)
        client = session.client(
            "s3",
            config=config.merge(
                Config(
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
            ),
        )
        # DeleteObjects must carry a checksum; botocore >= 1.36 sends CRC32 only, which older
        # MinIO and Ceph releases reject: add the Content-MD5 they expect.
        client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
        return client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn botocore's exceptions into one-line :class:`StoreError` messages."""
        from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            yield
        except NoCredentialsError:
            raise StoreError(
                f"{self.uri}: no AWS credentials found (instance profile, AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID)"
            ) from None
        except ClientError as exc:
            raise self._client_error(exc, action) from None
        except (S3UploadFailedError, S3TransferFailedError) as exc:
            # The transfer manager wraps the client's error; the code is in the original.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ClientError):
                raise self._client_error(cause, action) from None
            raise StoreError(f"{self.uri}: {action} failed: {exc}") from None
        except BotoCoreError as exc:
            raise StoreError(f"{self.uri}: {action} failed: {exc}") from None

    def _client_error(self, exc: Any, action: str) -> StoreError:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return StoreError(f"{self.uri}: bucket {self.bucket!r} does not exist")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StoreError(f"{self.uri}: access denied while trying to {action}")
        return StoreError(f"{self.uri}: {action} failed: {code or exc}")

    def listing(self) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {}
        root = f"{self.prefix}/" if self.prefix else ""
        with self._errors("list the store"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root
            )
            for page in pages:
                for item in page.get("Contents", []):
                    directory, _, name = item["Key"][len(root) :].partition("/")
                    if name and parse_step_dir(directory) is not None:
                        found.setdefault(directory, {})[name] = int(item["Size"])
        return found

    def directories(self) -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        found = []
        with self._errors("list the store"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root, Delimiter="/"
            )
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    name = common["Prefix"][len(root) :].rstrip("/")
                    if parse_step_dir(name) is not None:
                        found.append(name)
        return found

    def files(self, directory: str) -> dict[str, int]:
        root = f"{self._key(directory)}/"
        found: dict[str, int] = {}
        with self._errors(f"list {directory}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root
            )
            for page in pages:
                for item in page.get("Contents", []):
                    found[item["Key"][len(root) :]] = int(item["Size"])
        return found

    def read_small(self, key: str) -> bytes | None:
        with self._errors(f"read {key}"):
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except self.client.exceptions.NoSuchKey:
                return None  # deleted between listing and reading (a prune)
            data: bytes = answer["Body"].read()
            return data

    def write_small(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        if exclusive:
            self._conditional_put(key, data, {"IfNoneMatch": "*"})
            return
        with self._errors(f"write {key}"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def _conditional_put(self, key: str, data: bytes, condition: dict[str, str]) -> str:
        """A PUT only if ``condition`` holds; the new ETag. :class:`WriterConflict` when it
        does not, unless the object holds ``data`` already: botocore retries a PUT whose
        answer was lost, and the retry then meets our own first write."""
        from botocore.exceptions import ClientError

        for attempt in range(3):
            with self._errors(f"write {key}"):
                try:
                    answer = self.client.put_object(
                        Bucket=self.bucket, Key=self._key(key), Body=data, **condition
                    )
                    return str(answer["ETag"])
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code", "")
                    if code == "ConditionalRequestConflict" and attempt < 2:
                        time.sleep(0.2 * (attempt + 1))  # a concurrent conditional write
                        continue
                    if code not in (
                        "PreconditionFailed",
                        "ConditionalRequestConflict",
                        "NoSuchKey",
                    ):
                        raise
            current = self.read_tagged(key)
            if current is not None and current[0] == data:
                return current[1]
            raise WriterConflict(f"{self.uri}/{key} changed: two writers on one prefix")
        raise AssertionError("unreachable")

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        with self._errors(f"read {key}"):
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except self.client.exceptions.NoSuchKey:
                return None
            data: bytes = answer["Body"].read()
            return data, str(answer["ETag"])

    def write_tagged(self, key: str, data: bytes, *, expected: str | None) -> str:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        return self._conditional_put(key, data, condition)

    def _upload_config(self, size_hint: int | None) -> Any:
        """The transfer settings for one upload: parts grown to stay within S3's 10,000 (with
        room for the pickle's overhead over the tensors' bytes)."""
        from boto3.s3.transfer import TransferConfig

        part_size = self.settings.part_size
        if size_hint is not None:
            part_size = max(part_size, -(-size_hint // (_MAX_PARTS * 9 // 10) // MiB) * MiB)
        return TransferConfig(
            multipart_threshold=part_size,
            multipart_chunksize=part_size,
            max_concurrency=self.settings.threads,
        )

    def write(
        self, key: str, produce: Callable[[Sink], None], size_hint: int | None = None
    ) -> None:
        """Serialize and upload at once: ``produce`` runs in a thread of its own and writes into
        a pipe that the transfer manager reads part by part (parallel multipart upload,
        retries per part), so no spool file and no second pass over the data.

        A failed upload is aborted by the transfer manager; one cut short by a killed process
        stays invisible (and is cleaned by the bucket's lifecycle rule).
        """
        pipe = Pipe()
        failures: list[BaseException] = []

        def run_producer() -> None:
            try:
                produce(pipe.writer)
                pipe.finish()
            except BaseException as exc:  # handed to the upload, then re-raised below
                failures.append(exc)
                pipe.fail(exc)

        producer = threading.Thread(target=run_producer, name="spotguard-serialize", daemon=True)
        producer.start()
        try:
            with self._errors(f"upload {key}"):
                self.client.upload_fileobj(
                    pipe.reader, self.bucket, self._key(key), Config=self._upload_config(size_hint)
                )
        except BaseException:
            # The producer failed first (the pipe made the upload abort): its error is the news.
            if failures and not isinstance(failures[0], BrokenPipeError):
                raise failures[0] from None
            raise
        finally:
            pipe.close_reader()  # a producer still writing after a failed upload stops
            producer.join()
        if failures:
            raise failures[0]

    def download(self, key: str, sink: Sink, size_hint: int | None = None) -> None:
        with self._errors(f"download {key}"):
            self.client.download_fileobj(
                self.bucket, self._key(key), sink, Config=self._download_config(size_hint)
            )

    def _download_config(self, size_hint: int | None) -> Any:
        """Ranges of ``download_part_size``, ``threads`` at a time, into a sink written in
        order (it hashes as it goes). s3transfer 0.19 deadlocks such a download when it has
        more ranges than ``max_in_memory_download_chunks`` (the first range's callback waits
        for a window slot its own range holds): the window is sized to every range of the
        object, so the ranges that arrive early wait in memory instead (the sinks here keep
        up: a hash, a spool file)."""
        from boto3.s3.transfer import TransferConfig

        part = self.settings.download_part_size
        config = TransferConfig(
            multipart_threshold=part,
            multipart_chunksize=part,
            max_concurrency=self.settings.threads,
            max_io_queue=1000,
        )
        ranges = -(-size_hint // part) if size_hint is not None else _MAX_PARTS
        config.max_in_memory_download_chunks = max(ranges + 1, 10)
        return config

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
            with self._errors("delete old checkpoints"):
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
            errors = answer.get("Errors") or []
            if errors:  # DeleteObjects answers 200 and lists the keys it could not delete
                first = errors[0]
                raise StoreError(
                    f"{self.uri}: could not delete {len(errors)} object(s), e.g. "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip()
                )
