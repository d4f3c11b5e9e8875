"""``examples/basic`` applied with the real AWS provider against a moto server, read back with
boto3, then destroyed. The variables come from ``spotguard fleet render`` of a model config,
so the whole path a user takes is exercised: YAML -> tfvars JSON -> apply."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import boto3
import pytest

from tests.fleet.conftest import Terraform, basic_example_on_moto

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
    env = {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    session = boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )

    def client(service: str):
        return session.client(service, endpoint_url=moto_server)

    ec2 = client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.40.{i}.0/24", AvailabilityZone=zone)["Subnet"][
            "SubnetId"
        ]
        for i, zone in enumerate(["us-east-1a", "us-east-1b"])
    ]
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    work = basic_example_on_moto(tmp_path_factory.mktemp("moto-apply"))
    config = work / "model_config.yaml"
    config.write_text(CONFIG.format(vpc=vpc, subnet_a=subnets[0], subnet_b=subnets[1], ami=ami))
    rendered = subprocess.run(
        [
            sys.executable,
            "-m",
            "spotguard",
            "fleet",
            "render",
            str(config),
            "--out",
            str(work / "fleet.auto.tfvars.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert rendered.returncode == 0, rendered.stderr
    extra = [
        "-var",
        "terminate_instances_on_delete=false",
        "-var",
        'allowed_account_ids=["123456789012"]',
    ]
    terraform("init", "-backend=false", cwd=work)
    started = time.monotonic()
    terraform("apply", "-auto-approve", *extra, cwd=work, env=env)
    outputs = {
        name: value["value"]
        for name, value in json.loads(
            terraform("output", "-json", cwd=work, env=env).stdout
        ).items()
    }
    yield outputs, client, subnets
    terraform("destroy", "-auto-approve", *extra, cwd=work, env=env)
    print(f"apply + checks + destroy: {time.monotonic() - started:.0f} s")


def test_launch_template_requires_imdsv2_and_carries_the_user_data(applied):
    outputs, client, _ = applied
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
    outputs, client, subnets = applied
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
    outputs, client, _ = applied
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
    assert rules["expire-checkpoints"]["Filter"] == {"Prefix": "runs/it/"}
    assert rules["expire-checkpoints"]["Expiration"]["Days"] == 30


def test_instance_role_may_touch_only_its_prefix_and_queue(applied):
    outputs, client, _ = applied
    document = client("iam").get_role_policy(
        RoleName=outputs["instance_role_name"], PolicyName="spotguard-checkpoints-and-events"
    )["PolicyDocument"]
    if isinstance(document, str):
        document = json.loads(document)
    statements = {s["Sid"]: s for s in document["Statement"]}
    bucket_arn = f"arn:aws:s3:::{outputs['bucket_name']}"
    assert statements["ListCheckpointPrefix"]["Resource"] == bucket_arn
    assert statements["ListCheckpointPrefix"]["Condition"] == {
        "StringLike": {"s3:prefix": ["runs/it", "runs/it/*"]}
    }
    assert statements["ReadWriteCheckpoints"]["Resource"] == f"{bucket_arn}/runs/it/*"
    queue_arn = client("sqs").get_queue_attributes(
        QueueUrl=outputs["event_queue_url"], AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    assert statements["ConsumeFleetEvents"]["Resource"] == queue_arn


def test_a_spot_interruption_event_reaches_the_queue(applied):
    outputs, client, _ = applied
    detail = {"instance-id": "i-0123456789abcdef0", "instance-action": "terminate"}
    client("events").put_events(
        Entries=[
            {
                "Source": "aws.ec2",
                "DetailType": "EC2 Spot Instance Interruption Warning",
                "Detail": json.dumps(detail),
            }
        ]
    )
    sqs = client("sqs")
    messages = sqs.receive_message(
        QueueUrl=outputs["event_queue_url"], WaitTimeSeconds=5, MaxNumberOfMessages=10
    ).get("Messages", [])
    bodies = [json.loads(message["Body"]) for message in messages]
    assert any(
        body["detail-type"] == "EC2 Spot Instance Interruption Warning" and body["detail"] == detail
        for body in bodies
    ), bodies
    attributes = sqs.get_queue_attributes(
        QueueUrl=outputs["event_queue_url"], AttributeNames=["Policy"]
    )["Attributes"]
    (statement,) = json.loads(attributes["Policy"])["Statement"]
    assert statement["Condition"] == {"ArnEquals": {"aws:SourceArn": outputs["event_rule_arn"]}}
