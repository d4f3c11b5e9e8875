"""S3 misbehaving between client and server, and processes killed mid-upload."""

from __future__ import annotations

import io
import os
import queue
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pytest
import torch

from spotguard.trainer_hooks import (
    CheckpointStore,
    SpotGuard,
    StoreError,
    TransferSettings,
    UploadFailed,
)
from tests.support import wait_for

MiB = 2**20
SMALL_PARTS = TransferSettings(part_size=5 * MiB, threads=2)
#: For failures meant to persist: give up after one retry instead of minutes of backoff.
IMPATIENT = TransferSettings(part_size=5 * MiB, threads=2, max_attempts=2)


def test_error_bursts_and_dropped_connections_are_retried(faulty_s3):
    bucket, proxy = faulty_s3
    store = CheckpointStore(f"s3://{bucket}/run", transfer=SMALL_PARTS)
    payload = os.urandom(11 * MiB)  # three parts
    proxy.fail(3, status=503)
    store.save(1, {"blob.bin": payload})
    proxy.drop(2)
    store.save(2, {"blob.bin": payload})
    assert proxy.faults == 5
    proxy.fail(2, status=500)
    sink = io.BytesIO()
    store.fetch(store.latest(), "blob.bin", sink)
    assert sink.getvalue() == payload
    assert [m.step for m in store.list()] == [1, 2]


def test_persistent_failure_fails_loudly_and_keeps_the_previous_checkpoint(faulty_s3):
    bucket, proxy = faulty_s3
    store = CheckpointStore(f"s3://{bucket}/run", transfer=IMPATIENT)
    store.save(1, {"blob.bin": b"good"})
    proxy.fail(-1, status=500)
    with pytest.raises(StoreError, match="failed") as caught:
        store.save(2, {"blob.bin": os.urandom(6 * MiB)})
    assert "\n" not in str(caught.value)
    proxy.heal()
    assert store.latest().step == 1


def test_background_failure_surfaces_at_the_next_save_and_at_exit(faulty_s3):
    bucket, proxy = faulty_s3
    model = torch.nn.Linear(4, 4)
    state = {"model": model}
    guard = SpotGuard(
        f"s3://{bucket}/run", every_n_steps=2, state_dir="/nonexistent", transfer=IMPATIENT
    )
    guard.restore(state)
    guard.step(2, state)
    guard._core.wait()
    proxy.fail(-1, status=500)
    guard.step(4, state)  # the upload starts and fails in the background
    guard._core.wait()
    assert guard._core.failed_saves == 1
    with pytest.raises(UploadFailed, match="background checkpoint save failed"):
        guard.step(6, state)
    proxy.heal()
    assert CheckpointStore(f"s3://{bucket}/run").latest().step == 2

    proxy.fail(-1, status=500)
    guard.step(8, state)
    with pytest.raises(UploadFailed):
        guard.close()  # a run never ends green with its last save missing


class SaveLoop:
    """``save_loop.py`` in a process of its own, its stdout read line by line without hanging."""

    def __init__(self, uri: str, hold_after: int, hold_mib: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("save_loop.py")), "--store", uri,
             "--hold-after", str(hold_after), "--hold-mib", str(hold_mib)],
            stdout=subprocess.PIPE, text=True, env=dict(os.environ),
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def expect(self, word: str) -> int:
        """The step of the next line, which must be ``word STEP``."""
        try:
            line = self.lines.get(timeout=120)  # only a no-hang bound
        except queue.Empty:
            pytest.fail(f"save_loop.py said nothing for 120 s (waiting for {word!r})")
        said, _, step = line.partition(" ")
        assert said == word, f"expected {word!r}, save_loop.py said {line!r}"
        return int(step)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def open_upload_with_parts(client, bucket: str, key: str) -> str | None:
    """The id of an unfinished multipart upload of ``key`` with at least one part stored."""
    for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", []):
        if upload["Key"] == key:
            listed = client.list_parts(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
            if listed.get("Parts"):
                return upload["UploadId"]
    return None


def test_sigkill_mid_upload_leaves_only_complete_checkpoints(s3):
    """A process SIGKILLed in the middle of a checkpoint's upload leaves the store with exactly
    the checkpoints committed before, all verifying, and the next process resumes after the
    newest of them.

    Each trial proves its fault happened: the helper commits 1-3 checkpoints, starts the next
    one (step N), streams part of ``state.bin`` into a multipart upload and stops there; it
    is killed only once S3 holds N's ``small.bin`` and a part of N's open multipart upload.
    After the kill N is not a checkpoint (``verify`` calls it never committed) while its
    upload is still open, and ``latest`` is N - 1, whose payload really is step N - 1's. The
    next trial's process must start at N: resume picks the newest committed checkpoint, which
    climbs above step 1 from the second trial on.
    """
    uri = f"s3://{s3}/killed"
    client = boto3.client("s3")
    rng = random.Random(42)
    committed = 0  # the newest committed step so far
    held_steps = []
    for trial in range(4):
        hold_after, hold_mib = rng.randint(1, 3), rng.randint(6, 11)
        helper = SaveLoop(uri, hold_after, hold_mib)
        try:
            for _ in range(hold_after):
                assert helper.expect("begin") == committed + 1, f"trial {trial}: bad resume"
                assert helper.expect("committed") == committed + 1
                committed += 1
            assert helper.expect("begin") == committed + 1
            held = helper.expect("holding")
            assert held == committed + 1
            key = f"killed/ckpt-{held:012d}/state.bin"
            upload_id = wait_for(
                lambda key=key: open_upload_with_parts(client, s3, key),
                timeout=60,
                what=f"a part of step {held}'s upload on S3",
            )
            small = client.head_object(Bucket=s3, Key=f"killed/ckpt-{held:012d}/small.bin")
            assert small["ContentLength"] == 100, f"trial {trial}: step {held}'s small.bin"
        finally:
            helper.kill()
        held_steps.append(held)

        store = CheckpointStore(uri)
        assert [m.step for m in store.list()] == list(range(1, committed + 1)), (
            f"trial {trial}: a committed checkpoint vanished or a half one appeared"
        )
        verified = {r.step: r.ok for r in store.verify()}
        assert verified == {**dict.fromkeys(range(1, committed + 1), True), held: False}
        (killed,) = store.verify(step=held)
        assert not killed.ok
        assert "never committed" in killed.problem
        assert open_upload_with_parts(client, s3, key) == upload_id, "the upload was mid-way"
        latest = store.latest()
        assert latest.step == committed
        sink = io.BytesIO()
        store.fetch(latest, "state.bin", sink)  # checksums verified on the way
        assert int.from_bytes(sink.getvalue()[:8], "big") == committed

    assert committed > 1
    assert held_steps == sorted(set(held_steps))
    # Every step held before was saved again, and committed, by the next trial's process.
    uncommitted = [r.step for r in CheckpointStore(uri).verify() if not r.ok]
    assert uncommitted == [held_steps[-1]]
