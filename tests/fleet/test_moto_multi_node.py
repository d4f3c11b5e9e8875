"""The multi-node mode of ``examples/basic`` applied on moto, read back, and its rendered
torchrun command run for real.

The config asks for 3 nodes (2 at least) in one subnet. After the apply: the fleet, its one
zone, the rendezvous host on its fixed interface, the security
groups and roles that let the nodes reach it and nothing more, and a plan that changes nothing.
Then the launch template's user data runs in the sandbox of ``test_user_data``; the training
script and environment it writes are run as three "nodes" at once, each its own torchrun,
against a local ``spotguard rendezvous-store`` standing in for the host: they must form one
group of 3 through that store and all-reduce across it.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.fleet.conftest import Terraform
from tests.fleet.moto_example import Applied, apply_basic_example
from tests.fleet.test_user_data import PIP_PYTHON, _commands, _impostor, _run, _sandbox

pytestmark = pytest.mark.timeout(480)

NAME = "mn-fleet"
#: What each process of the job runs: one all-reduce over the group torchrun formed.
WORKER = """
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
report = {
    "rank": dist.get_rank(),
    "world_size": dist.get_world_size(),
    "sum": total.item(),
    "run_id": os.environ["TORCHELASTIC_RUN_ID"],
    "share_store": os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE"),
    "nodes": os.environ["GROUP_WORLD_SIZE"],
}
dist.destroy_process_group()
with open(os.path.join(sys.argv[1], f"rank-{report['rank']}.json"), "w") as out:
    json.dump(report, out)
"""

CONFIG = """
model:
  name: {name}
  command: python {worker} {out}
infrastructure:
  region: us-east-1
  network:
    vpc_id: {{vpc}}
    subnet_ids: [{{subnet_a}}]
  training:
    instance_types: [g5.xlarge, g6.xlarge]
    nodes: 3
    min_nodes: 2
    processes_per_node: 1
    ami_id: {{ami}}
    python: {python}
  checkpoints:
    prefix: runs/mn
