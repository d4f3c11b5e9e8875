"""``spotguard fleet job-end``: what a node does each time its training process ends.

systemd runs it after every end of ``spotguard-training@<job>.service`` (``ExecStopPost=+``,
as root) with ``SERVICE_RESULT``, ``EXIT_CODE`` and ``EXIT_STATUS`` set. One fleet runs one
job, and a fleet of type ``maintain`` replaces every instance that goes away, so a job that is
over must take its fleet down with it, or the fleet pays for idle GPUs (or for a job crashing
in a loop) forever:

==========================  ====================================================================
the process ended with       the node
==========================  ====================================================================
exit 0 (finished)            writes ``finished`` to the status object, sets its fleet's target
                             capacity to 0 (the fleet terminates the instance) and powers off
exit 75 while a stopping     does nothing: the job restarts once the notice is over
notice is active             (``spotguard fleet wait-clear``) or a replacement resumes it
(preempted)
anything else (a failure)    counts it; the ``max_failures``-th in a row writes ``failed`` with
                             the last error and the log's tail, then ends the fleet as above;
                             before that, systemd restarts the job. A failure after the job
                             committed a newer checkpoint than at the failure before starts
                             the count again: progress, not a crash loop. A failure includes the
                             results ``oom-kill`` (``OOMPolicy=stop`` SIGTERMs the job, whose
                             hooks save and exit 75), ``signal``, ``core-dump``, ``timeout``
                             and ``watchdog``, and an exit 75 with no notice active
a stop that was asked for    nothing: a shutdown, ``systemctl stop`` or ``systemctl restart``
                             is not the job's outcome
==========================  ====================================================================

Ending the fleet must finish well within the unit's ``TimeoutStopSec`` (100 s): systemd would
kill job-end, record ``timeout`` and restart a finished job. So all of it, retries included,
has a budget (:attr:`JobEnd.budget_seconds`, 60 s) and short botocore timeouts; a fallback
power off is armed first, and the node powers off whatever happens on the way.

The fleet is found from the instance's ``aws:ec2:fleet-id`` tag, which EC2 Fleet puts on every
instance it launches; the role may modify only that one fleet (``job_end.tf``). A multi-node
job's rendezvous host is stopped with it (its next run needs an empty store).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spotguard.errors import ConfigError, SpotguardError
from spotguard.fleet.resume_gate import stopping_notice
from spotguard.protocol import (
    DEFAULT_STATE_DIR,
    EXIT_PREEMPTED,
    MANIFEST_NAME,
    STEP_DIR_PATTERN,
    STEP_DIR_PREFIX,
    format_time,
    write_json_atomic,
)

__all__ = ["JobEnd"]

FLEET_TAG = "aws:ec2:fleet-id"
_JOB = re.compile(r"^[a-z0-9][a-z0-9-]{1,30}[a-z0-9]$")
_S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(.+)$")
_INSTANCE = re.compile(r"^i-[0-9a-f]{8,17}$")
#: A committed checkpoint's manifest (``ckpt-<12-digit step>/manifest.json``, written last),
#: relative to the checkpoint URI; only ``<uri>/ckpt-`` is listed, whatever else is there.
_MANIFEST = re.compile(rf"{STEP_DIR_PATTERN.pattern}/{re.escape(MANIFEST_NAME)}")
#: Seconds to learn the newest committed checkpoint before counting a failure: part of the
#: budget, and short, since systemd waits for job-end before it restarts the job.
PROGRESS_LOOKUP_SECONDS = 15.0
#: Keys listed at most in that lookup (10 pages); a larger store counts as unknown progress.
PROGRESS_LOOKUP_PAGES = 10
_DENIED = ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException")
#: Worth another try within the budget: IAM still reaching EC2 (the job-end policy follows the
#: fleet), a fleet still modifying, throttling.
_RETRIED = (
    *_DENIED,
    "IncorrectFleetState",
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
)
#: systemd's ``$SERVICE_RESULT`` values that are a failure whatever the exit status says.
FAILURE_RESULTS = frozenset({"oom-kill", "signal", "core-dump", "timeout", "watchdog"})
#: Seconds after which the armed fallback powers the node off, should job-end not get there.
FALLBACK_POWEROFF_SECONDS = 90
#: Seconds past the budget the last steps may use (stopping the rendezvous host, the status).
OVERRUN_SECONDS = 15


def _run(*command: str) -> str:
    """Output of a local command, ``""`` when it is missing or fails (best effort)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
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
    #: The agent's state dir, where the notice file is (``SPOTGUARD_STATE_DIR``).
    notice_dir: Path = Path(DEFAULT_STATE_DIR)
    #: The job's checkpoint store (``SPOTGUARD_CHECKPOINT_URI``), looked at on a failure: a
    #: newer committed checkpoint since the last failure is progress. ``None``: every failure
    #: counts.
    checkpoint_uri: str | None = None
    #: Seconds for all of ending the fleet, retries included (an AccessDenied while the role's
    #: job-end policy, created after the fleet, reaches EC2; a fleet still modifying;
    #: throttling): well under the unit's TimeoutStopSec (100 s), which also bounds job-end.
    budget_seconds: float = 60.0
    #: A multi-node job's rendezvous host (``SPOTGUARD_RENDEZVOUS_INSTANCE_ID``), stopped with
    #: the fleet: the next run needs an empty store (the module starts the host again).
    rendezvous_instance_id: str | None = None

    def __post_init__(self) -> None:
        if not _JOB.match(self.job):
            raise ConfigError(f"job: {self.job!r} is not a fleet name (the unit's %i)")
        if not _S3_URI.match(self.status_uri):
            raise ConfigError(f"status_uri: expected s3://bucket/key, got {self.status_uri!r}")
        if not _INSTANCE.match(self.instance_id):
            raise ConfigError(f"instance_id: expected i-..., got {self.instance_id!r}")
        if not self.region:
            raise ConfigError("region: empty (AWS_DEFAULT_REGION in the unit's environment)")
        if self.checkpoint_uri is not None and not _S3_URI.match(self.checkpoint_uri.rstrip("/")):
            raise ConfigError(
                f"checkpoint_uri: expected s3://bucket/prefix, got {self.checkpoint_uri!r}"
            )
        host = self.rendezvous_instance_id
        if host is not None and not _INSTANCE.match(host):
            raise ConfigError(f"rendezvous_instance_id: expected i-..., got {host!r}")
        if isinstance(self.max_failures, bool) or self.max_failures < 1:
            raise ConfigError(f"max_failures: must be >= 1, got {self.max_failures!r}")
        if not 0 < self.budget_seconds <= 80:
            raise ConfigError(f"budget_seconds: must be in (0, 80], got {self.budget_seconds!r}")

    @property
    def unit(self) -> str:
        return f"spotguard-training@{self.job}.service"

    # -- what happened -----------------------------------------------------------------------

    def _system_stopping(self) -> bool:
        return _run("systemctl", "is-system-running").strip() == "stopping"

    def _stop_requested(self) -> bool:
        """``systemctl stop`` or ``systemctl restart`` ended the process: a stop or restart
        job is queued for the unit (during shutdown, a stop job for every unit)."""
        for line in _run("systemctl", "list-jobs", "--no-legend", "--no-pager").splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[1] == self.unit and fields[2] in ("stop", "restart"):
                return True
        return False

    def handle(
        self, exit_code: str | None, exit_status: str | None, service_result: str | None = None
    ) -> str:
        """Act on one end of the process (systemd's ``$EXIT_CODE``, ``$EXIT_STATUS`` and
        ``$SERVICE_RESULT``); returns what it decided: ``stopped``, ``preempted``,
        ``retrying``, ``finished`` or ``failed``."""
        started = time.monotonic()  # the budget counts from here: the lookup below is part of it
        if self._system_stopping():
            return "stopped"
        # A result systemd calls a failure is one even when a stop job is queued (OOMPolicy=stop
        # stops the unit itself) or the hooks exited 75 on the SIGTERM that came with it.
        failed_result = service_result in FAILURE_RESULTS
        if not failed_result and self._stop_requested():
            return "stopped"
        counter = self.state_dir / f"failures-{self.job}.json"
        if not failed_result and exit_code == "exited" and exit_status == "0":
            counter.unlink(missing_ok=True)
            self._end({"state": "finished", "exit": "exited 0"}, started)
            return "finished"
        preempted = exit_code == "exited" and exit_status == str(EXIT_PREEMPTED)
        now = datetime.now(timezone.utc)
        if not failed_result and preempted and stopping_notice(self.notice_dir, now) is not None:
            counter.unlink(missing_ok=True)  # it ran until preempted: not a crash loop
            return "preempted"
        earlier, newest_before = self._count(counter)
        newest = self._newest_checkpoint()
        progressed = newest is not None and (newest_before is None or newest > newest_before)
        failures = 1 if progressed else earlier + 1
        ended = f"{exit_code or 'not started'} {exit_status or ''}".strip()
        if failed_result:
            ended = f"{service_result} ({ended})"
        elif preempted:
            ended = f"{ended} with no stopping notice active"
        record = {
            "failures": failures,
            "last": ended,
            # Unknown now (the store could not be read): the last known stays the bar.
            "newest_step": newest if newest is not None else newest_before,
        }
        write_json_atomic(counter, record, 0o600)
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
            },
            started,
        )
        return "failed"

    @staticmethod
    def _count(counter: Path) -> tuple[int, int | None]:
        """Failures in a row so far, and the newest committed checkpoint's step at the last
        one (``None``: not known)."""
        try:
            record = json.loads(counter.read_text())
            failures = int(record["failures"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0, None
        newest = record.get("newest_step")
        known = isinstance(newest, int) and not isinstance(newest, bool)
        return failures, newest if known else None

    def _newest_checkpoint(self) -> int | None:
        """The step of the newest committed checkpoint in the job's store, ``None`` when there
        is none, no store is configured, or it cannot be read in time (a failure then counts:
        an unreadable store must not keep a crash loop paying forever)."""
        if self.checkpoint_uri is None:
            return None
        import boto3
        from botocore.config import Config

        bucket, prefix = _S3_URI.match(self.checkpoint_uri.rstrip("/")).groups()  # type: ignore[union-attr]
        config = Config(
            connect_timeout=3, read_timeout=5, retries={"mode": "standard", "total_max_attempts": 2}
        )
        s3 = boto3.client("s3", region_name=self.region, config=config)
        deadline = time.monotonic() + PROGRESS_LOOKUP_SECONDS
        newest: int | None = None
        try:
            listing = s3.get_paginator("list_objects_v2")
            pages = listing.paginate(Bucket=bucket, Prefix=f"{prefix}/{STEP_DIR_PREFIX}")
            for number, page in enumerate(pages, start=1):
                for item in page.get("Contents", []):
                    found = _MANIFEST.fullmatch(item["Key"].removeprefix(f"{prefix}/"))
                    if found and (newest is None or int(found[1]) > newest):
                        newest = int(found[1])
                if number >= PROGRESS_LOOKUP_PAGES or time.monotonic() > deadline:
                    return None if page.get("IsTruncated") else newest
        except Exception as exc:  # best effort: no progress known
            print(f"spotguard fleet job-end: could not look for new checkpoints: {exc}")
            return None
        return newest

    # -- ending the fleet --------------------------------------------------------------------

    def _end(self, status: dict[str, Any], started: float) -> None:
        """Status first (what happened must be visible even if the rest fails), then the
        fleet's capacity to 0, then power off: a failure on the way is recorded and the node
        still goes down, never idles. A fallback power off is armed before anything else, and
        the power off comes in ``finally``: no exception keeps the node up."""
        deadline = started + self.budget_seconds
        _run(
            "systemd-run", "--no-block", "--collect", f"--on-active={FALLBACK_POWEROFF_SECONDS}",
            "--unit", f"spotguard-job-end-poweroff-{self.job}",
            "/bin/systemctl", "--no-block", "poweroff",
        )  # fmt: skip
        problem: str | None = None
        try:
            problem = self._end_fleet(status, deadline)
        except Exception as exc:
            problem = f"ending the fleet failed: {type(exc).__name__}: {exc}"
        finally:
            _run("systemctl", "--no-block", "poweroff")
        if problem:
            raise SpotguardError(f"{problem}; powering off anyway")

    def _end_fleet(self, status: dict[str, Any], deadline: float) -> str | None:
        import boto3
        from botocore.config import Config

        # Short timeouts and few attempts per call: the budget's loop does the retrying.
        config = Config(
            connect_timeout=5,
            read_timeout=10,
            retries={"mode": "standard", "total_max_attempts": 2},
        )
        ec2 = boto3.client("ec2", region_name=self.region, config=config)
        s3 = boto3.client("s3", region_name=self.region, config=config)
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

        # The first write gets at most a third of the budget: ending the fleet matters more.
        first = min(deadline, time.monotonic() + self.budget_seconds / 3)
        problem = self._attempt(publish, "writing the status object", first)
        try:
            fleet_id = self._attempt_value(
                lambda: self._fleet_id(ec2), "finding the fleet", deadline
            )
            status["fleet_id"] = fleet_id
            self._attempt_value(
                lambda: ec2.modify_fleet(
                    FleetId=fleet_id,
                    TargetCapacitySpecification={
                        "TotalTargetCapacity": 0,
                        "OnDemandTargetCapacity": 0,
                        "SpotTargetCapacity": 0,
                    },
                    ExcessCapacityTerminationPolicy="termination",
                ),
                "setting the fleet's target capacity to 0",
                deadline,
            )
            status["fleet_capacity"] = 0
        except SpotguardError as exc:
            status["end_error"] = str(exc)
            problem = problem or str(exc)
        host = self.rendezvous_instance_id
        if host is not None:
            try:
                self._attempt_value(
                    lambda: ec2.stop_instances(InstanceIds=[host]),
                    f"stopping the rendezvous host {host}",
                    deadline + OVERRUN_SECONDS / 3,  # a try even after a slow ModifyFleet
                )
                status["rendezvous_host"] = "stopped"
            except SpotguardError as exc:
                status["rendezvous_error"] = str(exc)
                problem = problem or str(exc)
        # Again, with the fleet's ID and the outcome of ModifyFleet (or why it failed).
        problem = (
            self._attempt(publish, "writing the status object", deadline + OVERRUN_SECONDS)
            or problem
        )
        return problem

    def _fleet_id(self, ec2: Any) -> str:
        filters = [{"Name": "resource-id", "Values": [self.instance_id]},
                   {"Name": "key", "Values": [FLEET_TAG]}]  # fmt: skip
        tags = ec2.describe_tags(Filters=filters)["Tags"]
        if not tags:
            raise SpotguardError(f"instance {self.instance_id} has no {FLEET_TAG} tag")
        return str(tags[0]["Value"])

    def _attempt(self, action: Callable[[], Any], what: str, deadline: float) -> str | None:
        try:
            self._attempt_value(action, what, deadline)
        except SpotguardError as exc:
            return str(exc)
        return None

    @staticmethod
    def _attempt_value(action: Callable[[], Any], what: str, deadline: float) -> Any:
        """``action()``, retried on what may pass (:data:`_RETRIED`) until ``deadline``
        (``time.monotonic()``)."""
        from botocore.exceptions import BotoCoreError, ClientError

        pause = 1.0
        while True:
            if time.monotonic() >= deadline:
                raise SpotguardError(f"{what} failed: out of time")
            try:
                return action()
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in _RETRIED and time.monotonic() + pause < deadline:
                    time.sleep(pause)
                    pause = min(pause * 2, 8.0)
                    continue
                raise SpotguardError(f"{what} failed: {code}: {exc}") from None
            except BotoCoreError as exc:
                if time.monotonic() + pause < deadline:
                    time.sleep(pause)
                    pause = min(pause * 2, 8.0)
                    continue
                raise SpotguardError(f"{what} failed: {exc}") from None
