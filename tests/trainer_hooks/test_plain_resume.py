"""SpotGuard in a real training process: real signals, exit 75, bit-exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch

from spotguard.trainer_hooks import CheckpointStore
from tests.support import wait_for
from tests.trainer_hooks.agent_double import AgentDouble

SCRIPT = Path(__file__).with_name("train_plain.py")


def train(store: str, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--store", store, "--out", str(out), *extra],
        env={**os.environ, **(env or {})},
    )


def steps_done(progress: Path) -> int:
    """The last step the trainer recorded; 0 before it wrote a whole line.

    The trainer opens the file for appending before it writes, so a reader can find it
    empty (CI did once): only lines that end in a newline count.
    """
    text = progress.read_text() if progress.exists() else ""
    whole = text[: text.rfind("\n") + 1].split()
    return int(whole[-1]) if whole else 0


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), f"{name} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    out = folder / "final.pt"
    assert train(str(folder / "store"), out).wait(120) == 0
    return out


@pytest.mark.parametrize(
    ("stop_at", "signum"),
    [(5, signal.SIGUSR1), (12, signal.SIGUSR1), (23, signal.SIGTERM)],
    ids=["mid-epoch", "epoch-boundary", "sigterm-mid-epoch"],
)
def test_interrupted_run_resumes_bit_exact(tmp_path, reference, stop_at, signum):
    store, progress = str(tmp_path / "store"), tmp_path / "progress"
    first = train(store, tmp_path / "unused.pt", "--progress", str(progress),
                  "--pause-at", str(stop_at))  # fmt: skip
    wait_for(lambda: steps_done(progress) >= stop_at, timeout=60, what=f"step {stop_at}")
    first.send_signal(signum)
    assert first.wait(60) == 75
    latest = CheckpointStore(store).latest()
    assert latest.step == stop_at
    assert latest.kind == "emergency"

    out = tmp_path / "final.pt"
    assert train(store, out, "--progress", str(progress)).wait(120) == 0
    assert_same_weights(out, reference)
    assert steps_done(progress) == 36  # the resumed run did not redo or skip a step


def test_notice_file_stops_training_and_the_agent_protocol_holds(tmp_path, reference):
    state_dir = tmp_path / "run-spotguard"
    agent = AgentDouble(state_dir)
    store, progress = str(tmp_path / "store"), tmp_path / "progress"
    env = {"SPOTGUARD_STATE_DIR": str(state_dir)}
    first = train(store, tmp_path / "unused.pt", "--progress", str(progress),
                  "--step-sleep", "0.05", env=env)  # fmt: skip
    assert agent.wait_registered(1)[first.pid]["signal"] == "SIGUSR1"
    wait_for(lambda: steps_done(progress) >= 3, timeout=60, what="a few steps")
    deadline = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
    notice = {"version": 1, "id": f"spot-interruption/{deadline}", "kind": "spot-interruption",
              "action": "terminate", "deadline": deadline, "noticed_at": deadline,
              "source": "imds"}  # fmt: skip
    (state_dir / "notice.json").write_text(json.dumps(notice))
    assert first.wait(60) == 75
    stopped_at = CheckpointStore(store).latest().step
    assert agent.exit_of(first.pid)["code"] == 75
    assert agent.exits[first.pid]["step"] == stopped_at
    wait_for(lambda: not agent.registered, what="the registration to end with the process")
    agent.close()
    stopped_at = CheckpointStore(store).latest().step
    assert 3 <= stopped_at < 36

    (state_dir / "notice.json").unlink()  # the replacement instance has no notice
    out = tmp_path / "final.pt"
    assert train(store, out, env=env).wait(120) == 0
    assert_same_weights(out, reference)


def test_interrupted_while_a_periodic_upload_is_in_flight(
    tmp_path, reference, faulty_s3, moto_server
):
    bucket, proxy = faulty_s3
    proxy.latency = 0.25  # every S3 request is slow: the step-5 upload is still running at 6
    store, progress = f"s3://{bucket}/run", tmp_path / "progress"
    first = train(store, tmp_path / "unused.pt", "--progress", str(progress), "--pause-at", "6")
    wait_for(lambda: steps_done(progress) >= 6, timeout=60, what="step 6")
    direct = boto3.client("s3", endpoint_url=moto_server)  # around the slow proxy
    assert CheckpointStore(store, s3_client=direct).latest() is None, "step 5 already done"
    first.send_signal(signal.SIGUSR1)
    assert first.wait(120) == 75
    committed = [(m.step, m.kind) for m in CheckpointStore(store).list()]
    assert committed == [(5, "periodic"), (6, "emergency")]

    proxy.latency = 0.0
    out = tmp_path / "final.pt"
    assert train(store, out).wait(120) == 0
    assert_same_weights(out, reference)
