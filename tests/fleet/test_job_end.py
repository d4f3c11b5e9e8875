"""A finished or broken job ends its fleet; a preempted one comes back (issue 14, item 9).

``spotguard fleet job-end`` runs as the training unit's ``ExecStopPost=`` would run it: a real
process with systemd's ``EXIT_CODE``/``EXIT_STATUS``, against a moto server over HTTP (plus
the ``ModifyFleet`` moto lacks: ``moto_modify_fleet.py``), with ``systemctl`` and
``journalctl`` faked on ``PATH`` so that "power off" is recorded instead of done.
``spotguard fleet wait-clear`` (the unit's ``ExecStartPre=``) is run against notice files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from spotguard.errors import SpotguardError
from spotguard.fleet import job_end
from spotguard.fleet.job_end import JobEnd
from spotguard.fleet.resume_gate import wait_until_clear
from spotguard.protocol import Notice, write_notice
from tests.conftest import free_port, wait_until_listening

SHIM = Path(__file__).with_name("moto_modify_fleet.py")
JOB = "llm-job"
UNIT = f"spotguard-training@{JOB}.service"

SYSTEMD_RUN = r"""#!/bin/bash
echo "systemd-run $*" >> "$CALLS"
"""
SYSTEMCTL = r"""#!/bin/bash
echo "systemctl $*" >> "$CALLS"
case "$1" in
  is-system-running) cat "$SANDBOX/system-state" 2>/dev/null || echo running ;;
  list-jobs) cat "$SANDBOX/jobs" 2>/dev/null ;;
esac
exit 0
"""
JOURNALCTL = r"""#!/bin/bash
echo "journalctl $*" >> "$CALLS"
printf 'step 10\nTraceback (most recent call last):\nRuntimeError: CUDA error: out of memory\n'
"""


@pytest.fixture(scope="module")
def moto_ec2():
    """A moto server with ModifyFleet; yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(SHIM), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until_listening(process, port, "the moto server with ModifyFleet")
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


def _client(service: str, url: str):
    return boto3.client(
        service,
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def fleet(moto_ec2, tmp_path):
    """A maintain fleet of one spot instance, tagged by "EC2" with its fleet ID, a status
    bucket, and a sandbox: fake systemctl/journalctl, a state dir, the job-end environment."""
    ec2, s3 = _client("ec2", moto_ec2), _client("s3", moto_ec2)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    template = ec2.create_launch_template(
        LaunchTemplateName=f"lt-{tmp_path.name}"[:120],
        LaunchTemplateData={"ImageId": ami, "InstanceType": "g5.xlarge"},
    )["LaunchTemplate"]["LaunchTemplateId"]
    fleet_id = ec2.create_fleet(
        Type="maintain",
        ExcessCapacityTerminationPolicy="termination",
        LaunchTemplateConfigs=[
            {"LaunchTemplateSpecification": {"LaunchTemplateId": template, "Version": "$Latest"}}
        ],
        TargetCapacitySpecification={"TotalTargetCapacity": 1, "DefaultTargetCapacityType": "spot"},
    )["FleetId"]
    (instance,) = ec2.describe_fleet_instances(FleetId=fleet_id)["ActiveInstances"]
    instance_id = instance["InstanceId"]
    # EC2 Fleet tags every instance it launches with its ID; moto does not.
    ec2.create_tags(Resources=[instance_id], Tags=[{"Key": "aws:ec2:fleet-id", "Value": fleet_id}])
    bucket = f"status-{tmp_path.name.lower().replace('_', '-')}"[:60].rstrip("-")
    s3.create_bucket(Bucket=bucket)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"systemctl": SYSTEMCTL, "journalctl": JOURNALCTL, "systemd-run": SYSTEMD_RUN}
    for name, body in stubs.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "SANDBOX": str(tmp_path),
        "CALLS": str(tmp_path / "calls.log"),
        "AWS_ENDPOINT_URL": moto_ec2,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        # As the user data writes them into /etc/spotguard/training-<job>.env:
        "AWS_DEFAULT_REGION": "us-east-1",
        "SPOTGUARD_STATUS_URI": f"s3://{bucket}/spotguard/status/{JOB}.json",
        "SPOTGUARD_INSTANCE_ID": instance_id,
        "SPOTGUARD_MAX_FAILURES": "3",
        # The agent's state dir, where the notice file is.
        "SPOTGUARD_STATE_DIR": str(tmp_path / "run"),
    }
    (tmp_path / "run").mkdir()
    return {
        "ec2": ec2,
        "s3": s3,
        "fleet_id": fleet_id,
        "instance_id": instance_id,
        "bucket": bucket,
        "env": env,
        "tmp": tmp_path,
    }


