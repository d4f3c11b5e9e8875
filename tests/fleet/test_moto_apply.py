"""``examples/basic`` applied with the real AWS provider against a moto server and read back
with boto3 (not destroyed: see the fixture). The variables come from ``spotguard fleet render``
of a model config, so the whole path a user takes is exercised: YAML -> tfvars JSON -> apply."""

from __future__ import annotations

import base64
import json
import time

import pytest

from tests.fleet.conftest import Terraform
from tests.fleet.moto_example import AWS_SHAPE_FIXES, apply_basic_example

# The apply alone takes about a minute here (the provider's own S3 and SQS waiters), and the
# module fixture's setup counts against the first test's limit.
pytestmark = pytest.mark.timeout(480)

CONFIG = """
model:
  name: IT Fleet
  command: python /opt/train/train.py
infrastructure:
  region: us-east-1
  network:
    vpc_id: {vpc}
    subnet_ids: [{subnet_a}, {subnet_b}]
  training:
    instance_types: [g5.xlarge, g6.xlarge]
    capacity_units: 1
    spot_max_price: 2.5
    ami_id: {ami}
  checkpoints:
    prefix: runs/it
"""


@pytest.fixture(scope="module")
def applied(terraform: Terraform, tmp_path_factory, moto_server):
    started = time.monotonic()
    done = apply_basic_example(
        terraform,
        tmp_path_factory.mktemp("moto-apply"),
        moto_server,
        CONFIG,
        ["us-east-1a", "us-east-1b"],
    )
    yield done.outputs, done.client, done.subnets, done.plan
    done.plan.proxy.close()
    # No destroy: the moto server and the working copy go away with their fixtures, and a
    # destroy on moto proves little (it enforces neither IAM nor the order of deletion) for
    # 35 s of the suite's time.
    print(f"apply + checks: {time.monotonic() - started:.0f} s")


def test_launch_template_requires_imdsv2_and_carries_the_user_data(applied):
    outputs, client, *_ = applied
    (version,) = client("ec2").describe_launch_template_versions(
        LaunchTemplateId=outputs["launch_template_id"], Versions=["$Latest"]
    )["LaunchTemplateVersions"]
    data = version["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 2
    (root,) = data["BlockDeviceMappings"]
    assert root["Ebs"]["Encrypted"] is True
    assert root["Ebs"]["VolumeType"] == "gp3"
    assert data["Monitoring"]["Enabled"] is True
    script = base64.b64decode(data["UserData"]).decode()
    assert "set -euo pipefail" in script
    assert f"SPOTGUARD_CHECKPOINT_URI={outputs['checkpoint_uri']}" in script
    assert outputs["checkpoint_uri"] == "s3://it-fleet-ckpt-123456789012-us-east-1/runs/it"


def test_fleet_overrides_and_spot_options(applied):
    outputs, client, subnets, _ = applied
    (fleet,) = client("ec2").describe_fleets(FleetIds=[outputs["fleet_id"]])["Fleets"]
    assert fleet["Type"] == "maintain"
    overrides = fleet["LaunchTemplateConfigs"][0]["Overrides"]
    pairs = {(o["InstanceType"], o["SubnetId"]) for o in overrides}
    assert pairs == {(t, s) for t in ("g5.xlarge", "g6.xlarge") for s in subnets}
    assert {o["MaxPrice"] for o in overrides} == {"2.5"}
    spot = fleet["SpotOptions"]
    assert spot["AllocationStrategy"] == "price-capacity-optimized"
    rebalance = spot["MaintenanceStrategies"]["CapacityRebalance"]
    assert rebalance == {"ReplacementStrategy": "launch-before-terminate", "TerminationDelay": 300}
    capacity = fleet["TargetCapacitySpecification"]
    assert capacity["TotalTargetCapacity"] == 1
    assert capacity["DefaultTargetCapacityType"] == "spot"


def test_bucket_is_encrypted_private_tls_only_with_lifecycle(applied):
    outputs, client, *_ = applied
    s3, bucket = client("s3"), outputs["bucket_name"]
    rule = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values())
    assert len(block) == 4
    ownership = s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"]
    assert ownership == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    (statement,) = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])["Statement"]
    assert statement["Effect"] == "Deny"
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert rules["abort-incomplete-multipart-uploads"]["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": 1
    }
    noncurrent = rules["expire-noncurrent-checkpoint-versions"]
    assert noncurrent["Filter"] == {"Prefix": "runs/it/"}
    assert noncurrent["NoncurrentVersionExpiration"]["NoncurrentDays"] == 7
    # The newest checkpoint of a paused run never expires.
    assert [rule for rule in rules.values() if "Expiration" in rule] == []


