data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

data "aws_ami" "selected" {
  count       = var.ami_id == null ? 1 : 0
  most_recent = true
  # The AMI found stays in use (terraform_data.ami): once AWS deprecates it, the lookup must
  # still answer, or every plan (pause, drift check, destroy) would fail with no results.
  include_deprecated = true
  owners             = var.ami_owners

  filter {
    name   = "name"
    values = [var.ami_name_filter]
  }

  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
}

# The AMI found by the lookup, fixed when first found. The lookup answers the newest matching
# AMI, and AWS publishes a new Deep Learning AMI every few weeks: read straight into the launch
# template, it would make a later plan, with nothing changed, update the template and the fleet
# (a drift alarm, and new nodes on an untested image). A new ami_name_filter or ami_owners
# replaces this and takes effect, as does an ami_id; to move to the newest AMI of the same
# filter: terraform apply -replace='<address of terraform_data.ami[0]>'.
resource "terraform_data" "ami" {
  count            = var.ami_id == null ? 1 : 0
  input            = data.aws_ami.selected[0].id
  triggers_replace = [var.ami_name_filter, var.ami_owners]

  lifecycle {
    ignore_changes = [input]
  }
}

# Listed types with different GPU memory: allowed (a job sized for the smallest runs on all),
# but a job sized for the largest runs out of memory on the others, three times, and ends.
check "instance_types_share_gpu_memory" {
  assert {
    condition     = length(distinct(values(local.gpu_memory))) <= 1
    error_message = "instance_types differ in GPU memory (${join(", ", [for type, mib in local.gpu_memory : "${type}: ${mib} MiB"])}): a job sized for the largest runs out of memory on the smallest. List types with equal GPU memory unless the job fits the smallest."
  }
}

# Each listed instance type's GPUs, to keep the world size (see the fleet's preconditions).
data "aws_ec2_instance_type" "listed" {
  for_each      = toset(var.instance_types)
  instance_type = each.value
}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  region     = data.aws_region.current.name

  bucket_name    = coalesce(var.bucket_name, "${var.name}-ckpt-${local.account_id}-${local.region}")
  bucket_arn     = "arn:${local.partition}:s3:::${local.bucket_name}"
  checkpoint_uri = "s3://${local.bucket_name}/${var.checkpoint_prefix}"

  tags = merge(var.tags, { "spotguard:fleet" = var.name })

  # One override per (instance type, subnet) pair, or per subnet with attribute-based selection.
  type_overrides = [
    for pair in setproduct(var.instance_types, var.subnet_ids) : {
      instance_type = pair[0]
      subnet_id     = pair[1]
    }
  ]
  use_requirements = length(var.instance_types) == 0
  # GPUs per listed instance type, from EC2's description of the type.
  gpu_count = {
    for type in values(data.aws_ec2_instance_type.listed) :
    type.instance_type => sum(concat([0], [for gpu in type.gpus : gpu.count]))
  }
  # Memory of one GPU (MiB) per listed type: the smallest of its GPUs.
  gpu_memory = {
    for type in values(data.aws_ec2_instance_type.listed) :
    type.instance_type => min([for gpu in type.gpus : gpu.memory_size]...) if length(type.gpus) > 0
  }

  # The agent needs no extras; the trainer hooks get them in the training environment.
  extras = length(var.spotguard_extras) > 0 ? "[${join(",", var.spotguard_extras)}]" : ""

  agent_toml = join("\n", concat(
    [
      "# Written by the spot-training-fleet module's user data; every key: agent.toml.example.",
      "poll_interval = 1.0",
      "target_signal = \"SIGUSR1\"",
    ],
    [for key in sort(keys(var.agent_settings)) : "${key} = ${var.agent_settings[key]}"],
  ))

  # How long a new node's trainer waits for the store's writer lease (SPOTGUARD_LEASE_WAIT).
  # A rebalance replacement starts while the old node still trains, for up to the termination
  # delay, then the old node gets the spot notice's two minutes to save, and a lease left by a
  # node that vanished expires after its TTL (60 s): the wait covers all three, plus a minute.
  # With the trainer hooks' default (180 s) the replacement gave up, exited 1, and three such
  # failures ended the fleet, healthy old node included.
  lease_wait = var.capacity_rebalance_termination_delay + 120 + 60 + 60

  user_data = templatefile("${path.module}/templates/user_data.sh.tftpl", {
    fleet_name      = var.name
    extras          = local.extras
    wheel_s3_uri    = local.wheel_uri
    wheel_sha256    = local.wheel_sha256
    status_uri      = local.status_uri
    max_failures    = var.max_consecutive_failures
    lease_wait      = local.lease_wait
    training_python = var.training_python
    agent_toml      = local.agent_toml
    checkpoint_uri  = local.checkpoint_uri
    training_script = local.training_script
    training_user   = var.training_user
    # The multi-node mode's (multi_node.tf): where torchrun meets, and the host job-end stops.
    rendezvous_endpoint    = local.rendezvous_endpoint
    rendezvous_instance_id = local.multi_node ? aws_instance.rendezvous[0].id : ""
    rendezvous_wait        = 600
  })
}

