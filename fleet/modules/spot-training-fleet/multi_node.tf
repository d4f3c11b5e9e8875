# The multi-node mode (nodes > 1): one torchrun elastic job across the fleet's nodes.
#
# torchrun's c10d rendezvous needs a store that every node reaches at an address known before
# any node starts, and that outlives the loss of any spot node: the agent that hosts the store
# (torchrun's default) takes the rendezvous with it when its node goes. So the store runs on a
# host of its own: a small on-demand instance (never interrupted by spot) running
# `spotguard rendezvous-store`, torch's TCPStore, behind a network interface the module creates.
# The interface keeps its private IP whatever happens to the instance (EC2's simplified
# automatic recovery, on by default for the small general-purpose types, moves it to healthy
# hardware; a replaced instance attaches the same interface), so the nodes' user data
# carries the address: no discovery, no EC2 permissions on the nodes, nothing to go stale when
# nodes come and go. Every torchrun is a client of it (is_host=false).
#
# When the job ends (finished, or failed max_consecutive_failures times), job-end stops the host
# with the fleet; the next apply starts it again with an empty store, which a new run needs: a
# torchrun that ends closes its rendezvous for good.

locals {
  multi_node      = var.nodes > 1
  min_nodes       = coalesce(var.min_nodes, var.nodes)
  target_capacity = coalesce(var.target_capacity, var.nodes)
  node_ami        = var.ami_id != null ? var.ami_id : terraform_data.ami[0].output

  rendezvous_endpoint = local.multi_node ? "${aws_network_interface.rendezvous[0].private_ip}:${var.rendezvous_port}" : ""
  # What each node runs: the training command itself, or torchrun starting it once per process
  # (--no-python: the command is run as given, so `python train.py ...` works in both modes).
  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: without it torchrun hands every later group the first
  # group's worker store, on a node that may be gone (the spotguard drill --nodes found it).
  # TORCH_ELASTIC_SHUTDOWN_TIMEOUT: on SIGTERM (a shutdown) torchrun SIGKILLs the workers after
  # 30 s by default; the hooks get 90 s to save, within the unit's TimeoutStopSec (100 s).
  # First it waits (SPOTGUARD_RDZV_WAIT seconds) for the store to answer: after the host's
  # reboot, recovery or restart (the next run), torchrun alone gives up after 60 s, which three
  # times in a row would end the job. --local-addr: the node's private IP, not a host name
  # another node may not resolve (its rank-0 worker hosts the group's worker store there).
  training_script = local.multi_node ? join("\n", [
    "# One node of a torchrun elastic job of ${local.min_nodes}..${var.nodes} nodes (multi-node mode).",
    "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 TORCH_ELASTIC_SHUTDOWN_TIMEOUT=90",
    "host=$${SPOTGUARD_RDZV_ENDPOINT%:*} port=$${SPOTGUARD_RDZV_ENDPOINT##*:}",
    "until timeout 2 bash -c \"exec 3<>/dev/tcp/$host/$port\" 2>/dev/null; do",
    "  if [ \"$SECONDS\" -ge \"$SPOTGUARD_RDZV_WAIT\" ]; then",
    "    echo \"spotguard: the rendezvous store at $SPOTGUARD_RDZV_ENDPOINT did not answer for $SPOTGUARD_RDZV_WAIT s (on the rendezvous host: journalctl -t spotguard-setup -u spotguard-rendezvous)\" >&2",
    "    exit 1",
    "  fi",
    "  sleep 2",
    "done",
    join(" ", [
      "exec ${var.training_python} -m torch.distributed.run",
      "--nnodes ${local.min_nodes}:${var.nodes} --nproc-per-node ${var.processes_per_node}",
      "--rdzv-backend c10d --rdzv-endpoint \"$SPOTGUARD_RDZV_ENDPOINT\" --rdzv-id ${var.name}",
      "--rdzv-conf is_host=false,join_timeout=${var.rendezvous_join_timeout}",
      "--local-addr \"$SPOTGUARD_NODE_ADDRESS\" --max-restarts ${var.max_restarts}",
      "--monitor-interval 1 --no-python ${var.training_command}",
    ]),
  ]) : "exec ${var.training_command}"
}

# The nodes' subnet: the store's port is opened towards it (towards the host's security group
# would be a cycle: that group admits the nodes' group), and whether the host needs a public IP.
data "aws_subnet" "rendezvous" {
  count = local.multi_node ? 1 : 0
  id    = var.subnet_ids[0]
}

resource "aws_placement_group" "nodes" {
  count    = local.multi_node && var.cluster_placement_group ? 1 : 0
  name     = "${var.name}-nodes"
  strategy = "cluster"
  tags     = local.tags
}

resource "aws_security_group" "rendezvous" {
  count       = local.multi_node ? 1 : 0
  name_prefix = "${var.name}-rendezvous-"
  description = "spotguard rendezvous host of ${var.name}: the store port from the fleet nodes, HTTPS out"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-rendezvous" })

  ingress {
    description     = "torchrun c10d rendezvous from the fleet nodes"
    from_port       = var.rendezvous_port
    to_port         = var.rendezvous_port
    protocol        = "tcp"
    security_groups = [aws_security_group.nodes.id]
  }

  egress {
    description = "HTTPS: S3 (the wheel), the package index, SSM"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }

  lifecycle {
    create_before_destroy = true
  }
}

# The address the nodes rendezvous at, for the life of the configuration.
resource "aws_network_interface" "rendezvous" {
  count           = local.multi_node ? 1 : 0
  subnet_id       = var.subnet_ids[0]
  security_groups = [aws_security_group.rendezvous[0].id]
  description     = "spotguard rendezvous store of ${var.name}"
  tags            = merge(local.tags, { Name = "${var.name}-rendezvous" })
}