def test_instance_role_may_touch_only_its_prefix(applied):
    outputs, client, *_ = applied
    document = client("iam").get_role_policy(
        RoleName=outputs["instance_role_name"], PolicyName="spotguard-checkpoints"
    )["PolicyDocument"]
    if isinstance(document, str):
        document = json.loads(document)
    statements = {s["Sid"]: s for s in document["Statement"]}
    bucket_arn = f"arn:aws:s3:::{outputs['bucket_name']}"
    assert statements["ListCheckpointPrefix"]["Resource"] == bucket_arn
    # runs/it/ and below: never a sibling such as runs/it-2
    assert statements["ListCheckpointPrefix"]["Condition"] == {
        "StringLike": {"s3:prefix": ["runs/it/", "runs/it/*"]}
    }
    assert statements["ReadWriteCheckpoints"]["Resource"] == f"{bucket_arn}/runs/it/*"
    actions = json.dumps([statement["Action"] for statement in document["Statement"]])
    assert "sqs:" not in actions, "nothing on a node uses the event queue"


def test_only_this_fleets_events_reach_the_queue(applied):
    outputs, client, *_ = applied
    ours, other = outputs["fleet_arn"], outputs["fleet_arn"][:-4] + "ffff"
    assert ours != other
    error = {"sub-type": "spotFleetRequestConfigurationInvalid", "description": "launch failed"}
    interruption = {"instance-id": "i-0123456789abcdef0", "instance-action": "terminate"}
    client("events").put_events(
        Entries=[
            {
                "Source": "aws.ec2fleet",
                "DetailType": "EC2 Fleet Error",
                "Resources": [ours],
                "Detail": json.dumps(error),
            },
            {  # another fleet's
                "Source": "aws.ec2fleet",
                "DetailType": "EC2 Fleet Error",
                "Resources": [other],
                "Detail": json.dumps({**error, "description": "not ours"}),
            },
            {  # an instance anywhere in the Region: nothing ties it to this fleet
                "Source": "aws.ec2",
                "DetailType": "EC2 Spot Instance Interruption Warning",
                "Resources": ["arn:aws:ec2:us-east-1:123456789012:instance/i-0123456789abcdef0"],
                "Detail": json.dumps(interruption),
            },
        ]
    )
    sqs = client("sqs")
    messages = sqs.receive_message(
        QueueUrl=outputs["event_queue_url"], WaitTimeSeconds=5, MaxNumberOfMessages=10
    ).get("Messages", [])
    bodies = [json.loads(message["Body"]) for message in messages]
    assert [(body["detail-type"], body["resources"], body["detail"]) for body in bodies] == [
        ("EC2 Fleet Error", [ours], error)
    ]
    attributes = sqs.get_queue_attributes(
        QueueUrl=outputs["event_queue_url"], AttributeNames=["Policy"]
    )["Attributes"]
    (statement,) = json.loads(attributes["Policy"])["Statement"]
    assert statement["Condition"] == {"ArnEquals": {"aws:SourceArn": outputs["event_rule_arn"]}}


def test_a_plan_after_the_apply_changes_nothing(applied):
    """The drift check's plan must say "No changes" (exit 0): any diff on the fleet would be
    a replacement, and replacing a fleet terminates every node."""
    *_, plan = applied
    done = plan()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No changes." in done.stdout
    # The plan read the fleet and the launch template through the proxy.
    assert set(plan.proxy.rewritten) == set(AWS_SHAPE_FIXES)


def test_a_capacity_other_than_the_node_count_is_refused(applied):
    *_, plan = applied
    done = plan("-var", "target_capacity=2", refresh=False)
    assert done.returncode == 1
    assert "target_capacity must be nodes" in " ".join((done.stdout + done.stderr).split())
    assert "must be replaced" not in done.stdout


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        ("capacity_rebalance_termination_delay=600", "ModifyFleet cannot change it"),
        ("on_demand_base_capacity=1", "fixed when the fleet is created"),
    ],
)
def test_a_change_ec2_fleet_cannot_make_in_place_is_refused_not_a_replacement(
    applied, variable, message
):
    """EC2 Fleet cannot change these in place: the provider would replace the fleet (the
    spot/on-demand split is ForceNew) or plan an update ModifyFleet never sends (the
    termination delay: a diff forever). The plan stops with the reason instead."""
    *_, plan = applied
    done = plan("-var", variable, refresh=False)
    text = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, text
    assert message in text
    assert "must be replaced" not in text
