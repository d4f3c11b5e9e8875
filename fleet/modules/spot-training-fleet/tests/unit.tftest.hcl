# Unit tests of the module with a mocked AWS provider: no credentials, no network.
# Run from the module folder: terraform init -backend=false && terraform test

mock_provider "aws" {
  mock_data "aws_caller_identity" {
    defaults = {
      account_id = "123456789012"
      arn        = "arn:aws:iam::123456789012:user/test"
      user_id    = "AIDATEST"
    }
  }
  mock_data "aws_region" {
    defaults = { name = "us-east-1" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws", dns_suffix = "amazonaws.com" }
  }
  mock_data "aws_ami" {
    defaults = { id = "ami-0123456789abcdef0" }
  }
  # One GPU, as each default instance type has; runs below override it per type.
  mock_data "aws_ec2_instance_type" {
    defaults = { gpus = [{ count = 1, manufacturer = "NVIDIA", memory_size = 22888, name = "A10G" }] }
  }
  mock_resource "aws_sqs_queue" {
    defaults = { arn = "arn:aws:sqs:us-east-1:123456789012:unit-spot-events" }
  }
  mock_resource "aws_cloudwatch_event_rule" {
    defaults = { arn = "arn:aws:events:us-east-1:123456789012:rule/unit-spot-events" }
  }
  mock_resource "aws_iam_role" {
    defaults = { arn = "arn:aws:iam::123456789012:role/unit-node" }
  }
  mock_resource "aws_iam_instance_profile" {
    defaults = { arn = "arn:aws:iam::123456789012:instance-profile/unit-node" }
  }
  mock_resource "aws_ec2_fleet" {
    defaults = { arn = "arn:aws:ec2:us-east-1:123456789012:fleet/fleet-unit" }
  }
  mock_resource "aws_launch_template" {
    defaults = { arn = "arn:aws:ec2:us-east-1:123456789012:launch-template/lt-unit" }
  }
  mock_data "aws_subnet" {
    defaults = { cidr_block = "10.0.1.0/24", map_public_ip_on_launch = false }
  }
  mock_resource "aws_network_interface" {
    defaults = { id = "eni-0rendezvous00000", private_ip = "10.0.1.23" }
  }
  mock_resource "aws_instance" {
    defaults = { id = "i-0rendezvous00000", arn = "arn:aws:ec2:us-east-1:123456789012:instance/i-0rendezvous00000" }
  }
  mock_resource "aws_security_group" {
    defaults = { id = "sg-0mock000000000000" }
  }
}

variables {
  name             = "unit"
  vpc_id           = "vpc-0123456789abcdef0"
  subnet_ids       = ["subnet-aaaa", "subnet-bbbb"]
  training_command = "python /opt/train/train.py --config big.yaml"
  # Any file will do: the module only hashes and uploads it (the fixture is not a real wheel).
  spotguard_wheel_path = "tests/fixtures/spotguard-0.1.0-py3-none-any.whl"
}

run "launch_template_imdsv2_encryption_monitoring" {
  command = plan

  assert {
    condition     = aws_launch_template.nodes.metadata_options[0].http_tokens == "required"
    error_message = "IMDSv2 must be required."
  }
  assert {
    condition     = aws_launch_template.nodes.metadata_options[0].http_put_response_hop_limit == 2
    error_message = "The hop limit must default to 2 (containers)."
  }
  assert {
    condition     = aws_launch_template.nodes.metadata_options[0].http_endpoint == "enabled"
    error_message = "IMDS must stay reachable: the agent polls it."
  }
  assert {
    condition     = aws_launch_template.nodes.metadata_options[0].instance_metadata_tags == "disabled"
    error_message = "Tags stay out of IMDS: nothing reads them there, and a key with a space or / would fail every launch."
  }
  assert {
    condition     = aws_launch_template.nodes.block_device_mappings[0].ebs[0].encrypted == "true"
    error_message = "The root volume must be encrypted."
  }
  assert {
    condition     = aws_launch_template.nodes.block_device_mappings[0].ebs[0].volume_type == "gp3" && aws_launch_template.nodes.block_device_mappings[0].ebs[0].volume_size == 200
    error_message = "The root volume must be gp3 of the configured size."
  }
  assert {
    condition     = aws_launch_template.nodes.monitoring[0].enabled
    error_message = "Detailed monitoring must be on."
  }
  assert {
    condition     = terraform_data.ami[0].input == "ami-0123456789abcdef0"
    error_message = "Without ami_id, the AMI comes from the name filter lookup (the launch template takes it from terraform_data.ami: ami_found_at_the_first_apply)."
  }
  assert {
    condition     = toset([for spec in aws_launch_template.nodes.tag_specifications : spec.resource_type]) == toset(["instance", "volume"])
    error_message = "Instances and volumes must be tagged."
  }
  assert {
    condition     = alltrue([for spec in aws_launch_template.nodes.tag_specifications : spec.tags["spotguard:fleet"] == "unit"])
    error_message = "Every launched resource carries the spotguard:fleet tag (the FIS drill selects by it)."
  }
}

run "security_group_lets_out_only_https_and_in_only_the_fleet" {
  command = plan

  assert {
    condition     = toset([for rule in aws_security_group.nodes.egress : "${rule.protocol}/${rule.from_port}/${join(",", coalesce(rule.cidr_blocks, []))}/${coalesce(rule.self, false)}"]) == toset(["tcp/443/0.0.0.0/0/false", "-1/0//true"])
    error_message = "Egress: HTTPS anywhere, anything to the fleet's own nodes; nothing else."
  }
  assert {
    condition     = length(aws_security_group.nodes.ingress) == 1 && alltrue([for rule in aws_security_group.nodes.ingress : coalesce(rule.self, false) && length(coalesce(rule.cidr_blocks, [])) == 0])
    error_message = "Ingress only from the fleet's own nodes."
  }
}

run "hop_limit_and_kms_are_variables" {
  command = plan
  variables {
    metadata_hop_limit = 1
    kms_key_arn        = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
    ami_id             = "ami-0fedcba9876543210"
  }

  assert {
    condition     = aws_launch_template.nodes.metadata_options[0].http_put_response_hop_limit == 1
    error_message = "metadata_hop_limit must reach the launch template."
  }
  assert {
    condition     = aws_launch_template.nodes.block_device_mappings[0].ebs[0].kms_key_id == var.kms_key_arn
    error_message = "kms_key_arn must encrypt the root volume."
  }
  assert {
    condition     = one(aws_s3_bucket_server_side_encryption_configuration.checkpoints[0].rule).apply_server_side_encryption_by_default[0].sse_algorithm == "aws:kms"
    error_message = "kms_key_arn must encrypt the bucket with SSE-KMS."
  }
  assert {
    condition     = aws_sqs_queue.events.kms_master_key_id == var.kms_key_arn
    error_message = "kms_key_arn must encrypt the queue."
  }
  assert {
    condition     = aws_launch_template.nodes.image_id == "ami-0fedcba9876543210" && length(data.aws_ami.selected) == 0
    error_message = "An explicit ami_id skips the lookup."
  }
}

run "fleet_overrides_allocation_and_rebalance" {
  command = plan

  assert {
    condition     = aws_ec2_fleet.training.type == "maintain"
    error_message = "The fleet must maintain capacity (replace interrupted instances)."
  }
  assert {
    condition     = length(aws_ec2_fleet.training.launch_template_config[0].override) == 8
    error_message = "4 instance types x 2 subnets = 8 overrides."
  }
  assert {
    condition = toset([for o in aws_ec2_fleet.training.launch_template_config[0].override : "${o.instance_type}/${o.subnet_id}"]) == toset([
      for pair in setproduct(var.instance_types, var.subnet_ids) : "${pair[0]}/${pair[1]}"
    ])
    error_message = "Every (instance type, subnet) pair must be an override, once."
  }
  assert {
    condition     = alltrue([for o in aws_ec2_fleet.training.launch_template_config[0].override : o.weighted_capacity == 1 && o.priority == 0])
    error_message = "Weight and priority are stated (AWS reads them back; unset they would be a change on every plan)."
  }
  assert {
    condition     = aws_ec2_fleet.training.spot_options[0].allocation_strategy == "price-capacity-optimized"
    error_message = "Spot allocation must be price-capacity-optimized."
  }
  assert {
    condition     = aws_ec2_fleet.training.spot_options[0].maintenance_strategies[0].capacity_rebalance[0].replacement_strategy == "launch-before-terminate"
    error_message = "Capacity rebalance must launch before terminating (launch sends TerminationDelay=0)."
  }
  assert {
    condition     = aws_ec2_fleet.training.spot_options[0].maintenance_strategies[0].capacity_rebalance[0].termination_delay == 300
    error_message = "The termination delay must default to 300 s."
  }
  assert {
    condition     = aws_ec2_fleet.training.target_capacity_specification[0].default_target_capacity_type == "spot" && aws_ec2_fleet.training.target_capacity_specification[0].spot_target_capacity == 1 && aws_ec2_fleet.training.target_capacity_specification[0].on_demand_target_capacity == 0
    error_message = "By default the whole capacity is spot."
  }
  assert {
    condition     = aws_ec2_fleet.training.terminate_instances == true
    error_message = "Destroying the fleet terminates its instances unless told otherwise."
  }
  assert {
    condition     = length(aws_iam_service_linked_role.ec2_fleet) == 0
    error_message = "The service-linked role is opt-in (it exists once per account)."
  }
}

run "on_demand_base_price_cap_and_service_linked_role" {
  command = plan
  variables {
    on_demand_base_capacity          = 1
    spot_max_price                   = "1.25"
    create_fleet_service_linked_role = true
    terminate_instances_on_delete    = false
  }

  assert {
    condition     = aws_ec2_fleet.training.target_capacity_specification[0].on_demand_target_capacity == 1 && aws_ec2_fleet.training.target_capacity_specification[0].spot_target_capacity == 0 && aws_ec2_fleet.training.target_capacity_specification[0].total_target_capacity == 1
    error_message = "An on-demand base of 1 makes the one node on-demand."
  }
  assert {
    condition     = alltrue([for o in aws_ec2_fleet.training.launch_template_config[0].override : o.max_price == "1.25"])
    error_message = "spot_max_price caps every override."
  }
  assert {
    condition     = aws_iam_service_linked_role.ec2_fleet[0].aws_service_name == "ec2fleet.amazonaws.com"
    error_message = "The EC2 Fleet service-linked role is created on request."
  }
  assert {
    condition     = aws_ec2_fleet.training.terminate_instances == false
    error_message = "terminate_instances_on_delete must reach the fleet."
  }
}

run "attribute_based_selection" {
  command = plan
  variables {
    instance_types         = []
    allow_gpu_count_change = true
    instance_requirements = {
      accelerator_count_min      = 1
      accelerator_count_max      = 4
      accelerator_memory_mib_min = 24576
      vcpu_min                   = 8
      memory_mib_min             = 32768
    }
  }

  assert {
    condition     = length(aws_ec2_fleet.training.launch_template_config[0].override) == 2
    error_message = "One override per subnet with attribute-based selection."
  }
  assert {
    condition = alltrue([
      for o in aws_ec2_fleet.training.launch_template_config[0].override :
      o.instance_requirements[0].accelerator_manufacturers == toset(["nvidia"]) && o.instance_requirements[0].accelerator_types == toset(["gpu"]) && o.instance_requirements[0].accelerator_count[0].min == 1 && o.instance_requirements[0].accelerator_count[0].max == 4 && o.instance_requirements[0].accelerator_total_memory_mib[0].min == 24576 && o.instance_requirements[0].vcpu_count[0].min == 8 && o.instance_requirements[0].memory_mib[0].min == 32768
    ])
    error_message = "The requirements must reach every override."
  }
  assert {
    condition     = alltrue([for o in aws_ec2_fleet.training.launch_template_config[0].override : o.instance_requirements[0].allowed_instance_types == toset(var.allowed_instance_types) && contains(var.allowed_instance_types, "g5.*") && !contains(var.allowed_instance_types, "*")])
    error_message = "Attribute-based selection is restricted to the allow-list of GPU types the Deep Learning AMI supports."
  }
}

run "attribute_based_selection_keeps_the_gpu_count" {
  command = plan
  variables {
    instance_types        = []
    instance_requirements = { accelerator_count_min = 4 }
  }

  assert {
    condition     = alltrue([for o in aws_ec2_fleet.training.launch_template_config[0].override : o.instance_requirements[0].accelerator_count[0].min == 4 && o.instance_requirements[0].accelerator_count[0].max == 4])
    error_message = "Without allow_gpu_count_change, min = max GPUs: a replacement keeps the world size."
  }
}

# A plan before the first apply: once the fleet exists, a termination delay change is refused.
run "lease_wait_follows_the_termination_delay" {
  command = plan
  variables {
    capacity_rebalance_termination_delay = 3600
  }

  assert {
    condition     = strcontains(output.user_data, "SPOTGUARD_LEASE_WAIT=3840\n")
    error_message = "The lease wait follows the termination delay."
  }
  # Above NCCL's default timeout: a warning naming what to do, not an error.
  expect_failures = [check.lease_wait_within_the_default_process_group_timeout]
}

run "iam_policy_scoped_to_the_prefix" {
  command = apply
  variables {
    checkpoint_prefix = "runs/llm"
    enable_ssm        = false
  }

  assert {
    condition     = one([for s in jsondecode(aws_iam_role_policy.nodes.policy).Statement : s if s.Sid == "ListCheckpointPrefix"]).Condition.StringLike["s3:prefix"] == ["runs/llm/", "runs/llm/*"]
    error_message = "ListBucket must be conditioned on the checkpoint prefix and what is below it, never on a sibling such as runs/llm-7b."
  }
  assert {
    condition     = one([for s in jsondecode(aws_iam_role_policy.nodes.policy).Statement : s if s.Sid == "ReadWriteCheckpoints"]).Resource == "arn:aws:s3:::unit-ckpt-123456789012-us-east-1/runs/llm/*"
    error_message = "Object access must be limited to the prefix of the fleet's bucket."
  }
  assert {
    condition     = !anytrue([for s in jsondecode(aws_iam_role_policy.nodes.policy).Statement : anytrue([for action in flatten([s.Action]) : startswith(action, "sqs:") || action == "s3:*"])])
    error_message = "Nodes touch checkpoint objects only: nothing on them consumes the event queue."
  }
  assert {
    condition     = length(aws_iam_role_policy_attachment.ssm) == 0
    error_message = "enable_ssm = false attaches no SSM policy."
  }
  assert {
    condition     = output.checkpoint_uri == "s3://unit-ckpt-123456789012-us-east-1/runs/llm"
    error_message = "The checkpoint URI names the bucket and prefix."
  }
}

run "bucket_private_encrypted_tls_only_with_lifecycle" {
  command = apply

  assert {
    condition     = jsondecode(aws_s3_bucket_policy.checkpoints[0].policy).Statement[0].Effect == "Deny" && jsondecode(aws_s3_bucket_policy.checkpoints[0].policy).Statement[0].Condition.Bool["aws:SecureTransport"] == "false" && length(jsondecode(aws_s3_bucket_policy.checkpoints[0].policy).Statement[0].Resource) == 2 && endswith(jsondecode(aws_s3_bucket_policy.checkpoints[0].policy).Statement[0].Resource[1], "/*")
    error_message = "The bucket policy must deny non-TLS access to the bucket and to every object."
  }
  assert {
    condition     = aws_s3_bucket_public_access_block.checkpoints[0].block_public_acls && aws_s3_bucket_public_access_block.checkpoints[0].block_public_policy && aws_s3_bucket_public_access_block.checkpoints[0].ignore_public_acls && aws_s3_bucket_public_access_block.checkpoints[0].restrict_public_buckets
    error_message = "All public access must be blocked."
  }
  assert {
    condition     = aws_s3_bucket_ownership_controls.checkpoints[0].rule[0].object_ownership == "BucketOwnerEnforced"
    error_message = "ACLs must be disabled (bucket owner enforced)."
  }
  assert {
    condition     = one(aws_s3_bucket_server_side_encryption_configuration.checkpoints[0].rule).apply_server_side_encryption_by_default[0].sse_algorithm == "AES256"
    error_message = "Without a KMS key the bucket uses SSE-S3."
  }
  assert {
    condition     = one([for r in aws_s3_bucket_lifecycle_configuration.checkpoints[0].rule : r if r.id == "abort-incomplete-multipart-uploads"]).abort_incomplete_multipart_upload[0].days_after_initiation == 1
    error_message = "Unfinished multipart uploads must be aborted."
  }
  assert {
    condition     = one([for r in aws_s3_bucket_lifecycle_configuration.checkpoints[0].rule : r if r.id == "expire-noncurrent-checkpoint-versions"]).filter[0].prefix == "checkpoints/" && one([for r in aws_s3_bucket_lifecycle_configuration.checkpoints[0].rule : r if r.id == "expire-noncurrent-checkpoint-versions"]).noncurrent_version_expiration[0].noncurrent_days == 7
    error_message = "Versions that are no longer current expire under the checkpoint prefix."
  }
  assert {
    condition     = alltrue([for r in aws_s3_bucket_lifecycle_configuration.checkpoints[0].rule : length(r.expiration) == 0])
    error_message = "No rule expires current objects: the newest checkpoint of a paused run must survive the pause."
  }
  assert {
    condition     = aws_s3_bucket.checkpoints[0].force_destroy == false
    error_message = "A bucket holding checkpoints is not destroyed by default."
  }
}

run "queue_admits_only_the_rule" {
  command = apply

  assert {
    condition     = jsondecode(aws_sqs_queue_policy.events.policy).Statement[0].Condition.ArnEquals["aws:SourceArn"] == aws_cloudwatch_event_rule.spot_events.arn
    error_message = "Only the module's EventBridge rule may send to the queue."
  }
  assert {
    condition     = jsondecode(aws_sqs_queue_policy.events.policy).Statement[0].Principal.Service == "events.amazonaws.com" && jsondecode(aws_sqs_queue_policy.events.policy).Statement[0].Action == "sqs:SendMessage"
    error_message = "EventBridge may only send messages."
  }
  assert {
    condition     = aws_sqs_queue.events.sqs_managed_sse_enabled == true
    error_message = "The queue must be encrypted."
  }
  assert {
    condition     = jsondecode(aws_cloudwatch_event_rule.spot_events.event_pattern).source == ["aws.ec2fleet"] && jsondecode(aws_cloudwatch_event_rule.spot_events.event_pattern).resources == ["arn:aws:ec2:us-east-1:123456789012:fleet/fleet-unit"] && output.fleet_arn == "arn:aws:ec2:us-east-1:123456789012:fleet/fleet-unit"
    error_message = "The rule matches this fleet's own events only (by its ARN), not every instance in the Region."
  }
  assert {
    condition     = contains(jsondecode(aws_cloudwatch_event_rule.spot_events.event_pattern)["detail-type"], "EC2 Fleet Error") && contains(jsondecode(aws_cloudwatch_event_rule.spot_events.event_pattern)["detail-type"], "EC2 Fleet Instance Change")
    error_message = "The rule catches launch failures (EC2 Fleet Error) and instance changes."
  }
  assert {
    condition     = aws_cloudwatch_event_target.queue.arn == aws_sqs_queue.events.arn
    error_message = "The rule delivers to the queue."
  }
}

run "existing_bucket" {
  command = apply
  variables {
    create_bucket = false
    bucket_name   = "my-existing-checkpoints"
  }

  assert {
    condition     = length(aws_s3_bucket.checkpoints) == 0 && length(aws_s3_bucket_policy.checkpoints) == 0 && length(aws_s3_bucket_lifecycle_configuration.checkpoints) == 0
    error_message = "An existing bucket is used, not created or reconfigured."
  }
  assert {
    condition     = data.aws_s3_bucket.existing[0].bucket == "my-existing-checkpoints"
    error_message = "The existing bucket is looked up, so that a missing one fails the plan, not a node at boot."
  }
  assert {
    condition     = one([for s in jsondecode(aws_iam_role_policy.nodes.policy).Statement : s if s.Sid == "ReadWriteCheckpoints"]).Resource == "arn:aws:s3:::my-existing-checkpoints/checkpoints/*"
    error_message = "The role is scoped to the existing bucket's prefix."
  }
}

run "user_data_installs_configures_and_starts" {
  command = plan

  assert {
    condition     = startswith(output.user_data, "#!/bin/bash") && strcontains(output.user_data, "set -euo pipefail")
    error_message = "User data is strict bash."
  }
  assert {
    condition     = strcontains(output.user_data, "WHEEL_URI='s3://unit-ckpt-123456789012-us-east-1/spotguard/wheels/1b628ab4d6a299069aabfa7b3eddaf9538da5712ae7df642e9d439c1a57ce132/spotguard-0.1.0-py3-none-any.whl'") && strcontains(output.user_data, "WHEEL_SHA256='1b628ab4d6a299069aabfa7b3eddaf9538da5712ae7df642e9d439c1a57ce132'") && strcontains(output.user_data, "EXTRAS='[s3,lightning]'") && strcontains(output.user_data, "TRAINING_PYTHON='/opt/pytorch/bin/python'")
    error_message = "User data installs the uploaded wheel (checked against its SHA-256), with its extras into the Deep Learning AMI's PyTorch environment."
  }
  assert {
    condition     = !strcontains(output.user_data, "spotguard==") && !can(regex("pip install[^\\n]*[ \"']spotguard", output.user_data))
    error_message = "User data never installs spotguard by name from a package index."
  }
  assert {
    condition     = strcontains(output.user_data, "STATUS_URI='s3://unit-ckpt-123456789012-us-east-1/spotguard/status/unit.json'") && strcontains(output.user_data, "SPOTGUARD_STATUS_URI=$STATUS_URI") && strcontains(output.user_data, "SPOTGUARD_MAX_FAILURES=3")
    error_message = "User data gives job-end its status object and failure limit."
  }
  assert {
    condition     = strcontains(output.user_data, "SPOTGUARD_LEASE_WAIT=540\n")
    error_message = "A rebalance replacement's trainer waits for the writer lease longer than the termination delay (300) + the notice (120) + the lease TTL (60)."
  }
  assert {
    condition     = strcontains(output.user_data, "SPOTGUARD_CHECKPOINT_URI=s3://unit-ckpt-123456789012-us-east-1/checkpoints")
    error_message = "User data gives training its checkpoint URI."
  }
  assert {
    condition     = strcontains(output.user_data, "exec python /opt/train/train.py --config big.yaml")
    error_message = "User data runs the training command."
  }
  assert {
    condition     = strcontains(output.user_data, "X-aws-ec2-metadata-token") && !strcontains(output.user_data, "meta-data/instance-id\"")
    error_message = "Metadata is read with an IMDSv2 token."
  }
  assert {
    condition     = aws_launch_template.nodes.user_data == base64encode(output.user_data)
    error_message = "The launch template carries the rendered user data."
  }
}

run "wheel_from_s3" {
  command = plan
  variables {
    spotguard_wheel_path   = null
    spotguard_wheel_s3_uri = "s3://artifacts-bucket/wheels/spotguard-0.1.0-py3-none-any.whl"
    spotguard_wheel_sha256 = "5d41402abc4b2a76b9719d911017c592ae2d2b1f5d41402abc4b2a76b9719d91"
  }

  assert {
    condition     = strcontains(output.user_data, "WHEEL_URI='s3://artifacts-bucket/wheels/spotguard-0.1.0-py3-none-any.whl'") && strcontains(output.user_data, "WHEEL_SHA256='5d41402abc4b2a76b9719d911017c592ae2d2b1f5d41402abc4b2a76b9719d91'") && strcontains(output.user_data, "EXTRAS='[s3,lightning]'")
    error_message = "User data installs the wheel from S3, checked against the SHA-256 given, with the extras."
  }
}

run "fis_drill_targets_the_fleet_by_tag" {
  command = apply
  variables {
    create_fis_experiment   = true
    fis_interruption_target = "PERCENT(50)"
  }

  assert {
    condition     = one(aws_fis_experiment_template.spot_interruption[0].action).action_id == "aws:ec2:send-spot-instance-interruptions"
    error_message = "The experiment sends spot interruptions."
  }
  assert {
    condition     = one(aws_fis_experiment_template.spot_interruption[0].target).selection_mode == "PERCENT(50)" && one(one(aws_fis_experiment_template.spot_interruption[0].target).resource_tag).value == "unit"
    error_message = "The experiment selects the fleet's spot instances by tag."
  }
  assert {
    condition     = jsondecode(aws_iam_role_policy.fis[0].policy).Statement[0].Condition.StringEquals["aws:ResourceTag/spotguard:fleet"] == "unit"
    error_message = "The FIS role may interrupt only the fleet's instances."
  }
}

# -- every validation rejects what would silently break spot handling -------------------------

run "too_many_overrides" {
  command = plan
  variables {
    instance_types = [for i in range(26) : "g5.${i}xlarge"]
  }
  expect_failures = [var.instance_types]
}

run "termination_delay_below_120" {
  command = plan
  variables {
    capacity_rebalance_termination_delay = 0
  }
  expect_failures = [var.capacity_rebalance_termination_delay]
}

run "termination_delay_above_7200" {
  command = plan
  variables {
    capacity_rebalance_termination_delay = 7201
  }
  expect_failures = [var.capacity_rebalance_termination_delay]
}

run "hop_limit_zero" {
  command = plan
  variables {
    metadata_hop_limit = 0
  }
  expect_failures = [var.metadata_hop_limit]
}

run "on_demand_base_above_capacity" {
  command = plan
  variables {
    on_demand_base_capacity = 2
  }
  expect_failures = [var.on_demand_base_capacity]
}

run "capacity_zero_pauses_the_job" {
  command = plan
  variables {
    target_capacity = 0
  }

  assert {
    condition     = aws_ec2_fleet.training.target_capacity_specification[0].total_target_capacity == 0
    error_message = "0 is a target capacity: a paused job, or the state a finished job left its fleet in."
  }
}

run "bad_name" {
  command = plan
  variables {
    name = "Bad_Name"
  }
  expect_failures = [var.name]
}

run "no_subnets" {
  command = plan
  variables {
    subnet_ids = []
  }
  expect_failures = [var.subnet_ids]
}

run "bad_spot_price" {
  command = plan
  variables {
    spot_max_price = "cheap"
  }
  expect_failures = [var.spot_max_price]
}

run "bad_version" {
  command = plan
  variables {
    spotguard_version = ">=0.1"
  }
  expect_failures = [var.spotguard_version]
}

run "wheel_from_s3_without_its_sha256" {
  command = plan
  variables {
    spotguard_wheel_path   = null
    spotguard_wheel_s3_uri = "s3://artifacts-bucket/wheels/spotguard-0.1.0-py3-none-any.whl"
  }
  expect_failures = [var.spotguard_wheel_sha256]
}

run "bad_wheel_uri" {
  command = plan
  variables {
    spotguard_wheel_path   = null
    spotguard_wheel_s3_uri = "https://example.com/spotguard.whl"
    spotguard_wheel_sha256 = "5d41402abc4b2a76b9719d911017c592ae2d2b1f5d41402abc4b2a76b9719d91"
  }
  expect_failures = [var.spotguard_wheel_s3_uri]
}

run "multi_line_training_command" {
  command = plan
  variables {
    training_command = "python a.py\nrm -rf /"
  }
  expect_failures = [var.training_command]
}

run "empty_training_command" {
  command = plan
  variables {
    training_command = "  "
  }
  expect_failures = [var.training_command]
}

run "relative_training_python" {
  command = plan
  variables {
    training_python = "python3"
  }
  expect_failures = [var.training_python]
}

run "bad_training_user" {
  command = plan
  variables {
    training_user = "root; reboot"
  }
  expect_failures = [var.training_user]
}

run "bad_checkpoint_prefix" {
  command = plan
  variables {
    checkpoint_prefix = "/checkpoints/"
  }
  expect_failures = [var.checkpoint_prefix]
}

run "bad_bucket_name" {
  command = plan
  variables {
    bucket_name = "Not_A_Bucket"
  }
  expect_failures = [var.bucket_name]
}

run "root_volume_too_small" {
  command = plan
  variables {
    root_volume_size_gb = 4
  }
  expect_failures = [var.root_volume_size_gb]
}

run "bad_noncurrent_and_multipart_days" {
  command = plan
  variables {
    noncurrent_version_expiration_days = 0
    abort_incomplete_multipart_days    = 0
  }
  expect_failures = [var.noncurrent_version_expiration_days, var.abort_incomplete_multipart_days]
}

run "bad_event_retention" {
  command = plan
  variables {
    event_retention_seconds = 30
  }
  expect_failures = [var.event_retention_seconds]
}

run "bad_fis_target" {
  command = plan
  variables {
    fis_interruption_target = "SOME"
  }
  expect_failures = [var.fis_interruption_target]
}

run "bad_accelerator_manufacturer" {
  command = plan
  variables {
    instance_types        = []
    instance_requirements = { accelerator_manufacturers = ["intel"] }
  }
  expect_failures = [var.instance_requirements]
}

run "gpu_count_zero" {
  command = plan
  variables {
    instance_types        = []
    instance_requirements = { accelerator_count_min = 0 }
  }
  expect_failures = [var.instance_requirements]
}

run "neither_types_nor_requirements" {
  command = plan
  variables {
    instance_types = []
  }
  expect_failures = [aws_ec2_fleet.training]
}

run "attribute_based_selection_in_more_than_50_subnets" {
  command = plan
  variables {
    instance_types        = []
    instance_requirements = {}
    subnet_ids            = [for i in range(51) : "subnet-${i}"]
  }
  expect_failures = [aws_ec2_fleet.training]
}

run "capacity_other_than_nodes" {
  command = plan
  variables {
    target_capacity = 2
  }
  expect_failures = [var.target_capacity]
}

run "single_node_has_no_rendezvous" {
  command = plan

  assert {
    condition     = length(aws_instance.rendezvous) == 0 && length(aws_network_interface.rendezvous) == 0 && length(aws_placement_group.nodes) == 0
    error_message = "A single-node job needs no rendezvous host."
  }
  assert {
    condition     = output.training_script == "exec python /opt/train/train.py --config big.yaml" && !strcontains(output.user_data, "SPOTGUARD_RDZV_ENDPOINT")
    error_message = "A single-node job runs its command as given."
  }
  assert {
    condition     = aws_ec2_fleet.training.target_capacity_specification[0].total_target_capacity == 1
    error_message = "nodes defaults to 1, and target_capacity to nodes."
  }
}

run "multi_node_mode" {
  command = apply
  variables {
    nodes                   = 3
    min_nodes               = 2
    subnet_ids              = ["subnet-aaaa"]
    cluster_placement_group = true
  }

  assert {
    condition     = aws_ec2_fleet.training.target_capacity_specification[0].total_target_capacity == 3 && length(aws_ec2_fleet.training.launch_template_config[0].override) == 4
    error_message = "The fleet keeps 3 nodes, from each instance type in the one subnet."
  }
  assert {
    condition     = aws_launch_template.nodes.placement[0].group_name == aws_placement_group.nodes[0].name && aws_placement_group.nodes[0].strategy == "cluster"
    error_message = "The nodes launch into the cluster placement group."
  }
  assert {
    condition     = output.training_script == join("\n", ["# One node of a torchrun elastic job of 2..3 nodes (multi-node mode).", "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=90", "host=$${SPOTGUARD_RDZV_ENDPOINT%:*} port=$${SPOTGUARD_RDZV_ENDPOINT##*:}", "until timeout 2 bash -c \"exec 3<>/dev/tcp/$host/$port\" 2>/dev/null; do", "  if [ \"$SECONDS\" -ge \"$SPOTGUARD_RDZV_WAIT\" ]; then", "    echo \"spotguard: the rendezvous store at $SPOTGUARD_RDZV_ENDPOINT did not answer for $SPOTGUARD_RDZV_WAIT s (on the rendezvous host: journalctl -t spotguard-setup -u spotguard-rendezvous)\" >&2", "    exit 1", "  fi", "  sleep 2", "done", "exec /opt/pytorch/bin/python -m torch.distributed.run --nnodes 2:3 --nproc-per-node gpu --rdzv-backend c10d --rdzv-endpoint \"$SPOTGUARD_RDZV_ENDPOINT\" --rdzv-id unit --rdzv-conf is_host=false,join_timeout=3600 --local-addr \"$SPOTGUARD_NODE_ADDRESS\" --max-restarts 100 --monitor-interval 1 --no-python python /opt/train/train.py --config big.yaml"])
    error_message = "Each node runs the command under torchrun elastic, a client of the rendezvous host's store, with a worker store per group."
  }
  assert {
    condition     = strcontains(output.user_data, "SPOTGUARD_RDZV_ENDPOINT=10.0.1.23:29400\n") && strcontains(output.user_data, "SPOTGUARD_RENDEZVOUS_INSTANCE_ID=i-0rendezvous00000\n") && strcontains(output.user_data, output.training_script) && output.rendezvous_endpoint == "10.0.1.23:29400"
    error_message = "The nodes' user data carries the store's fixed address, the host job-end stops, and the torchrun command."
  }
  assert {
    condition     = strcontains(output.user_data, "node_address=$(metadata local-ipv4)") && strcontains(output.user_data, "SPOTGUARD_NODE_ADDRESS=$node_address\n") && strcontains(output.user_data, "SPOTGUARD_RDZV_WAIT=600\n") && strcontains(output.user_data, "aws ec2 stop-instances --region \"$region\" --instance-ids 'i-0rendezvous00000'")
    error_message = "Each node gives torchrun its private IP, waits for the store, and stops the host when set-up failures end the fleet."
  }
  assert {
    condition     = length([for rule in aws_security_group.nodes.egress : rule if rule.from_port == 29400 && rule.to_port == 29400 && rule.protocol == "tcp" && toset(rule.cidr_blocks) == toset(["10.0.1.0/24"])]) == 1 && length(aws_security_group.nodes.egress) == 3
    error_message = "The nodes may reach the store's port in their subnet (and, as before, HTTPS and each other)."
  }
  assert {
    condition     = length(aws_eip.rendezvous) == 0
    error_message = "In a private subnet the host, like the nodes, goes out through the subnet's NAT or endpoints."
  }
  assert {
    condition     = one(aws_instance.rendezvous[0].network_interface).network_interface_id == aws_network_interface.rendezvous[0].id && one(aws_instance.rendezvous[0].network_interface).device_index == 0 && aws_network_interface.rendezvous[0].subnet_id == "subnet-aaaa"
    error_message = "The host answers at the interface the module created, in the nodes' subnet."
  }
  assert {
    condition     = aws_instance.rendezvous[0].metadata_options[0].http_tokens == "required" && aws_instance.rendezvous[0].root_block_device[0].encrypted && aws_instance.rendezvous[0].instance_type == "t3.medium" && aws_instance.rendezvous[0].monitoring && aws_instance.rendezvous[0].root_block_device[0].volume_size == 200
    error_message = "The host: IMDSv2 only, encrypted root volume of the nodes' size (its AMI's), small, monitored."
  }
  assert {
    condition     = strcontains(base64decode(aws_instance.rendezvous[0].user_data_base64), "exec /opt/pytorch/bin/python -m spotguard rendezvous-store --host 10.0.1.23 --port 29400") && strcontains(base64decode(aws_instance.rendezvous[0].user_data_base64), "WHEEL_SHA256='1b628ab4d6a299069aabfa7b3eddaf9538da5712ae7df642e9d439c1a57ce132'")
    error_message = "The host serves the store on its fixed address, from the checked wheel."
  }
  assert {
    condition     = length(aws_security_group.rendezvous[0].ingress) == 1 && one(aws_security_group.rendezvous[0].ingress).from_port == 29400 && one(aws_security_group.rendezvous[0].ingress).to_port == 29400 && one(aws_security_group.rendezvous[0].ingress).security_groups == toset([aws_security_group.nodes.id]) && length(coalesce(one(aws_security_group.rendezvous[0].ingress).cidr_blocks, [])) == 0
    error_message = "The host admits the store's port from the nodes only."
  }
  assert {
    condition     = jsondecode(aws_iam_role_policy.rendezvous[0].policy).Statement[0].Action == ["s3:GetObject"] && jsondecode(aws_iam_role_policy.rendezvous[0].policy).Statement[0].Resource == "arn:aws:s3:::unit-ckpt-123456789012-us-east-1/spotguard/wheels/1b628ab4d6a299069aabfa7b3eddaf9538da5712ae7df642e9d439c1a57ce132/spotguard-0.1.0-py3-none-any.whl" && length(jsondecode(aws_iam_role_policy.rendezvous[0].policy).Statement) == 1
    error_message = "The host's role reads the wheel and nothing else."
  }
  assert {
    condition     = [for s in jsondecode(aws_iam_role_policy.job_end.policy).Statement : s.Resource if s.Sid == "StopTheRendezvousHost"] == [aws_instance.rendezvous[0].arn] && [for s in jsondecode(aws_iam_role_policy.job_end.policy).Statement : s.Action if s.Sid == "StopTheRendezvousHost"] == [["ec2:StopInstances"]]
    error_message = "The nodes may stop that host, and only it."
  }
  assert {
    condition     = aws_ec2_instance_state.rendezvous[0].state == "running"
    error_message = "The host runs while the job does."
  }
}

run "multi_node_paused_stops_the_host" {
  command = plan
  variables {
    nodes           = 3
    subnet_ids      = ["subnet-aaaa"]
    target_capacity = 0
  }

  assert {
    condition     = aws_ec2_instance_state.rendezvous[0].state == "stopped" && aws_ec2_fleet.training.target_capacity_specification[0].total_target_capacity == 0
    error_message = "A paused multi-node job stops its rendezvous host: nobody pays for an idle one."
  }
}

run "multi_node_in_a_public_subnet_gives_the_host_a_public_ip" {
  command = apply
  variables {
    nodes      = 2
    subnet_ids = ["subnet-aaaa"]
  }
  override_data {
    target = data.aws_subnet.rendezvous[0]
    values = { cidr_block = "172.31.16.0/20", map_public_ip_on_launch = true }
  }

  assert {
    condition     = aws_eip.rendezvous[0].network_interface == aws_network_interface.rendezvous[0].id && aws_eip.rendezvous[0].domain == "vpc"
    error_message = "In a public subnet (the default VPC) the host gets a public IP on its interface, as the nodes get theirs from the subnet: it must reach S3 and the package index."
  }
}

run "an_explicit_rendezvous_public_ip_wins_over_the_subnet" {
  command = plan
  variables {
    nodes                = 2
    subnet_ids           = ["subnet-aaaa"]
    rendezvous_public_ip = false
  }
  override_data {
    target = data.aws_subnet.rendezvous[0]
    values = { cidr_block = "172.31.16.0/20", map_public_ip_on_launch = true }
  }

  assert {
    condition     = length(aws_eip.rendezvous) == 0
    error_message = "rendezvous_public_ip = false: no Elastic IP, whatever the subnet says (a NAT gateway does the job)."
  }
}

run "multi_node_across_zones" {
  command = plan
  variables {
    nodes = 3
  }
  expect_failures = [var.nodes]
}

run "min_nodes_above_nodes" {
  command = plan
  variables {
    nodes      = 2
    min_nodes  = 3
    subnet_ids = ["subnet-aaaa"]
  }
  expect_failures = [var.min_nodes]
}

run "capacity_between_zero_and_nodes" {
  command = plan
  variables {
    nodes           = 3
    subnet_ids      = ["subnet-aaaa"]
    target_capacity = 2
  }
  expect_failures = [var.target_capacity]
}

run "multi_node_command_is_not_a_torchrun_command" {
  command = plan
  variables {
    nodes            = 2
    subnet_ids       = ["subnet-aaaa"]
    training_command = "/opt/pytorch/bin/torchrun --nproc-per-node 8 train.py"
  }
  expect_failures = [var.training_command]
}

run "single_node_command_may_be_a_torchrun_command" {
  command = plan
  variables {
    training_command = "python -m torch.distributed.run --nproc-per-node 8 train.py"
  }

  assert {
    condition     = output.training_script == "exec python -m torch.distributed.run --nproc-per-node 8 train.py"
    error_message = "On one node the command runs as given, torchrun included."
  }
}

run "bad_processes_per_node" {
  command = plan
  variables {
    nodes              = 2
    subnet_ids         = ["subnet-aaaa"]
    processes_per_node = "cpu"
  }
  expect_failures = [var.processes_per_node]
}

run "instance_type_outside_the_allow_list" {
  command = plan
  variables {
    instance_types = ["g5.xlarge", "t3.large"]
  }
  expect_failures = [var.instance_types]
}

run "instance_types_mixing_gpu_counts" {
  command = plan
  variables {
    instance_types = ["g5.xlarge", "g5.12xlarge"]
  }
  override_data {
    target = data.aws_ec2_instance_type.listed["g5.12xlarge"]
    values = { gpus = [{ count = 4, manufacturer = "NVIDIA", memory_size = 22888, name = "A10G" }] }
  }
  expect_failures = [aws_ec2_fleet.training]
}

run "instance_types_mixing_gpu_counts_when_the_job_allows_it" {
  command = plan
  variables {
    instance_types         = ["g5.xlarge", "g5.12xlarge"]
    allow_gpu_count_change = true
  }
  override_data {
    target = data.aws_ec2_instance_type.listed["g5.12xlarge"]
    values = { gpus = [{ count = 4, manufacturer = "NVIDIA", memory_size = 22888, name = "A10G" }] }
  }

  assert {
    condition     = length(aws_ec2_fleet.training.launch_template_config[0].override) == 4
    error_message = "Both types in both subnets."
  }
}

run "instance_types_mixing_gpu_memory_warn" {
  command = plan
  variables {
    instance_types = ["g5.12xlarge", "g6e.12xlarge"]
  }
  override_data {
    target = data.aws_ec2_instance_type.listed["g5.12xlarge"]
    values = { gpus = [{ count = 4, manufacturer = "NVIDIA", memory_size = 22888, name = "A10G" }] }
  }
  override_data {
    target = data.aws_ec2_instance_type.listed["g6e.12xlarge"]
    values = { gpus = [{ count = 4, manufacturer = "NVIDIA", memory_size = 45776, name = "L40S" }] }
  }
  expect_failures = [check.instance_types_share_gpu_memory]
}

run "instance_type_without_gpus" {
  command = plan
  variables {
    allowed_instance_types = ["g5.*", "m5.*"]
    instance_types         = ["g5.xlarge", "m5.large"]
    allow_gpu_count_change = true
  }
  override_data {
    target = data.aws_ec2_instance_type.listed["m5.large"]
    values = { gpus = [] }
  }
  expect_failures = [aws_ec2_fleet.training]
}

run "gpu_count_change_without_allow" {
  command = plan
  variables {
    instance_types        = []
    instance_requirements = { accelerator_count_min = 1, accelerator_count_max = 8 }
  }
  expect_failures = [var.instance_requirements]
}

run "reserved_or_invalid_tag_keys" {
  command = plan
  variables {
    tags = { "aws:team" = "ml", "a,b" = "c" }
  }
  expect_failures = [var.tags]
}

run "tag_keys_with_spaces_and_slashes_are_fine" {
  command = plan
  variables {
    tags = { "cost center/team" = "ml research" }
  }

  assert {
    condition     = aws_launch_template.nodes.tag_specifications[0].tags["cost center/team"] == "ml research"
    error_message = "Keys EC2 accepts reach the instances (IMDS tags are off, where they would not be valid)."
  }
}

run "existing_bucket_needs_its_name" {
  command = plan
  variables {
    create_bucket = false
  }
  expect_failures = [var.create_bucket]
}

run "kms_alias_is_not_a_key_arn" {
  command = plan
  variables {
    kms_key_arn = "alias/checkpoints"
  }
  expect_failures = [var.kms_key_arn]
}

run "customer_kms_key_grant_and_key_policy_statements" {
  command = plan
  variables {
    kms_key_arn = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
  }

  assert {
    condition     = aws_kms_grant.fleet_volumes[0].grantee_principal == "arn:aws:iam::123456789012:role/aws-service-role/ec2fleet.amazonaws.com/AWSServiceRoleForEC2Fleet" && contains(aws_kms_grant.fleet_volumes[0].operations, "CreateGrant") && aws_kms_grant.fleet_volumes[0].key_id == var.kms_key_arn
    error_message = "EC2 Fleet's service-linked role is granted the key, or no encrypted volume launches."
  }
  assert {
    condition     = one([for s in jsondecode(output.kms_key_policy_statements) : s if s.Principal == { Service = "events.amazonaws.com" }]).Action == ["kms:Decrypt", "kms:GenerateDataKey"]
    error_message = "The key policy statement for EventBridge -> encrypted queue is given to add (else events are dropped silently)."
  }
}

run "no_kms_key_no_grant_and_no_statements" {
  command = plan

  assert {
    condition     = length(aws_kms_grant.fleet_volumes) == 0 && output.kms_key_policy_statements == null
    error_message = "Without a customer key there is nothing to grant."
  }
}

# -- after an apply: changes EC2 Fleet cannot make in place are refused, never a replacement --

run "apply_before_changes" {
  command = apply
}

run "termination_delay_change_is_refused" {
  command = plan
  variables {
    capacity_rebalance_termination_delay = 360
  }
  expect_failures = [aws_ec2_fleet.training]
}

run "on_demand_split_change_is_refused" {
  command = plan
  variables {
    on_demand_base_capacity = 1
  }
  expect_failures = [aws_ec2_fleet.training]
}

run "unchanged_settings_plan_cleanly_after_the_apply" {
  command = plan

  assert {
    condition     = aws_ec2_fleet.training.spot_options[0].maintenance_strategies[0].capacity_rebalance[0].termination_delay == 300
    error_message = "The postconditions pass when nothing changed."
  }
}

# -- spotguard from the operator's own wheel (wheel.tf) -----------------------------------------

run "wheel_uploaded_content_addressed_and_readable_by_the_nodes_only" {
  command = plan

  assert {
    condition     = aws_s3_object.spotguard_wheel[0].key == "spotguard/wheels/1b628ab4d6a299069aabfa7b3eddaf9538da5712ae7df642e9d439c1a57ce132/spotguard-0.1.0-py3-none-any.whl" && aws_s3_object.spotguard_wheel[0].bucket == "unit-ckpt-123456789012-us-east-1"
    error_message = "The wheel goes into the bucket under its SHA-256."
  }
  assert {
    condition     = aws_s3_object.spotguard_wheel[0].source_hash == "1b628ab4d6a299069aabfa7b3eddaf9538da5712ae7df642e9d439c1a57ce132"
    error_message = "A changed wheel is uploaded again (source_hash)."
  }
  assert {
    condition     = jsondecode(aws_iam_role_policy.spotguard_wheel[0].policy).Statement[0].Action == ["s3:GetObject"] && jsondecode(aws_iam_role_policy.spotguard_wheel[0].policy).Statement[0].Resource == "arn:aws:s3:::unit-ckpt-123456789012-us-east-1/spotguard/wheels/*"
    error_message = "The nodes may read the uploaded wheels (they install only the one whose SHA-256 they are given), and nothing else there."
  }
  assert {
    condition     = output.spotguard_wheel_uri == "s3://unit-ckpt-123456789012-us-east-1/spotguard/wheels/1b628ab4d6a299069aabfa7b3eddaf9538da5712ae7df642e9d439c1a57ce132/spotguard-0.1.0-py3-none-any.whl"
    error_message = "The output names the object the nodes install."
  }
}

run "no_wheel_is_refused" {
  command = plan
  variables {
    spotguard_wheel_path = null
  }
  expect_failures = [var.spotguard_wheel_path]
}

run "two_wheels_are_refused" {
  command = plan
  variables {
    spotguard_wheel_s3_uri = "s3://artifacts-bucket/wheels/spotguard-0.1.0-py3-none-any.whl"
    spotguard_wheel_sha256 = "5d41402abc4b2a76b9719d911017c592ae2d2b1f5d41402abc4b2a76b9719d91"
  }
  expect_failures = [var.spotguard_wheel_path]
}

run "a_missing_wheel_file_is_refused" {
  command = plan
  variables {
    spotguard_wheel_path = "dist/spotguard-9.9.9-py3-none-any.whl"
  }
  expect_failures = [var.spotguard_wheel_path]
}

run "a_wheel_of_another_version_is_refused" {
  command = plan
  variables {
    spotguard_version = "0.2.0"
  }
  expect_failures = [var.spotguard_wheel_path]
}

# -- the end of the job (job_end.tf) ----------------------------------------------------------

run "job_end_may_modify_only_this_fleet" {
  command = apply

  assert {
    condition     = one([for s in jsondecode(aws_iam_role_policy.job_end.policy).Statement : s if s.Sid == "EndThisFleet"]).Resource == ["arn:aws:ec2:us-east-1:123456789012:fleet/fleet-unit", "arn:aws:ec2:us-east-1:123456789012:launch-template/lt-unit"] && one([for s in jsondecode(aws_iam_role_policy.job_end.policy).Statement : s if s.Sid == "EndThisFleet"]).Action == ["ec2:ModifyFleet"]
    error_message = "ModifyFleet is allowed on this fleet and its launch template alone."
  }
  assert {
    condition     = one(jsondecode(aws_iam_role_policy.job_status.policy).Statement).Resource == "arn:aws:s3:::unit-ckpt-123456789012-us-east-1/spotguard/status/unit.json" && one(jsondecode(aws_iam_role_policy.job_status.policy).Statement).Action == ["s3:GetObject", "s3:PutObject"]
    error_message = "The nodes may write their job's status object and nothing else there."
  }
  assert {
    condition     = output.status_uri == "s3://unit-ckpt-123456789012-us-east-1/spotguard/status/unit.json"
    error_message = "The status object's URI is an output."
  }
}

run "checkpoints_under_the_spotguard_prefix_are_refused" {
  command = plan
  variables {
    checkpoint_prefix = "spotguard/run"
  }
  expect_failures = [aws_iam_role_policy.job_status, aws_s3_object.spotguard_wheel]
}

run "max_consecutive_failures_at_least_one" {
  command = plan
  variables {
    max_consecutive_failures = 0
  }
  expect_failures = [var.max_consecutive_failures]
}

# The AMI lookup answers the newest AMI; the one found at the first apply stays in use.
run "ami_found_at_the_first_apply" {
  command = apply

  assert {
    condition     = aws_launch_template.nodes.image_id == "ami-0123456789abcdef0"
    error_message = "The launch template uses the AMI found."
  }
}

run "a_newer_ami_published_changes_nothing" {
  command = apply
  override_data {
    target = data.aws_ami.selected[0]
    values = { id = "ami-0fedcba98765432100" }
  }

  assert {
    condition     = aws_launch_template.nodes.image_id == "ami-0123456789abcdef0" && terraform_data.ami[0].output == "ami-0123456789abcdef0"
    error_message = "A newer AMI matching the filter must not change the launch template (nor the fleet) by itself."
  }
}

run "a_new_ami_id_takes_effect" {
  command = apply
  variables {
    ami_id = "ami-0aaaabbbbccccdddd"
  }

  assert {
    condition     = aws_launch_template.nodes.image_id == "ami-0aaaabbbbccccdddd"
    error_message = "An AMI given on purpose replaces the one found."
  }
}