# While rank 0 waits for the lease, a multi-GPU job's other ranks wait in a collective, which
# ends at the job's process-group timeout (NCCL's default: 600 s).
check "lease_wait_within_the_default_process_group_timeout" {
  assert {
    condition     = local.lease_wait <= 600
    error_message = "A new node's trainer waits up to ${local.lease_wait} s for the writer lease (capacity_rebalance_termination_delay + 240 s); on more than one GPU, the other ranks wait in a collective that ends at the process group's timeout (NCCL's default: 600 s): pass init_process_group(timeout=timedelta(seconds=${local.lease_wait + 60})) or more, or lower the delay to 360 s or less."
  }
}

resource "aws_security_group" "nodes" {
  name_prefix = "${var.name}-nodes-"
  description = "spotguard training nodes of ${var.name}: HTTPS out, and node-to-node traffic within the fleet"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-nodes" })

  egress {
    description = "HTTPS: S3, the package index, SSM (IMDS and the VPC resolver are not filtered by security groups)"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }

  # The multi-node mode's rendezvous store, on the host in the nodes' subnet (multi_node.tf).
  dynamic "egress" {
    for_each = data.aws_subnet.rendezvous
    content {
      description = "torchrun c10d rendezvous store of the fleet"
      from_port   = var.rendezvous_port
      to_port     = var.rendezvous_port
      protocol    = "tcp"
      cidr_blocks = [egress.value.cidr_block]
    }
  }

  egress {
    description = "Anything between the nodes of this fleet: NCCL and torch.distributed rendezvous"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    self        = true
  }

  ingress {
    description = "Anything between the nodes of this fleet: NCCL and torch.distributed rendezvous"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    self        = true
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_launch_template" "nodes" {
  #checkov:skip=CKV_AWS_341:hop limit 2 is deliberate: containers on a bridge network must reach IMDSv2 (metadata_hop_limit = 1 confines it to the host)
  name_prefix            = "${var.name}-"
  description            = "spotguard spot training node for ${var.name}"
  image_id               = local.node_ami
  key_name               = var.key_name
  update_default_version = true
  # A node that powers itself off (job-end, a failed set-up) must go away, not stop: spot
  # instances of one-time requests terminate anyway, but an on-demand node (on-demand base
  # capacity) would stop by default, and a stopped instance keeps its volumes billed and is
  # not replaced by the fleet. (AWS ParallelCluster sets the same in its fleets' templates.)
  instance_initiated_shutdown_behavior = "terminate"
  user_data                            = base64encode(local.user_data)
  vpc_security_group_ids               = concat([aws_security_group.nodes.id], var.additional_security_group_ids)
  ebs_optimized                        = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.nodes.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required" # IMDSv2 only
    http_put_response_hop_limit = var.metadata_hop_limit
    # Nothing on the node reads tags from IMDS; enabled, a tag key with a space or "/" would
    # fail every launch.
    instance_metadata_tags = "disabled"
  }

  block_device_mappings {
    device_name = var.root_device_name

    ebs {
      volume_type           = "gp3"
      volume_size           = var.root_volume_size_gb
      encrypted             = "true"
      kms_key_id            = var.kms_key_arn
      delete_on_termination = "true"
    }
  }

  monitoring {
    enabled = true
  }

  dynamic "placement" {
    for_each = aws_placement_group.nodes
    content {
      group_name = placement.value.name
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = var.name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = var.name })
  }

  tags = local.tags
}

