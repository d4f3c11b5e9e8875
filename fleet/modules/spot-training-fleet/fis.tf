# Optional: the real-world drill. An AWS FIS experiment that sends genuine spot interruption
# notices (two minutes ahead) to the fleet's spot instances, selected by the spotguard:fleet
# tag. Start it from the console or `aws fis start-experiment --experiment-template-id ...`.

resource "aws_iam_role" "fis" {
  count       = var.create_fis_experiment ? 1 : 0
  name_prefix = "${var.name}-fis-"
  description = "FIS spot interruption drill for ${var.name}"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      { Effect = "Allow", Action = "sts:AssumeRole", Principal = { Service = "fis.amazonaws.com" } },
    ]
  })
  tags = local.tags
}

resource "aws_iam_role_policy" "fis" {
  count = var.create_fis_experiment ? 1 : 0
  name  = "send-spot-interruptions-to-the-fleet"
  role  = aws_iam_role.fis[0].id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "InterruptOnlyThisFleet"
        Effect   = "Allow"
        Action   = "ec2:SendSpotInstanceInterruptions"
        Resource = "arn:${local.partition}:ec2:${local.region}:${local.account_id}:instance/*"
        Condition = {
          StringEquals = { "aws:ResourceTag/spotguard:fleet" = var.name }
        }
      },
      {
        Sid      = "FindTheInstances"
        Effect   = "Allow"
        Action   = "ec2:DescribeInstances"
        Resource = "*"
      },
    ]
  })
}

resource "aws_fis_experiment_template" "spot_interruption" {
  count       = var.create_fis_experiment ? 1 : 0
  description = "spotguard drill: interrupt ${var.fis_interruption_target} spot instance(s) of ${var.name}"
  role_arn    = aws_iam_role.fis[0].arn

  action {
    name      = "interrupt"
    action_id = "aws:ec2:send-spot-instance-interruptions"

    parameter {
      key   = "durationBeforeInterruption"
      value = "PT2M"
    }

    target {
      key   = "SpotInstances"
      value = "fleet-spot-instances"
    }
  }

  target {
    name           = "fleet-spot-instances"
    resource_type  = "aws:ec2:spot-instance"
    selection_mode = var.fis_interruption_target

    resource_tag {
      key   = "spotguard:fleet"
      value = var.name
    }

    filter {
      path   = "State.Name"
      values = ["running"]
    }
  }

  stop_condition {
    source = "none"
  }

  tags = local.tags
}
