"""``spotguard fleet job-end``: what a node does each time its training process ends.

systemd runs it after every end of ``spotguard-training@<job>.service`` (``ExecStopPost=+``,
as root) with ``EXIT_CODE``/``EXIT_STATUS`` set. One fleet runs one job, and a fleet of type
``maintain`` replaces every instance that goes away, so a job that is over must take its fleet
down with it, or the fleet pays for idle GPUs (or for a job crashing in a loop) forever:

==========================  ====================================================================
the process ended with       the node
==========================  ====================================================================
exit 0 (finished)            writes ``finished`` to the status object, sets its fleet's target
                             capacity to 0 (the fleet terminates the instance) and powers off
exit 75 (preempted)          does nothing: the job restarts once the notice is over
                             (``spotguard fleet wait-clear``) or a replacement resumes it
anything else (a failure)    counts it; the ``max_failures``-th in a row writes ``failed`` with
                             the last error and the log's tail, then ends the fleet as above;
                             before that, systemd restarts the job
a stop that was asked for    nothing: a shutdown or ``systemctl stop`` is not the job's outcome
==========================  ====================================================================

The fleet is found from the instance's ``aws:ec2:fleet-id`` tag, which EC2 Fleet puts on every
instance it launches; the role may modify only that one fleet (``job_end.tf``).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spotguard.errors import ConfigError, SpotguardError
from spotguard.protocol import EXIT_PREEMPTED, format_time, write_json_atomic

__all__ = ["JobEnd"]

FLEET_TAG = "aws:ec2:fleet-id"
_JOB = re.compile(r"^[a-z0-9][a-z0-9-]{1,30}[a-z0-9]$")
_S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(.+)$")
_INSTANCE = re.compile(r"^i-[0-9a-f]{8,17}$")
_DENIED = ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException")


def _run(*command: str) -> str:
    """Output of a local command, ``""`` when it is missing or fails (best effort)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


