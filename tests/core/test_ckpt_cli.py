"""`spotguard ckpt` as an operator uses it, against local and S3 stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from spotguard.trainer_hooks import CheckpointStore


def spotguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spotguard", *args],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip


@pytest.fixture(params=["local", "s3"])
def filled(request, tmp_path) -> str:
    if request.param == "local":
        uri = str(tmp_path / "store")
    else:
        uri = f"s3://{request.getfixturevalue('s3')}/runs/r1"
    store = CheckpointStore(uri)
    for step in (10, 20, 30):
        store.save(step, {"state.pt": f"payload-{step}".encode(), "meta/info.json": b"{}"},
                   epoch=step // 10)  # fmt: skip
    return uri


def test_list_json_and_table(filled):
    result = spotguard("ckpt", "list", filled, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["step"] for row in rows] == [10, 20, 30]
    assert rows[0]["files"] == ["meta/info.json", "state.pt"]
    table = spotguard("ckpt", "list", filled).stdout
    assert "periodic" in table
    assert len(table.strip().splitlines()) == 4


def test_verify_reports_a_tampered_checkpoint_with_exit_1(filled, tmp_path):
    assert spotguard("ckpt", "verify", filled).returncode == 0
    key = "ckpt-000000000020/state.pt"
    if filled.startswith("s3://"):
        bucket, _, prefix = filled[5:].partition("/")
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=b"payload-2X")
    else:
        (Path(filled) / key).write_bytes(b"payload-2X")
    result = spotguard("ckpt", "verify", filled)
    assert result.returncode == 1
    assert "20  FAILED" in result.stdout
    assert spotguard("ckpt", "verify", filled, "--step", "30").returncode == 0


def test_prune_and_pull(filled, tmp_path):
    result = spotguard("ckpt", "prune", filled, "--keep-last", "2")
    assert result.returncode == 0
    assert "deleted steps: 10" in result.stdout
    dest = tmp_path / "pulled"
    result = spotguard("ckpt", "pull", filled, str(dest))
    assert result.returncode == 0, result.stderr
    assert (dest / "ckpt-000000000030" / "state.pt").read_bytes() == b"payload-30"
    assert (dest / "ckpt-000000000030" / "meta" / "info.json").read_bytes() == b"{}"
    assert spotguard("ckpt", "pull", filled, str(dest), "--step", "20").returncode == 0
    assert (dest / "ckpt-000000000020" / "state.pt").read_bytes() == b"payload-20"
    missing = spotguard("ckpt", "pull", filled, str(dest), "--step", "10")
    assert missing.returncode == 2
    assert "no committed checkpoint at step 10" in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ckpt", "list", "gs://x/y"], "unsupported scheme"),
        (["ckpt", "list", "s3://[x/y"], "Invalid IPv6 URL"),
        (["ckpt", "prune", "/tmp/x", "--keep-last", "0"], "keep_last"),
        (["ckpt", "verify"], "required"),
    ],
)
def test_errors_are_one_line_with_exit_2(args, message):
    result = spotguard(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_bucket_is_one_line_exit_2(s3):
    result = spotguard("ckpt", "list", "s3://no-such-bucket-anywhere/x")
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
