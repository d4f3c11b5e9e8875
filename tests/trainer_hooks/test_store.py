"""CheckpointStore against a local directory and against S3 (a moto server over HTTP)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
from importlib import metadata
from pathlib import Path

import boto3
import pytest
import torch

from spotguard.errors import ConfigError
from spotguard.trainer_hooks import (
    CheckpointStore,
    CorruptCheckpoint,
    StoreError,
    TransferSettings,
    VerifyResult,
)

MiB = 2**20


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3")
    return f"s3://{bucket}/runs/run-42"


class Raw:
    """Direct access to the bytes behind a store, to corrupt them the way the world does."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        if uri.startswith("s3://"):
            self.bucket, _, self.prefix = uri[5:].partition("/")
            self.client = boto3.client("s3")

    def put(self, key: str, data: bytes) -> None:
        if self.uri.startswith("s3://"):
            self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)
        else:
            path = Path(self.uri) / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def get(self, key: str) -> bytes:
        if self.uri.startswith("s3://"):
            return self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")[
                "Body"
            ].read()
        return (Path(self.uri) / key).read_bytes()


def tensor_state(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(64, 64, generator=generator), "step": seed, "name": "m"}


def save_state(store: CheckpointStore, step: int, **kwargs):
    state = tensor_state(step)
    return store.save(step, {"state.pt": lambda f: torch.save(state, f)}, **kwargs), state


def test_save_commit_list_and_load_round_trip(store_uri):
    store = CheckpointStore(store_uri)
    assert store.latest() is None
    save_state(store, 100, epoch=1)
    manifest, state = save_state(store, 200, epoch=2, kind="emergency", extra={"note": "x"})
    assert [m.step for m in store.list()] == [100, 200]
    latest = store.latest()
    assert latest == manifest
    assert latest.kind == "emergency"
    assert latest.extra == {"note": "x"}
    # The manifest records the versions that wrote it, read back from storage: exactly what
    # the installed distributions report (a missing or wrong version fails here).
    assert latest.versions == {
        "spotguard": metadata.version("spotguard"),
        "torch": metadata.version("torch"),
        "python": platform.python_version(),
    }
    loaded_manifest, loaded = store.load_state()
    assert loaded_manifest.step == 200
    assert torch.equal(loaded["weight"], state["weight"])
    assert loaded["step"] == 200
    _, older = store.load_state(step=100)
    assert older["step"] == 100
    assert {result.step: result.ok for result in store.verify()} == {100: True, 200: True}


def test_manifest_records_size_and_sha256(store_uri):
    store = CheckpointStore(store_uri)
    manifest = store.save(7, {"a.bin": b"hello", "sub/b.bin": b"world!"})
    raw = json.loads(Raw(store_uri).get("ckpt-000000000007/manifest.json"))
    assert raw["files"]["a.bin"] == {"size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}
    assert raw["step"] == 7
    assert raw["kind"] == "periodic"
    sink = io.BytesIO()
    store.fetch(manifest, "sub/b.bin", sink)
    assert sink.getvalue() == b"world!"


def test_uncommitted_upload_is_invisible(store_uri):
    store = CheckpointStore(store_uri)
    save_state(store, 100)
    Raw(store_uri).put("ckpt-000000000200/state.pt", b"half an upload")
    assert store.latest().step == 100
    assert [m.step for m in store.list()] == [100]
    results = {r.step: r for r in store.verify()}
    assert not results[200].ok
    assert "never committed" in results[200].problem


def test_tampered_payload_is_refused_and_resume_falls_back(store_uri, caplog):
    store = CheckpointStore(store_uri)
    save_state(store, 100)
    save_state(store, 200)
    raw = Raw(store_uri)
    data = bytearray(raw.get("ckpt-000000000200/state.pt"))
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    raw.put("ckpt-000000000200/state.pt", bytes(data))

    with pytest.raises(CorruptCheckpoint, match="does not match"):
        store.fetch(store.get(200), "state.pt", io.BytesIO())
    with caplog.at_level(logging.WARNING):
        manifest, state = store.load_state()
    assert manifest.step == 100
    assert state["step"] == 100
    assert "skipping checkpoint 200" in caplog.text
    assert {r.step: r.ok for r in store.verify()} == {100: True, 200: False}


def test_size_mismatch_and_step_mismatch_are_skipped(store_uri):
    store = CheckpointStore(store_uri)
    save_state(store, 100)
    save_state(store, 200)
    raw = Raw(store_uri)
    raw.put("ckpt-000000000200/state.pt", b"truncated")
    # A manifest copied into another checkpoint's directory still names step 100.
    raw.put("ckpt-000000000300/manifest.json", raw.get("ckpt-000000000100/manifest.json"))
    raw.put("ckpt-000000000300/state.pt", raw.get("ckpt-000000000100/state.pt"))
    assert [m.step for m in store.list()] == [100]


@pytest.mark.parametrize("name", ["../../escape.pt", "/etc/passwd", "a/../../b", "x\\..\\y"])
def test_manifest_with_escaping_names_is_rejected(store_uri, name):
    store = CheckpointStore(store_uri)
    save_state(store, 100)
    raw = Raw(store_uri)
    manifest = json.loads(raw.get("ckpt-000000000100/manifest.json"))
    manifest["step"] = 200
    manifest["files"] = {name: manifest["files"]["state.pt"]}
    raw.put("ckpt-000000000200/manifest.json", json.dumps(manifest).encode())
    assert store.latest().step == 100
    results = {r.step: r for r in store.verify()}
    assert "unsafe checkpoint file name" in results[200].problem
    with pytest.raises(CorruptCheckpoint, match="unsafe"):
        store.save(300, {name: b"x"})


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {Exploit.marker}",))


def test_pickled_code_is_never_executed(store_uri, tmp_path, caplog):
    Exploit.marker = tmp_path / "pwned"
    store = CheckpointStore(store_uri)
    save_state(store, 100)
    store.save(200, {"state.pt": lambda f: torch.save({"evil": Exploit()}, f)})
    assert store.latest().step == 200  # its checksums are fine: the content is the problem
    with caplog.at_level(logging.WARNING):
        manifest, state = store.load_state()
    assert not Exploit.marker.exists()
    assert manifest.step == 100
    assert state["step"] == 100
    assert "not weights-only data" in caplog.text


def test_prune_keeps_the_newest_and_clears_abandoned_uploads(store_uri):
    store = CheckpointStore(store_uri)
    for step in (100, 200, 300, 400):
        save_state(store, step)
    raw = Raw(store_uri)
    raw.put("ckpt-000000000150/state.pt", b"abandoned")
    raw.put("ckpt-000000000500/state.pt", b"in flight")
    assert store.prune(keep_last=2) == [100, 150, 200]
    assert [m.step for m in store.list()] == [300, 400]
    assert store.verify(step=500)[0].problem.startswith("no manifest")
    assert store.prune(keep_last=1) == [300]
    with pytest.raises(ConfigError, match="keep_last must be >= 1"):
        store.prune(keep_last=0)
    assert [m.step for m in store.list()] == [400]


def test_multipart_upload_and_ranged_download(s3):
    store = CheckpointStore(
        f"s3://{s3}/big",
        transfer=TransferSettings(part_size=5 * MiB, download_part_size=4 * MiB, threads=4),
    )
    payload = bytes(range(256)) * (12 * MiB // 256)
    manifest = store.save(1, {"blob.bin": payload})
    head = boto3.client("s3").head_object(Bucket=s3, Key="big/ckpt-000000000001/blob.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    sink = io.BytesIO()
    store.fetch(manifest, "blob.bin", sink)
    assert sink.getvalue() == payload


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "empty"),
        ("gs://bucket/x", "unsupported scheme 'gs'"),
        ("s3://", "names no bucket"),
        ("file://host/x", "take no host"),
        ("s3://[bucket/x", "Invalid IPv6 URL"),
    ],
)
def test_bad_uris_are_one_line_errors(uri, message):
    with pytest.raises(StoreError, match=message) as caught:
        CheckpointStore(uri)
    assert "\n" not in str(caught.value)