@dataclass(frozen=True)
class JobEnd:
    """The job-end policy of one node: which job, where its status goes, how many failures in
    a row end it. Built from the flags or the training unit's environment file."""

    job: str
    status_uri: str
    instance_id: str
    region: str
    max_failures: int = 3
    state_dir: Path = Path("/var/lib/spotguard")
    #: Seconds to keep retrying an AccessDenied: the role's job-end policy is created after the
    #: fleet (it names the fleet's ARN), and IAM changes take a while to reach EC2.
    denied_retry_seconds: float = 120.0

    def __post_init__(self) -> None:
        if not _JOB.match(self.job):
            raise ConfigError(f"job: {self.job!r} is not a fleet name (the unit's %i)")
        if not _S3_URI.match(self.status_uri):
            raise ConfigError(f"status_uri: expected s3://bucket/key, got {self.status_uri!r}")
        if not _INSTANCE.match(self.instance_id):
            raise ConfigError(f"instance_id: expected i-..., got {self.instance_id!r}")
        if not self.region:
            raise ConfigError("region: empty (AWS_DEFAULT_REGION in the unit's environment)")
        if isinstance(self.max_failures, bool) or self.max_failures < 1:
            raise ConfigError(f"max_failures: must be >= 1, got {self.max_failures!r}")

    @property
    def unit(self) -> str:
        return f"spotguard-training@{self.job}.service"

    # -- what happened -----------------------------------------------------------------------

    def _stop_requested(self) -> bool:
        """A shutdown, or ``systemctl stop``, ended the process: a stop job is queued for the
        unit (during shutdown, for every unit) or the system is going down."""
        if _run("systemctl", "is-system-running").strip() == "stopping":
            return True
        for line in _run("systemctl", "list-jobs", "--no-legend", "--no-pager").splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[1] == self.unit and fields[2] == "stop":
                return True
        return False

    def handle(self, exit_code: str | None, exit_status: str | None) -> str:
        """Act on one end of the process (systemd's ``$EXIT_CODE`` and ``$EXIT_STATUS``);
        returns what it decided: ``stopped``, ``preempted``, ``retrying``, ``finished`` or
        ``failed``."""
        if self._stop_requested():
            return "stopped"
        counter = self.state_dir / f"failures-{self.job}.json"
        if exit_code == "exited" and exit_status == "0":
            counter.unlink(missing_ok=True)
            self._end({"state": "finished", "exit": "exited 0"})
            return "finished"
        if exit_code == "exited" and exit_status == str(EXIT_PREEMPTED):
            counter.unlink(missing_ok=True)  # it ran until preempted: not a crash loop
            return "preempted"
        failures = self._count(counter) + 1
        ended = f"{exit_code or 'not started'} {exit_status or ''}".strip()
        write_json_atomic(counter, {"failures": failures, "last": ended}, 0o600)
        if failures < self.max_failures:
            return "retrying"
        tail = _run("journalctl", "--unit", self.unit, "--lines", "30", "--no-pager", "-o", "cat")
        self._end(
            {
                "state": "failed",
                "exit": ended,
                "failures": failures,
                "last_error": f"{failures} failures in a row, the last: {ended}",
                "log_tail": tail.splitlines()[-30:],
            }
        )
        return "failed"

    @staticmethod
    def _count(counter: Path) -> int:
        try:
            return int(json.loads(counter.read_text())["failures"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    # -- ending the fleet --------------------------------------------------------------------

    def _end(self, status: dict[str, Any]) -> None:
        """Status first (what happened must be visible even if the rest fails), then the
        fleet's capacity to 0, then power off: a failure on the way is recorded and the node
        still goes down, never idles."""
        import boto3

        ec2 = boto3.client("ec2", region_name=self.region)
        s3 = boto3.client("s3", region_name=self.region)
        bucket, key = _S3_URI.match(self.status_uri).groups()  # type: ignore[union-attr]
        status = {
            "fleet": self.job,
            "instance_id": self.instance_id,
            "time": format_time(datetime.now(timezone.utc)),
            **status,
        }

        def publish() -> None:
            body = json.dumps(status, indent=2).encode()
            s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")

        problem = self._attempt(publish, "writing the status object")
        try:
            fleet_id = self._attempt_value(lambda: self._fleet_id(ec2), "finding the fleet")
            status["fleet_id"] = fleet_id
            self._attempt_value(
                lambda: ec2.modify_fleet(
                    FleetId=fleet_id,
                    TargetCapacitySpecification={"TotalTargetCapacity": 0},
                    ExcessCapacityTerminationPolicy="termination",
                ),
                "setting the fleet's target capacity to 0",
            )
            status["fleet_capacity"] = 0
        except SpotguardError as exc:
            status["end_error"] = str(exc)
            problem = problem or str(exc)
        # Again, with the fleet's ID and the outcome of ModifyFleet (or why it failed).
        problem = self._attempt(publish, "writing the status object") or problem
        _run("systemctl", "--no-block", "poweroff")
        if problem:
            raise SpotguardError(f"{problem}; powering off anyway")

    def _fleet_id(self, ec2: Any) -> str:
        tags = ec2.describe_tags(
            Filters=[
                {"Name": "resource-id", "Values": [self.instance_id]},
                {"Name": "key", "Values": [FLEET_TAG]},
            ]
        )["Tags"]
        if not tags:
            raise SpotguardError(f"instance {self.instance_id} has no {FLEET_TAG} tag")
        return str(tags[0]["Value"])

    def _attempt(self, action: Any, what: str) -> str | None:
        try:
            self._attempt_value(action, what)
        except SpotguardError as exc:
            return str(exc)
        return None

    def _attempt_value(self, action: Any, what: str) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + self.denied_retry_seconds
        pause = 2.0
        while True:
            try:
                return action()
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in _DENIED and time.monotonic() + pause < deadline:
                    time.sleep(pause)
                    pause = min(pause * 2, 30.0)
                    continue
                raise SpotguardError(f"{what} failed: {code}: {exc}") from None
            except BotoCoreError as exc:
                raise SpotguardError(f"{what} failed: {exc}") from None