# In a public subnet (the nodes get public IPs from it, as in the default VPC), the host needs
# one too, to reach S3 and the package index at set-up: EC2 gives a public IP only to an
# interface it creates at launch, not to one attached as the host's first.
locals {
  # The variable when given (a subnet created in the same apply is not known at plan).
  rendezvous_public_ip = var.rendezvous_public_ip != null ? var.rendezvous_public_ip : try(data.aws_subnet.rendezvous[0].map_public_ip_on_launch, false)
}

resource "aws_eip" "rendezvous" {
  count             = local.multi_node && local.rendezvous_public_ip ? 1 : 0
  domain            = "vpc"
  network_interface = aws_network_interface.rendezvous[0].id
  tags              = merge(local.tags, { Name = "${var.name}-rendezvous" })
}

resource "aws_iam_role" "rendezvous" {
  count       = local.multi_node ? 1 : 0
  name_prefix = "${var.name}-rdzv-"
  description = "spotguard rendezvous host of ${var.name}: reads the spotguard wheel, nothing else"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      { Effect = "Allow", Action = "sts:AssumeRole", Principal = { Service = "ec2.amazonaws.com" } },
    ]
  })
  tags = local.tags
}

resource "aws_iam_role_policy" "rendezvous" {
  count = local.multi_node ? 1 : 0
  name  = "spotguard-wheel"
  role  = aws_iam_role.rendezvous[0].id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat(
      [{
        Sid      = "ReadTheSpotguardWheel"
        Effect   = "Allow"
        Action   = ["s3:GetObject"]
        Resource = "arn:${local.partition}:s3:::${trimprefix(local.wheel_uri, "s3://")}"
      }],
      var.kms_key_arn == null ? [] : [{
        Sid      = "DecryptTheWheel"
        Effect   = "Allow"
        Action   = ["kms:Decrypt"]
        Resource = var.kms_key_arn
      }],
    )
  })
}

resource "aws_iam_role_policy_attachment" "rendezvous_ssm" {
  count      = local.multi_node && var.enable_ssm ? 1 : 0
  role       = aws_iam_role.rendezvous[0].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "rendezvous" {
  count       = local.multi_node ? 1 : 0
  name_prefix = "${var.name}-rdzv-"
  role        = aws_iam_role.rendezvous[0].name
  tags        = local.tags
}

resource "aws_instance" "rendezvous" {
  count                = local.multi_node ? 1 : 0
  ami                  = coalesce(var.rendezvous_ami_id, local.node_ami)
  instance_type        = var.rendezvous_instance_type
  iam_instance_profile = aws_iam_instance_profile.rendezvous[0].name
  key_name             = var.key_name
  ebs_optimized        = true
  monitoring           = true
  user_data_base64 = base64encode(templatefile("${path.module}/templates/rendezvous_user_data.sh.tftpl", {
    fleet_name      = var.name
    wheel_s3_uri    = local.wheel_uri
    wheel_sha256    = local.wheel_sha256
    training_python = var.training_python
    host            = aws_network_interface.rendezvous[0].private_ip
    port            = var.rendezvous_port
  }))

  network_interface {
    network_interface_id = aws_network_interface.rendezvous[0].id
    device_index         = 0
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required" # IMDSv2 only
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  # The nodes' AMI by default, so their size: it fits that AMI's snapshot.
  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.root_volume_size_gb
    encrypted             = true
    kms_key_id            = var.kms_key_arn
    delete_on_termination = true
  }

  tags        = merge(local.tags, { Name = "${var.name}-rendezvous" })
  volume_tags = merge(local.tags, { Name = "${var.name}-rendezvous" })

  lifecycle {
    precondition {
      condition     = try(terraform_data.rendezvous_settings[0].output.port == var.rendezvous_port && terraform_data.rendezvous_settings[0].output.python == var.training_python, true)
      error_message = "rendezvous_port and training_python are fixed when the rendezvous host is created (it serves the store with them): set them back to ${try(terraform_data.rendezvous_settings[0].output.port, "")} and ${try(terraform_data.rendezvous_settings[0].output.python, "")}, or replace the host and its settings between runs: terraform apply -replace='<address of aws_instance.rendezvous[0]>' -replace='<address of terraform_data.rendezvous_settings[0]>'."
    }
    # A new AMI, wheel, instance type, key or volume setting must not stop or replace the store
    # under a running job (its torchrun agents would fail, and with them the job, and the
    # running nodes would still name the old host to job-end): the host keeps what it was
    # created with. To change it on purpose, between runs:
    # terraform apply -replace='<address of aws_instance.rendezvous[0]>'.
    ignore_changes = [ami, user_data_base64, instance_type, key_name, root_block_device]
  }

  depends_on = [aws_iam_role_policy.rendezvous, aws_kms_grant.fleet_volumes, aws_eip.rendezvous]
}

# What the host's store was set up with: its user data runs at creation only (ignore_changes),
# so a later change would move the nodes and the security groups but not the store.
resource "terraform_data" "rendezvous_settings" {
  count = local.multi_node ? 1 : 0
  input = { port = var.rendezvous_port, python = var.training_python }

  lifecycle {
    ignore_changes = [input]
  }
}

# Running while the job runs (the fleet depends on this, so a start comes before the nodes), and
# stopped while it is paused. job-end stops it when the job ends (the next run needs an empty
# store), which the next plan shows as drift, like the fleet's capacity. On a pause the store
# stops while the nodes are still shutting down: their torchrun fails at most once each (the
# training script then waits for the store) before the instances are gone.
resource "aws_ec2_instance_state" "rendezvous" {
  count       = local.multi_node ? 1 : 0
  instance_id = aws_instance.rendezvous[0].id
  state       = local.target_capacity > 0 ? "running" : "stopped"
}
