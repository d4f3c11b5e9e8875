"""``spotguard drill --budget``: a real timed save to the store, judged against two minutes."""

from __future__ import annotations

import json
import subprocess
import sys

import boto3
import pytest

from spotguard.sizes import human_size, parse_size
from spotguard.trainer_hooks import CheckpointStore


def budget(*args: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "spotguard", "drill", "--budget", "--probe-size", "8MiB",
         *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize(
    ("text", "size"),
    [("20GiB", 20 * 2**30), ("1.5 GB", 1_500_000_000), ("1048576", 2**20), ("64mib", 64 * 2**20)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (64 * 2**20, "64.0 MiB"),
        (3 * 2**30, "3.0 GiB"),
        (2 * 2**40, "2.0 TiB"),
        (5 * 2**50, "5120.0 TiB"),
    ],
)
def test_human_size(size, text):
    assert human_size(size) == text


@pytest.mark.parametrize("text", ["", "GiB", "12XB", "-1GiB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_a_tiny_state_fits_and_one_far_beyond_the_measured_throughput_does_not(tmp_path):
    """Outcomes only, never the formula: a state smaller than the probe the tool just saved
    fits (exit 0, ``fits``, no advice); one 1000 times what the measured throughput moves in
    the whole two-minute notice does not (exit 1, not ``fits``, advice), its estimate is
    larger and beyond the notice, and a longer step leaves less time for the save."""
    code, out, err = budget("--json", "--store", str(tmp_path), "--state-size", "1MiB")
    assert code == 0, err
    tiny = json.loads(out)
    assert tiny["fits"] is True
    assert tiny["advice"] == []
    assert 0 < tiny["estimated_save_seconds"] < tiny["available_seconds"] < 120
    assert list(tmp_path.iterdir()) == []  # the probe left nothing behind

    far_beyond = int(tiny["bytes_per_second"] * 120 * 1000)
    code, out, err = budget("--json", "--store", str(tmp_path), "--state-size",
                            str(far_beyond), "--step-seconds", "10")  # fmt: skip
    assert code == 1, out + err
    huge = json.loads(out)
    assert huge["state_bytes"] == far_beyond
    assert huge["fits"] is False
    assert huge["estimated_save_seconds"] > 120
    assert huge["estimated_save_seconds"] > tiny["estimated_save_seconds"]
    assert huge["available_seconds"] < tiny["available_seconds"]  # a 10 s step, not 2 s
    assert any(item.startswith("shard the save: with") for item in huge["advice"])
    assert any(item.startswith("save less: about") for item in huge["advice"])
    assert list(tmp_path.iterdir()) == []


def test_a_huge_state_does_not_fit_and_says_what_to_change(tmp_path):
    """The text report of a state no store moves in two minutes: the verdict and the advice."""
    code, out, err = budget("--store", str(tmp_path), "--state-size", "4096TiB",
                            "--step-seconds", "10")  # fmt: skip
    assert code == 1, err
    assert "does NOT fit" in out
    assert "a 10 s step" in out
    for advice in ("shard the save: with", "save less: about", "save more often"):
        assert advice in out


def test_sizes_from_the_newest_checkpoint_and_leaves_the_store_as_it_was(s3):
    uri = f"s3://{s3}/run"
    store = CheckpointStore(uri)
    store.save(5, {"state.pt": b"x" * 3000, "rank-1.pt": b"y" * 1000})
    before = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3)["Contents"]}
    code, out, err = budget("--json", "--store", uri)
    assert code == 0, err
    assert json.loads(out)["state_bytes"] == 4000
    after = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3)["Contents"]}
    assert after == before
    assert [m.step for m in store.list()] == [5]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--store is required"),
        (["--store", "{tmp}", "--state-size", "lots"], "size 'lots'"),
        (["--store", "{tmp}"], "has no checkpoint to size from: give --state-size"),
        (["--store", "{tmp}", "--state-size", "1GiB", "--step-seconds", "500"], "step seconds"),
    ],
)
def test_usage_errors_are_one_line(tmp_path, args, message):
    code, _, err = budget(*[arg.replace("{tmp}", str(tmp_path)) for arg in args])
    assert code == 2
    assert message in err
    assert err.strip().count("\n") == 0


def test_a_missing_bucket_is_a_one_line_error(s3):
    code, out, err = budget("--store", "s3://no-such-bucket-at-all/run", "--state-size", "1GiB")
    assert code == 2, out + err
    assert "no-such-bucket-at-all" in err
    assert err.strip().count("\n") == 0