def _end(
    fleet, exit_code: str, exit_status: str, result: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**fleet["env"], "EXIT_CODE": exit_code, "EXIT_STATUS": exit_status}
    if result is None:
        result = "success" if exit_status == "0" else "exit-code"
    env["SERVICE_RESULT"] = result
    state = fleet["tmp"] / "state"
    return subprocess.run(
        [sys.executable, "-m", "spotguard", "fleet", "job-end", JOB, "--state-dir", str(state)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _calls(fleet) -> list[str]:
    path = fleet["tmp"] / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


def _capacity(fleet) -> int:
    (described,) = fleet["ec2"].describe_fleets(FleetIds=[fleet["fleet_id"]])["Fleets"]
    return int(described["TargetCapacitySpecification"]["TotalTargetCapacity"])


def _state(fleet) -> str:
    (reservation,) = fleet["ec2"].describe_instances(InstanceIds=[fleet["instance_id"]])[
        "Reservations"
    ]
    return str(reservation["Instances"][0]["State"]["Name"])


def _status(fleet) -> dict:
    body = fleet["s3"].get_object(Bucket=fleet["bucket"], Key=f"spotguard/status/{JOB}.json")
    return json.loads(body["Body"].read())


def _no_status(fleet) -> bool:
    listed = fleet["s3"].list_objects_v2(Bucket=fleet["bucket"], Prefix="spotguard/status/")
    return listed.get("KeyCount", 0) == 0


def test_exit_0_sets_the_fleet_to_zero_writes_finished_and_powers_off(fleet):
    assert _capacity(fleet) == 1
    done = _end(fleet, "exited", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"{UNIT}: finished")
    assert _capacity(fleet) == 0
    assert _state(fleet) == "terminated"  # the fleet removes its excess instance
    status = _status(fleet)
    assert status["state"] == "finished"
    assert status["fleet_id"] == fleet["fleet_id"]
    assert status["instance_id"] == fleet["instance_id"]
    assert status["fleet_capacity"] == 0
    assert "systemctl --no-block poweroff" in _calls(fleet)


def _rendezvous_host(fleet) -> str:
    """A running on-demand instance standing in for a multi-node job's rendezvous host."""
    ami = fleet["ec2"].describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    (host,) = fleet["ec2"].run_instances(
        ImageId=ami, InstanceType="t3.medium", MinCount=1, MaxCount=1
    )["Instances"]
    return str(host["InstanceId"])


def _instance_state(fleet, instance_id: str) -> str:
    (reservation,) = fleet["ec2"].describe_instances(InstanceIds=[instance_id])["Reservations"]
    return str(reservation["Instances"][0]["State"]["Name"])


def test_the_end_of_a_multi_node_job_stops_its_rendezvous_host(fleet):
    host = _rendezvous_host(fleet)
    fleet["env"]["SPOTGUARD_RENDEZVOUS_INSTANCE_ID"] = host
    _interrupted(fleet)
    assert _end(fleet, "exited", "75").returncode == 0  # a preemption: the host keeps serving
    assert _instance_state(fleet, host) == "running"
    (fleet["tmp"] / "run" / "notice.json").unlink()
    done = _end(fleet, "exited", "0")
    assert done.returncode == 0, done.stderr
    assert _capacity(fleet) == 0
    assert _instance_state(fleet, host) in ("stopping", "stopped")
    status = _status(fleet)
    assert (status["state"], status["rendezvous_host"]) == ("finished", "stopped")


def test_a_rendezvous_host_that_cannot_be_stopped_is_said_and_the_node_still_powers_off(fleet):
    fleet["env"]["SPOTGUARD_RENDEZVOUS_INSTANCE_ID"] = "i-0000000000000dead"
    done = _end(fleet, "exited", "0")
    assert done.returncode == 1
    assert "stopping the rendezvous host i-0000000000000dead failed" in done.stderr
    assert _capacity(fleet) == 0  # the fleet first: it is what bills
    status = _status(fleet)
    assert status["state"] == "finished"
    assert "i-0000000000000dead" in status["rendezvous_error"]
    assert "systemctl --no-block poweroff" in _calls(fleet)


def _interrupted(fleet) -> None:
    """The agent's notice file: a spot interruption, two minutes from now."""
    now = datetime.now(timezone.utc)
    notice = Notice(
        kind="spot-interruption",
        action="terminate",
        deadline=now + timedelta(minutes=2),
        noticed_at=now,
        key="k",
    )
    write_notice(fleet["tmp"] / "run", notice)


def test_exit_75_during_a_notice_leaves_the_fleet_alone(fleet):
    _interrupted(fleet)
    done = _end(fleet, "exited", "75")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("preempted")
    assert _capacity(fleet) == 1
    assert _state(fleet) == "running"
    assert _no_status(fleet)
    assert not any("poweroff" in call for call in _calls(fleet))


def test_a_crash_loop_ends_after_max_failures_with_the_last_error(fleet):
    for attempt in (1, 2):
        done = _end(fleet, "exited", "1")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith("retrying"), attempt
        assert _capacity(fleet) == 1
        assert not any("poweroff" in call for call in _calls(fleet))
    done = _end(fleet, "killed", "SEGV")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("failed")
    assert _capacity(fleet) == 0
    status = _status(fleet)
    assert status["state"] == "failed"
    assert status["failures"] == 3
    assert status["exit"] == "killed SEGV"
    assert "killed SEGV" in status["last_error"]
    assert status["log_tail"][-1] == "RuntimeError: CUDA error: out of memory"
    assert "systemctl --no-block poweroff" in _calls(fleet)


def test_a_preemption_between_failures_restarts_the_count(fleet):
    for code, status in (("exited", "1"), ("exited", "1"), ("exited", "75"), ("exited", "2")):
        if status == "75":
            _interrupted(fleet)
        elif (fleet["tmp"] / "run" / "notice.json").exists():
            (fleet["tmp"] / "run" / "notice.json").unlink()
        done = _end(fleet, code, status)
        assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("retrying")  # 1 failure since the preemption, not 3
    assert _capacity(fleet) == 1


def _commit(fleet, step: int, *, manifest: bool = True) -> None:
    """What the trainer hooks leave in the store: a checkpoint's files, then its manifest."""
    folder = f"runs/llm/ckpt-{step:012d}"
    fleet["s3"].put_object(Bucket=fleet["bucket"], Key=f"{folder}/state.pt", Body=b"x")
    if manifest:
        fleet["s3"].put_object(Bucket=fleet["bucket"], Key=f"{folder}/manifest.json", Body=b"{}")


def test_failures_after_a_newer_checkpoint_start_the_count_again(fleet):
    """A job that crashes now and then but commits checkpoints in between is making progress:
    three such crashes over a long run must not end it. Only failures with no newer committed
    checkpoint since the one before count towards the end."""
    fleet["env"]["SPOTGUARD_CHECKPOINT_URI"] = f"s3://{fleet['bucket']}/runs/llm"
    _commit(fleet, 100)
    # A longer run's checkpoints must not count for this one (runs/llm-7b is not runs/llm).
    fleet["s3"].put_object(
        Bucket=fleet["bucket"], Key="runs/llm-7b/ckpt-000000099999/manifest.json", Body=b"{}"
    )
    decisions = []
    for step in (None, 200, None, 300, None, None):
        if step is not None:
            _commit(fleet, step)
        done = _end(fleet, "exited", "1")
        assert done.returncode == 0, done.stderr
        decisions.append(done.stdout.strip().rsplit(" ", 1)[-1])
    # 1, progress -> 1, 2, progress -> 1, 2, 3 -> the end
    assert decisions == ["retrying"] * 5 + ["failed"]
    assert _capacity(fleet) == 0
    assert _status(fleet)["failures"] == 3


def test_an_uncommitted_checkpoint_or_an_unreadable_store_is_no_progress(fleet):
    fleet["env"]["SPOTGUARD_CHECKPOINT_URI"] = f"s3://{fleet['bucket']}/runs/llm"
    _commit(fleet, 100)
    assert _end(fleet, "exited", "1").stdout.strip().endswith("retrying")
    _commit(fleet, 200, manifest=False)  # files without a manifest: not committed
    # Nor is a manifest anywhere but at <uri>/ckpt-<step>/manifest.json.
    for key in ("runs/llm/ckpt-000000000200/x/ckpt-000000000900/manifest.json",
                "runs/llm/copied/ckpt-000000000900/manifest.json"):  # fmt: skip
        fleet["s3"].put_object(Bucket=fleet["bucket"], Key=key, Body=b"{}")
    assert _end(fleet, "exited", "1").stdout.strip().endswith("retrying")
    fleet["env"]["SPOTGUARD_CHECKPOINT_URI"] = "s3://no-such-bucket-anywhere/runs/llm"
    done = _end(fleet, "exited", "1")
    assert done.stdout.strip().endswith("failed"), done.stdout
    assert "could not look for new checkpoints" in done.stdout
    assert _capacity(fleet) == 0


@pytest.mark.parametrize(
    ("file", "content"),
    [("jobs", f"812 {UNIT} stop running\n"), ("system-state", "stopping\n")],
    ids=["systemctl-stop", "shutdown"],
)
def test_an_exit_0_during_a_requested_stop_is_not_the_end_of_the_job(fleet, file, content):
    (fleet["tmp"] / file).write_text(content)
    done = _end(fleet, "exited", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("stopped")
    assert _capacity(fleet) == 1
    assert _no_status(fleet)
    assert not any("poweroff" in call for call in _calls(fleet))


def test_exit_75_without_a_notice_is_a_failure(fleet):
    """The hooks exit 75 on any SIGTERM (a kill, OOMPolicy=stop): only a stopping notice makes
    it a preemption; otherwise a crash loop of 75s would never end."""
    for attempt in (1, 2):
        done = _end(fleet, "exited", "75")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith("retrying"), attempt
    done = _end(fleet, "exited", "75")
    assert done.stdout.strip().endswith("failed")
    assert _capacity(fleet) == 0
    assert _status(fleet)["exit"] == "exited 75 with no stopping notice active"


def test_an_oom_kill_is_a_failure_even_with_exit_75_and_a_stop_job_queued(fleet):
    """OOMPolicy=stop: systemd stops the unit (a stop job), the hooks save and exit 75, and
    $SERVICE_RESULT says oom-kill."""
    (fleet["tmp"] / "jobs").write_text(f"812 {UNIT} stop running\n")
    for attempt in (1, 2):
        done = _end(fleet, "exited", "75", "oom-kill")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith("retrying"), attempt
        assert _capacity(fleet) == 1
    done = _end(fleet, "exited", "75", "oom-kill")
    assert done.stdout.strip().endswith("failed")
    assert _capacity(fleet) == 0
    status = _status(fleet)
    assert status["exit"] == "oom-kill (exited 75)"
    assert "oom-kill" in status["last_error"]


@pytest.mark.parametrize("result", ["signal", "core-dump", "timeout", "watchdog", "oom-kill"])
def test_failure_results_count_even_during_a_notice(fleet, result):
    _interrupted(fleet)
    done = _end(fleet, "exited", "75", result)
    assert done.stdout.strip().endswith("retrying")
    state = json.loads((fleet["tmp"] / "state" / f"failures-{JOB}.json").read_text())
    assert state["failures"] == 1


def test_a_restart_asked_for_is_not_the_end_of_the_job(fleet):
    (fleet["tmp"] / "jobs").write_text(f"813 {UNIT} restart running\n")
    done = _end(fleet, "exited", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("stopped")
    assert _capacity(fleet) == 1
    assert _no_status(fleet)
    assert not (fleet["tmp"] / "state" / f"failures-{JOB}.json").exists()


def test_a_node_without_its_fleet_tag_still_powers_off_and_says_why(fleet):
    fleet["ec2"].delete_tags(Resources=[fleet["instance_id"]], Tags=[{"Key": "aws:ec2:fleet-id"}])
    done = _end(fleet, "exited", "0")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "has no aws:ec2:fleet-id tag; powering off anyway" in done.stderr
    status = _status(fleet)
    assert status["state"] == "finished"
    assert "aws:ec2:fleet-id" in status["end_error"]
    assert "systemctl --no-block poweroff" in _calls(fleet)


def test_job_end_names_a_missing_setting(fleet):
    env = {key: value for key, value in fleet["env"].items() if key != "SPOTGUARD_STATUS_URI"}
    done = subprocess.run(
        [sys.executable, "-m", "spotguard", "fleet", "job-end", JOB],
        env={**env, "EXIT_CODE": "exited", "EXIT_STATUS": "0"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr == "spotguard fleet job-end: status_uri: expected s3://bucket/key, got ''\n"


# -- the restart gate (ExecStartPre=spotguard fleet wait-clear) --------------------------------

NOW = datetime(2026, 11, 29, 8, 20, tzinfo=timezone.utc)


def _notice(kind: str, deadline: datetime | None) -> Notice:
    return Notice(kind=kind, action="x", deadline=deadline, noticed_at=NOW, key="k")


@pytest.mark.parametrize(
    ("kind", "deadline", "holds"),
    [
        ("spot-interruption", NOW + timedelta(minutes=2), True),
        ("asg-termination", None, True),
        ("scheduled-maintenance", NOW - timedelta(minutes=4), True),  # within the grace
        ("scheduled-maintenance", NOW - timedelta(minutes=6), False),  # a leftover
        ("rebalance-recommendation", None, False),  # never stops training
    ],
)
def test_the_gate_holds_only_for_an_active_stopping_notice(tmp_path, kind, deadline, holds):
    write_notice(tmp_path, _notice(kind, deadline))
    looks: list[float] = []

    def sleep(seconds: float) -> None:
        looks.append(seconds)
        if len(looks) == 3:  # the agent drops the notice meanwhile
            (tmp_path / "notice.json").unlink()

    said: list[str] = []
    held = wait_until_clear(tmp_path, interval=5, say=said.append, clock=lambda: NOW, sleep=sleep)
    assert held == (3 if holds else 0)
    if holds:
        assert len(said) == 2, said  # why it waits (once), then that it starts
        assert kind in said[0]


def test_an_unreadable_notice_holds_the_gate(tmp_path):
    (tmp_path / "notice.json").write_text("{not json")
    looks: list[float] = []

    def sleep(seconds: float) -> None:
        looks.append(seconds)
        write_notice(tmp_path, _notice("rebalance-recommendation", None))

    said: list[str] = []
    assert wait_until_clear(tmp_path, say=said.append, clock=lambda: NOW, sleep=sleep) == 1
    assert "unreadable" in said[0]


def test_wait_clear_returns_when_the_agent_drops_the_notice(tmp_path):
    """The command itself, as ExecStartPre runs it: blocks while the notice is there."""
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    write_notice(tmp_path, _notice("scheduled-maintenance", future))
    process = subprocess.Popen(
        [sys.executable, "-m", "spotguard", "fleet", "wait-clear", "--interval", "0.1"],
        env={**os.environ, "SPOTGUARD_STATE_DIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)
        assert process.poll() is None, "started while a maintenance notice was active"
        (tmp_path / "notice.json").unlink()
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0
    assert "holding the job: scheduled-maintenance notice" in out
    assert out.strip().endswith("no active notice: starting the job")


# -- ending the fleet within the unit's TimeoutStopSec -----------------------------------------


def _policy(tmp_path: Path, **overrides) -> JobEnd:
    settings = {
        "job": JOB,
        "status_uri": "s3://status-bucket/spotguard/status/llm-job.json",
        "instance_id": "i-0123456789abcdef0",
        "region": "us-east-1",
        "state_dir": tmp_path,
        "notice_dir": tmp_path,
        **overrides,
    }
    return JobEnd(**settings)


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "ModifyFleet")


def test_any_exception_on_the_way_still_powers_off(tmp_path, monkeypatch):
    ran: list[tuple[str, ...]] = []
    monkeypatch.setattr(job_end, "_run", lambda *command: ran.append(command) or "")

    def broken(self, status, deadline):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(JobEnd, "_end_fleet", broken)
    with pytest.raises(SpotguardError, match="RuntimeError: something nobody expected"):
        _policy(tmp_path)._end({"state": "finished"}, time.monotonic())
    assert ran[0][0] == "systemd-run"  # the fallback, armed first
    assert ran[-1] == ("systemctl", "--no-block", "poweroff")


@pytest.mark.parametrize("code", ["IncorrectFleetState", "RequestLimitExceeded", "AccessDenied"])
def test_passing_errors_are_retried_within_the_budget(monkeypatch, code):
    monkeypatch.setattr(job_end.time, "sleep", lambda seconds: None)
    answers = [_client_error(code), _client_error(code), "done"]

    def action():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    deadline = time.monotonic() + 30
    assert JobEnd._attempt_value(action, "setting the capacity", deadline) == "done"


def test_retries_stop_at_the_deadline(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(job_end.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(
        job_end.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds)
    )

    def action():
        raise _client_error("IncorrectFleetState")

    with pytest.raises(SpotguardError, match="IncorrectFleetState"):
        JobEnd._attempt_value(action, "setting the capacity", 1000.0 + 20)
    assert clock[0] <= 1020.0


def test_all_of_it_fits_well_within_timeout_stop_sec(tmp_path):
    """The budget, the last steps' overrun and the fallback power off all come
    before systemd's TimeoutStopSec would kill job-end (and restart a finished job)."""
    unit = (Path(__file__).parents[2] / "systemd" / "spotguard-training@.service").read_text()
    (timeout,) = [
        int(line.split("=")[1]) for line in unit.splitlines() if line.startswith("TimeoutStopSec=")
    ]
    policy = _policy(tmp_path)
    assert policy.budget_seconds + job_end.OVERRUN_SECONDS < job_end.FALLBACK_POWEROFF_SECONDS
    assert timeout > job_end.FALLBACK_POWEROFF_SECONDS
    with pytest.raises(ValueError, match="budget_seconds"):
        _policy(tmp_path, budget_seconds=120)
