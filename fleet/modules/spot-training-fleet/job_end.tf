# A finished or broken job ends its fleet. One fleet runs one job, and a `maintain` fleet
# replaces every instance that goes away, so the node whose job finished (exit 0), or failed
# max_failures times in a row, sets this fleet's target capacity to 0 (`spotguard fleet
# job-end`, run by the training unit) and powers off. What happened, with the last error, is
# in the status object; the user data writes it too when the node's set-up fails.

locals {
  status_key = "spotguard/status/${var.name}.json"
  status_uri = "s3://${local.bucket_name}/${local.status_key}"
}

resource "aws_iam_role_policy" "job_end" {
  name = "spotguard-job-end"
  role = aws_iam_role.nodes.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat([
      {
        # Only this fleet: its ARN, known once it exists (so this policy follows the fleet;
        # job-end retries while IAM catches up).
        Sid    = "EndThisFleet"
        Effect = "Allow"
        Action = ["ec2:ModifyFleet"]
        # The fleet, and its launch template: EC2 may authorize a fleet action against the
        # template it launches from too (CreateFleet does: karpenter#2813). Both are this
        # module's own; the node sends no LaunchTemplateConfigs, so it can change neither.
        Resource = [aws_ec2_fleet.training.arn, aws_launch_template.nodes.arn]
      },
      {
        # The node finds its fleet from its own aws:ec2:fleet-id tag. DescribeTags has no
        # resource-level permissions: "*" is the only resource it takes.
        Sid      = "FindOwnFleet"
        Effect   = "Allow"
        Action   = ["ec2:DescribeTags"]
        Resource = "*"
      },
      ], local.multi_node ? [{
        # A multi-node job's rendezvous host goes with it (multi_node.tf): its next run needs
        # a fresh store, which the next apply starts.
        Sid      = "StopTheRendezvousHost"
        Effect   = "Allow"
        Action   = ["ec2:StopInstances"]
        Resource = aws_instance.rendezvous[0].arn
    }] : [])
  })
}

# The status object, in a policy that does not wait for the fleet: a node whose set-up fails
# in its first minute must still be able to say why.
resource "aws_iam_role_policy" "job_status" {
  name = "spotguard-job-status"
  role = aws_iam_role.nodes.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        # Read too: the user data counts set-up failures in a row in it.
        Sid      = "WriteJobStatus"
        Effect   = "Allow"
        Action   = ["s3:GetObject", "s3:PutObject"]
        Resource = "${local.bucket_arn}/${local.status_key}"
      },
    ]
  })

  lifecycle {
    precondition {
      condition     = var.checkpoint_prefix != "spotguard" && !startswith(var.checkpoint_prefix, "spotguard/")
      error_message = "checkpoint_prefix must not be spotguard or lie under spotguard/: that prefix holds the job's status object and the wheel."
    }
  }
}