resource "aws_iam_service_linked_role" "ec2_fleet" {
  count            = var.create_fleet_service_linked_role ? 1 : 0
  aws_service_name = "ec2fleet.amazonaws.com"
}

resource "aws_ec2_fleet" "training" {
  type                                = "maintain"
  replace_unhealthy_instances         = true
  terminate_instances                 = var.terminate_instances_on_delete
  terminate_instances_with_expiration = false
  excess_capacity_termination_policy  = "termination"

  launch_template_config {
    launch_template_specification {
      launch_template_id = aws_launch_template.nodes.id
      version            = aws_launch_template.nodes.latest_version
    }

    dynamic "override" {
      for_each = local.use_requirements ? [] : local.type_overrides
      content {
        instance_type = override.value.instance_type
        subnet_id     = override.value.subnet_id
        max_price     = var.spot_max_price
        # Stated, not left to defaults: AWS reads them back as these values, and an unset
        # attribute would then be a change on every plan. One instance = one unit of capacity.
        weighted_capacity = 1
        priority          = 0
      }
    }

    dynamic "override" {
      for_each = local.use_requirements ? var.subnet_ids : []
      content {
        subnet_id         = override.value
        max_price         = var.spot_max_price
        weighted_capacity = 1
        priority          = 0

        instance_requirements {
          accelerator_types         = ["gpu"]
          accelerator_manufacturers = var.instance_requirements.accelerator_manufacturers
          # Only types the Deep Learning AMI supports (wildcards allowed).
          allowed_instance_types = var.allowed_instance_types

          # min = max unless the job may change its world size (allow_gpu_count_change).
          accelerator_count {
            min = var.instance_requirements.accelerator_count_min
            max = coalesce(var.instance_requirements.accelerator_count_max, var.instance_requirements.accelerator_count_min)
          }

          dynamic "accelerator_total_memory_mib" {
            for_each = var.instance_requirements.accelerator_memory_mib_min != null || var.instance_requirements.accelerator_memory_mib_max != null ? [1] : []
            content {
              min = var.instance_requirements.accelerator_memory_mib_min
              max = var.instance_requirements.accelerator_memory_mib_max
            }
          }

          vcpu_count {
            min = var.instance_requirements.vcpu_min
            max = var.instance_requirements.vcpu_max
          }

          memory_mib {
            min = var.instance_requirements.memory_mib_min
            max = var.instance_requirements.memory_mib_max
          }
        }
      }
    }
  }

  target_capacity_specification {
    default_target_capacity_type = "spot"
    total_target_capacity        = local.target_capacity
    on_demand_target_capacity    = var.on_demand_base_capacity
    spot_target_capacity         = local.target_capacity - var.on_demand_base_capacity
  }

  spot_options {
    allocation_strategy            = "price-capacity-optimized"
    instance_interruption_behavior = "terminate"

    maintenance_strategies {
      capacity_rebalance {
        # Not "launch": provider 5.x then sends TerminationDelay=0, which EC2 rejects.
        replacement_strategy = "launch-before-terminate"
        termination_delay    = var.capacity_rebalance_termination_delay
      }
    }
  }

  on_demand_options {
    allocation_strategy = "lowestPrice"
  }

  tags = local.tags

  lifecycle {
    # What AWS's DescribeFleets does not give back as it was sent. Each would otherwise be a
    # change on every plan after the first apply, most of them forcing a replacement, and a
    # replacement runs DeleteFleets with terminate_instances: every node dies.
    ignore_changes = [
      # AWS omits it for price-capacity-optimized; the provider reads 0 against its default of
      # 1 and forces a replacement (terraform-provider-aws issue 43176, fix not released).
      spot_options[0].instance_pools_to_use_count,
      # Options of instant fleets only, never set here; AWS reads back 0 / false, config null.
      spot_options[0].min_target_capacity,
      spot_options[0].single_availability_zone,
      spot_options[0].single_instance_type,
      on_demand_options[0].min_target_capacity,
      on_demand_options[0].single_availability_zone,
      on_demand_options[0].single_instance_type,
      # Never set (no valid_until: the fleet does not expire); read back as the creation time
      # and the service default. Both force a replacement.
      valid_from,
      terminate_instances_with_expiration,
      # Fixed when the fleet is created: the split is ForceNew in the provider, and ModifyFleet
      # carries neither it nor SpotOptions. A change is refused by the postconditions below
      # instead of replacing the fleet or planning an update that never reaches AWS.
      target_capacity_specification[0].spot_target_capacity,
      target_capacity_specification[0].on_demand_target_capacity,
      spot_options[0].maintenance_strategies[0].capacity_rebalance[0].termination_delay,
    ]

    precondition {
      condition     = !local.use_requirements || var.instance_requirements != null
      error_message = "Give instance_types, or instance_requirements for attribute-based selection."
    }
    precondition {
      condition     = alltrue([for type in values(data.aws_ec2_instance_type.listed) : local.gpu_count[type.instance_type] > 0])
      error_message = "Every instance type needs GPUs; without: ${join(", ", [for type in values(data.aws_ec2_instance_type.listed) : type.instance_type if local.gpu_count[type.instance_type] == 0])}."
    }
    precondition {
      condition     = var.allow_gpu_count_change || length(distinct(values(local.gpu_count))) <= 1
      error_message = "instance_types mix GPU counts (${join(", ", [for type, count in local.gpu_count : "${type}: ${count}"])}): a replacement node of another type would change the job's world size. List types with one GPU count, or set allow_gpu_count_change = true if the job resumes at any world size."
    }
    precondition {
      condition     = !local.use_requirements || length(var.subnet_ids) <= 50
      error_message = "EC2 Fleet takes at most 50 overrides: at most 50 subnets with instance_requirements."
    }
    postcondition {
      condition     = self.spot_options[0].maintenance_strategies[0].capacity_rebalance[0].termination_delay == var.capacity_rebalance_termination_delay
      error_message = "capacity_rebalance_termination_delay is fixed when the fleet is created: ModifyFleet cannot change it (it carries no SpotOptions). Set it back to ${self.spot_options[0].maintenance_strategies[0].capacity_rebalance[0].termination_delay}, or replace the fleet on purpose (terraform apply -replace=<address of aws_ec2_fleet.training>), which terminates its instances."
    }
    postcondition {
      condition     = coalesce(self.target_capacity_specification[0].on_demand_target_capacity, 0) == var.on_demand_base_capacity
      error_message = "on_demand_base_capacity is fixed when the fleet is created: EC2 Fleet cannot change its spot/on-demand split in place. Set it back to ${coalesce(self.target_capacity_specification[0].on_demand_target_capacity, 0)}, or replace the fleet on purpose (terraform apply -replace=<address of aws_ec2_fleet.training>), which terminates its instances. A fleet whose job ended (spotguard fleet job-end set every capacity to 0) needs the replacement to run again with an on-demand base: target_capacity alone would restart it on spot."
    }
  }

  # Everything a node needs at boot exists before the first one starts, and outlives the last
  # one on destroy (the fleet, and with it its instances, goes first): its role's policies,
  # the bucket with its encryption and policy, the KMS grant for encrypted volumes.
  depends_on = [
    aws_iam_service_linked_role.ec2_fleet,
    aws_iam_role_policy.nodes,
    aws_iam_role_policy.spotguard_wheel,
    aws_iam_role_policy.job_status,
    aws_iam_role_policy_attachment.ssm,
    aws_s3_bucket.checkpoints,
    aws_s3_bucket_public_access_block.checkpoints,
    aws_s3_bucket_ownership_controls.checkpoints,
    aws_s3_bucket_server_side_encryption_configuration.checkpoints,
    aws_s3_bucket_versioning.checkpoints,
    aws_s3_bucket_lifecycle_configuration.checkpoints,
    aws_s3_bucket_policy.checkpoints,
    aws_kms_grant.fleet_volumes,
    # A multi-node job's rendezvous host runs before its nodes come (multi_node.tf).
    aws_ec2_instance_state.rendezvous,
  ]
}