def test_missing_bucket_and_missing_credentials(s3, monkeypatch):
    with pytest.raises(StoreError, match="does not exist"):
        CheckpointStore("s3://no-such-bucket-here/x").latest()
    # An upload goes through the transfer manager, which wraps the client's error.
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        CheckpointStore("s3://no-such-bucket-here/x").put(1, "state.pt", b"payload")
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(variable)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match="no AWS credentials"):
        CheckpointStore(f"s3://{s3}/x").latest()


def test_a_size_hint_grows_the_parts_to_stay_within_s3s_10000(s3):
    store = CheckpointStore(f"s3://{s3}/run", transfer=TransferSettings(part_size=5 * MiB))
    data = bytes(range(256)) * (12 * MiB // 256)
    client = boto3.client("s3")

    def parts(step: int) -> int:
        head = client.head_object(Bucket=s3, Key=f"run/ckpt-{step:012d}/blob.bin")
        return int(head["ETag"].strip('"').rpartition("-")[2])

    store.put(1, "blob.bin", lambda handle: handle.write(data))
    # What a 90,000 MiB file needs: 10 MiB parts (with room to spare below 10,000 of them).
    store.put(2, "blob.bin", lambda handle: handle.write(data), size_hint=90_000 * MiB)
    assert (parts(1), parts(2)) == (3, 2)


def test_a_payload_that_fails_midway_leaves_nothing_on_s3(s3):
    """Serialization streams into the multipart upload: a failure aborts it, nothing lands."""
    store = CheckpointStore(f"s3://{s3}/run", transfer=TransferSettings(part_size=5 * MiB))

    def payload(handle):
        handle.write(b"x" * (12 * MiB))  # two parts already on their way
        raise ValueError("cannot pickle this")

    with pytest.raises(ValueError, match="cannot pickle this"):
        store.put(3, "state.pt", payload)
    client = boto3.client("s3")
    assert "Contents" not in client.list_objects_v2(Bucket=s3)
    assert client.list_multipart_uploads(Bucket=s3).get("Uploads", []) == []


def test_a_streamed_multipart_payload_round_trips_with_its_checksum(s3):
    store = CheckpointStore(f"s3://{s3}/run", transfer=TransferSettings(part_size=5 * MiB))
    data = bytes(range(256)) * (70 * 1024)  # 17.5 MiB: four parts
    entry = store.put(1, "blob.bin", lambda handle: handle.write(data))
    assert entry.size == len(data)
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    store.commit(1, {"blob.bin": entry})
    assert store.verify() == [VerifyResult(1, True)]