"""


@pytest.fixture(scope="module")
def applied(terraform: Terraform, tmp_path_factory, moto_server):
    folder = tmp_path_factory.mktemp("multi-node")
    (folder / "worker.py").write_text(WORKER)
    (folder / "out").mkdir()
    config = CONFIG.format(
        name=NAME, worker=folder / "worker.py", out=folder / "out", python=sys.executable
    )
    done = apply_basic_example(terraform, folder, moto_server, config, ["us-east-1a"])
    yield done
    done.plan.proxy.close()


#: The host's training interpreter in the sandbox: pip is recorded, spotguard is the real one.
HOST_PYTHON = r"""#!/bin/bash
echo "$0 $*" >> "$CALLS"
if [ "$1 $2" = "-m spotguard" ]; then exec "$REAL_PYTHON" "$@"; fi
[ "$1 $2 $3" = "-m pip install" ] || { echo "python stub: $*" >&2; exit 2; }
"""


def _host(applied: Applied) -> dict:
    (reservation,) = applied.client("ec2").describe_instances(
        InstanceIds=[applied.outputs["rendezvous_instance_id"]]
    )["Reservations"]
    (instance,) = reservation["Instances"]
    return instance


def test_the_fleet_runs_three_nodes_in_one_zone(applied):
    ec2 = applied.client("ec2")
    (fleet,) = ec2.describe_fleets(FleetIds=[applied.outputs["fleet_id"]])["Fleets"]
    assert fleet["TargetCapacitySpecification"]["TotalTargetCapacity"] == 3
    overrides = fleet["LaunchTemplateConfigs"][0]["Overrides"]
    assert {o["SubnetId"] for o in overrides} == set(applied.subnets)  # the one subnet
    (version,) = ec2.describe_launch_template_versions(
        LaunchTemplateId=applied.outputs["launch_template_id"], Versions=["$Latest"]
    )["LaunchTemplateVersions"]
    assert "Placement" not in version["LaunchTemplateData"]  # no placement group asked for


def test_a_cluster_placement_group_is_planned_for_the_nodes(applied):
    """moto has no placement groups (CreatePlacementGroup never becomes available there): the
    plan shows the group and the launch template placing the nodes in it; unit.tftest.hcl
    checks the same with a mocked provider."""
    done = applied.plan("-var", "cluster_placement_group=true", refresh=False)
    text = " ".join(done.stdout.split())
    assert done.returncode == 2, done.stdout + done.stderr
    assert '+ strategy = "cluster"' in text
    assert f'+ name = "{NAME}-nodes"' in text
    assert f'+ group_name = "{NAME}-nodes"' in text
    assert "must be replaced" not in text


def test_the_rendezvous_host_serves_on_a_fixed_interface_reachable_only_by_the_nodes(applied):
    ec2 = applied.client("ec2")
    host = _host(applied)
    assert host["State"]["Name"] == "running"
    assert host["MetadataOptions"]["HttpTokens"] == "required"
    (interface,) = host["NetworkInterfaces"]
    assert interface["Attachment"]["DeviceIndex"] == 0
    address, port = applied.outputs["rendezvous_endpoint"].split(":")
    assert (interface["PrivateIpAddress"], port) == (address, "29400")
    assert interface["SubnetId"] == applied.subnets[0]
    user_data = ec2.describe_instance_attribute(
        InstanceId=host["InstanceId"], Attribute="userData"
    )["UserData"]["Value"]
    assert (
        f"-m spotguard rendezvous-store --host {address} --port 29400"
        in base64.b64decode(user_data).decode()
    )
    (group_id,) = [group["GroupId"] for group in interface["Groups"]]
    (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    (rule,) = group["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 29400, 29400)
    assert rule["IpRanges"] == []
    assert [pair["GroupId"] for pair in rule["UserIdGroupPairs"]] == [
        applied.outputs["security_group_id"]
    ]
    # ... and the nodes may send to that port in their subnet (their group allows no more out
    # than HTTPS and each other otherwise).
    (nodes,) = ec2.describe_security_groups(GroupIds=[applied.outputs["security_group_id"]])[
        "SecurityGroups"
    ]
    store = [rule for rule in nodes["IpPermissionsEgress"] if rule.get("FromPort") == 29400]
    assert [(rule["ToPort"], rule["IpRanges"][0]["CidrIp"]) for rule in store] == [
        (29400, "10.40.0.0/24")
    ]


def test_the_host_may_read_the_wheel_and_the_nodes_may_stop_only_the_host(applied):
    iam = applied.client("iam")
    host_profile = _host(applied)["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
    (host_role,) = iam.get_instance_profile(InstanceProfileName=host_profile)["InstanceProfile"][
        "Roles"
    ]
    (policy_name,) = iam.list_role_policies(RoleName=host_role["RoleName"])["PolicyNames"]
    document = iam.get_role_policy(RoleName=host_role["RoleName"], PolicyName=policy_name)
    (statement,) = document["PolicyDocument"]["Statement"]
    assert statement["Action"] == ["s3:GetObject"]
    assert statement["Resource"].endswith(applied.outputs["spotguard_wheel_uri"][5:])

    role = applied.outputs["instance_role_name"]
    actions: dict[str, list] = {}
    for name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
        for statement in iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"][
            "Statement"
        ]:
            for action in statement["Action"]:
                actions.setdefault(action, []).append(statement["Resource"])
    host_arn = f"arn:aws:ec2:us-east-1:123456789012:instance/{_host(applied)['InstanceId']}"
    assert actions["ec2:StopInstances"] == [host_arn]
    # No discovery: the nodes describe nothing but their own tags (job-end finds its fleet).
    assert [action for action in actions if action.startswith("ec2:")] == [
        "ec2:ModifyFleet",
        "ec2:DescribeTags",
        "ec2:StopInstances",
    ]


def test_a_plan_after_the_apply_changes_nothing(applied):
    done = applied.plan()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No changes." in done.stdout


def test_a_pause_stops_the_host_and_min_nodes_above_nodes_is_refused(applied):
    paused = applied.plan("-var", "target_capacity=0")
    text = " ".join(paused.stdout.split())
    assert paused.returncode == 2, paused.stdout + paused.stderr
    assert "~ total_target_capacity = 3 -> 0" in text
    assert '~ state = "running" -> "stopped"' in text
    assert "Plan: 0 to add, 2 to change, 0 to destroy." in text, paused.stdout
    refused = applied.plan("-var", "min_nodes=4", refresh=False)
    assert refused.returncode == 1
    assert "min_nodes must be a whole number from 1 to nodes" in " ".join(refused.stderr.split())


def test_a_stopped_host_is_started_again_by_the_next_apply(applied):
    """job-end stops the host when the job ends; the drift check shows it, and an apply
    starts it again."""
    ec2 = applied.client("ec2")
    host = applied.outputs["rendezvous_instance_id"]
    ec2.stop_instances(InstanceIds=[host])
    drift = applied.plan()
    assert drift.returncode == 2, drift.stdout + drift.stderr
    assert '~ state = "stopped" -> "running"' in " ".join(drift.stdout.split())
    plan = applied.plan
    plan.terraform("apply", "-auto-approve", *plan.extra, cwd=plan.work, env=plan.env)
    assert _host(applied)["State"]["Name"] == "running"


def test_the_hosts_python_is_fixed_once_it_serves_the_store(applied):
    """The host's user data ran once with them: a new training_python (or rendezvous_port,
    which examples/basic does not expose) would reach the nodes, not the store."""
    moved = applied.plan("-var", "training_python=/opt/conda/bin/python")
    text = " ".join((moved.stdout + moved.stderr).split())
    assert moved.returncode == 1, text
    assert "rendezvous_port and training_python are fixed when the rendezvous host" in text


def test_the_rendered_torchrun_command_forms_one_group_at_the_rendezvous_store(
    applied, tmp_path: Path
):
    """The user data as the launch template carries it, run in the sandbox, writes the
    training script and its environment; three copies of that script, each with the
    environment file's variables, meet at a local store standing in for the host's."""
    (version,) = applied.client("ec2").describe_launch_template_versions(
        LaunchTemplateId=applied.outputs["launch_template_id"], Versions=["$Latest"]
    )["LaunchTemplateVersions"]
    script = base64.b64decode(version["LaunchTemplateData"]["UserData"]).decode()
    root, env = _sandbox(tmp_path)
    # The training interpreter the config named (this venv's), as a pip stub in the sandbox.
    stub = root / sys.executable.lstrip("/")
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text(PIP_PYTHON)
    stub.chmod(0o755)
    _run(script, env)
    etc = root / "etc" / "spotguard"
    training = etc / f"training-{NAME}.sh"
    assert training.read_text() == f"#!/bin/bash\n{applied.outputs['training_script']}\n"
    settings = dict(
        line.split("=", 1) for line in (etc / f"training-{NAME}.env").read_text().splitlines()
    )
    assert settings["SPOTGUARD_RDZV_ENDPOINT"] == applied.outputs["rendezvous_endpoint"]
    assert settings["SPOTGUARD_RENDEZVOUS_INSTANCE_ID"] == applied.outputs["rendezvous_instance_id"]
    assert settings["SPOTGUARD_NODE_ADDRESS"] == "10.40.0.77"  # IMDS local-ipv4 (the stub's)
    shellcheck = Path(sys.executable).with_name("shellcheck")
    checked = subprocess.run([str(shellcheck), str(training)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout

    # No store at the endpoint: the script waits SPOTGUARD_RDZV_WAIT seconds, then says so.
    silent = subprocess.run(
        ["/bin/bash", str(training)],
        env={**os.environ, **settings, "SPOTGUARD_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
             "SPOTGUARD_RDZV_WAIT": "3"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert silent.returncode == 1
    assert "the rendezvous store at 127.0.0.1:" in silent.stderr
    assert "did not answer for 3 s" in silent.stderr

    port = free_port()
    nodes: list[subprocess.Popen[str]] = []
    store: subprocess.Popen[str] | None = None
    try:
        out = applied.work.parents[1] / "out"  # the fixture's folder (see CONFIG)
        node_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("TORCH", "SPOTGUARD"))},
            **settings,
            "SPOTGUARD_RDZV_ENDPOINT": f"127.0.0.1:{port}",
            "SPOTGUARD_NODE_ADDRESS": "127.0.0.1",
        }
        for index in range(3):
            log = tmp_path / f"node-{index}.log"
            nodes.append(
                subprocess.Popen(
                    ["/bin/bash", str(training)],
                    env=node_env,
                    stdout=log.open("w"),
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        # The nodes come first, as after the host's restart: they wait for the store.
        time.sleep(3)
        assert all(node.poll() is None for node in nodes)
        store = subprocess.Popen(
            [sys.executable, "-m", "spotguard", "rendezvous-store", "--host", "127.0.0.1",
             "--port", str(port)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        codes = [node.wait(max(1.0, deadline - time.monotonic())) for node in nodes]
        logs = "\n".join((tmp_path / f"node-{i}.log").read_text()[-2000:] for i in range(3))
        assert codes == [0, 0, 0], logs
        reports = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(3)]
    finally:
        for process in [*nodes, *([store] if store else [])]:
            if process.poll() is None:
                process.kill()
                process.wait(30)
    assert {report["world_size"] for report in reports} == {3}
    assert {report["sum"] for report in reports} == {6.0}  # 1 + 2 + 3 across the nodes
    assert {report["run_id"] for report in reports} == {NAME}
    assert {report["nodes"] for report in reports} == {"3"}
    assert {report["share_store"] for report in reports} == {"1"}


def _host_user_data(applied: Applied) -> str:
    user_data = applied.client("ec2").describe_instance_attribute(
        InstanceId=applied.outputs["rendezvous_instance_id"], Attribute="userData"
    )["UserData"]["Value"]
    return base64.b64decode(user_data).decode()


def _host_sandbox(tmp_path: Path, wheel_source: Path | None = None) -> tuple[Path, dict]:
    root, env = _sandbox(tmp_path, wheel_source)
    python = root / sys.executable.lstrip("/")
    python.parent.mkdir(parents=True, exist_ok=True)
    python.write_text(HOST_PYTHON)
    python.chmod(0o755)
    return root, {**env, "REAL_PYTHON": sys.executable}


def test_both_user_data_scripts_are_shellcheck_clean(applied, tmp_path):
    (version,) = applied.client("ec2").describe_launch_template_versions(
        LaunchTemplateId=applied.outputs["launch_template_id"], Versions=["$Latest"]
    )["LaunchTemplateVersions"]
    scripts = {
        "node": base64.b64decode(version["LaunchTemplateData"]["UserData"]).decode(),
        "host": _host_user_data(applied),
    }
    shellcheck = Path(sys.executable).with_name("shellcheck")
    for name, script in scripts.items():
        (tmp_path / name).write_text(script)
        done = subprocess.run(
            [str(shellcheck), "--severity=style", str(tmp_path / name)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"{name}: {done.stdout}"


def test_the_host_installs_the_checked_wheel_and_starts_the_store_on_its_address(applied, tmp_path):
    root, env = _host_sandbox(tmp_path)
    commands = _commands(_run(_host_user_data(applied), env))
    sha = applied.outputs["spotguard_wheel_uri"].split("/")[-2]
    wheel = (
        f"{root}/opt/spotguard/wheels/{sha}/{applied.outputs['spotguard_wheel_uri'].split('/')[-1]}"
    )
    python = f"{root}{sys.executable}"
    assert commands == [
        f"aws s3 cp --only-show-errors --region us-east-1 "
        f"{applied.outputs['spotguard_wheel_uri']} {wheel}.part",
        f"{python} -m pip install --quiet --disable-pip-version-check {wheel}",
        f"{python} -m spotguard install-units --dest {root}/etc/systemd/system",
        "systemctl daemon-reload",
        "systemctl enable --now spotguard-rendezvous.service",
    ]
    address, port = applied.outputs["rendezvous_endpoint"].split(":")
    assert (root / "etc/spotguard/rendezvous.sh").read_text() == (
        f"#!/bin/bash\nexec {sys.executable} -m spotguard rendezvous-store "
        f"--host {address} --port {port}\n"
    )
    unit = root / "etc/systemd/system/spotguard-rendezvous.service"
    assert unit.read_bytes() == (Path(__file__).parents[2] / "systemd" / unit.name).read_bytes()
    # It runs again at every boot (a first boot cut short finishes at the next start): what is
    # done is skipped, the store started.
    per_boot = root / "var/lib/cloud/scripts/per-boot/spotguard-rendezvous-setup.sh"
    assert per_boot.read_text() == _host_user_data(applied)
    assert _commands(_run(per_boot.read_text(), env)) == [
        f"{python} -m spotguard install-units --dest {root}/etc/systemd/system",
        "systemctl daemon-reload",
        "systemctl enable --now spotguard-rendezvous.service",
    ]


def test_the_host_refuses_a_wheel_with_another_sha256(applied, tmp_path):
    other = tmp_path / "other.whl"
    other.write_bytes(b"not the uploaded wheel")
    _, env = _host_sandbox(tmp_path, other)
    path = tmp_path / "host.sh"
    path.write_text(_host_user_data(applied))
    done = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert "does not have the SHA-256 Terraform uploaded" in done.stdout + done.stderr
    calls = (tmp_path / "calls.log").read_text()
    assert "pip install" not in calls
    assert "enable" not in calls


def test_set_up_failures_that_end_the_fleet_stop_the_rendezvous_host(applied, tmp_path):
    """The max_consecutive_failures-th set-up failure in a row ends the job: the host goes
    with the fleet (as job-end stops it), or it would idle, billed, with no job."""
    (version,) = applied.client("ec2").describe_launch_template_versions(
        LaunchTemplateId=applied.outputs["launch_template_id"], Versions=["$Latest"]
    )["LaunchTemplateVersions"]
    script = base64.b64decode(version["LaunchTemplateData"]["UserData"]).decode()
    _, env = _sandbox(tmp_path, wheel_source=_impostor(tmp_path))
    (tmp_path / "status.json").write_text(
        json.dumps({"fleet": NAME, "state": "setup-failed", "setup_failures": 1})
    )
    commands = _commands(_run(script, env, ok=False))
    assert not any("stop-instances" in command for command in commands)  # 2 of 3: not yet
    commands = _commands(_run(script, env, ok=False))
    ec2 = [command for command in commands if command.startswith("aws ec2")]
    host = applied.outputs["rendezvous_instance_id"]
    assert [command.split(" --")[0] for command in ec2] == [
        "aws ec2 describe-tags",
        "aws ec2 modify-fleet",
        "aws ec2 stop-instances",
    ]
    assert ec2[-1] == f"aws ec2 stop-instances --region us-east-1 --instance-ids {host}"
    assert json.loads((tmp_path / "status.json").read_text())["fleet_ended"] is True
    assert commands[-1] == "systemctl --no-block poweroff"
