# The nodes' role: checkpoints under one prefix of one bucket, this fleet's event queue, and
# optionally SSM. Nothing else: a training job needs no other AWS API to survive spot.

resource "aws_iam_role" "nodes" {
  name_prefix = "${var.name}-node-"
  description = "spotguard training nodes of ${var.name}"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      { Effect = "Allow", Action = "sts:AssumeRole", Principal = { Service = "ec2.amazonaws.com" } },
    ]
  })
  tags = local.tags
}

resource "aws_iam_instance_profile" "nodes" {
  name_prefix = "${var.name}-node-"
  role        = aws_iam_role.nodes.name
  tags        = local.tags
}

locals {
  node_policy_statements = concat(
    [
      {
        Sid      = "ListCheckpointPrefix"
        Effect   = "Allow"
        Action   = ["s3:ListBucket"]
        Resource = local.bucket_arn
        Condition = {
          StringLike = { "s3:prefix" = [var.checkpoint_prefix, "${var.checkpoint_prefix}/*"] }
        }
      },
      {
        Sid    = "ReadWriteCheckpoints"
        Effect = "Allow"
        Action = [
          "s3:GetObject",
          "s3:PutObject",
          "s3:DeleteObject",
          "s3:AbortMultipartUpload",
          "s3:ListMultipartUploadParts",
        ]
        Resource = "${local.bucket_arn}/${var.checkpoint_prefix}/*"
      },
      {
        Sid    = "ConsumeFleetEvents"
        Effect = "Allow"
        Action = [
          "sqs:ReceiveMessage",
          "sqs:DeleteMessage",
          "sqs:ChangeMessageVisibility",
          "sqs:GetQueueAttributes",
          "sqs:GetQueueUrl",
        ]
        Resource = aws_sqs_queue.events.arn
      },
    ],
    var.spotguard_wheel_s3_uri == null ? [] : [
      {
        Sid      = "ReadSpotguardWheel"
        Effect   = "Allow"
        Action   = ["s3:GetObject"]
        Resource = "arn:${local.partition}:s3:::${trimprefix(var.spotguard_wheel_s3_uri, "s3://")}"
      },
    ],
    var.kms_key_arn == null ? [] : [
      {
        Sid      = "UseTheFleetKey"
        Effect   = "Allow"
        Action   = ["kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
        Resource = var.kms_key_arn
      },
    ],
  )
}

resource "aws_iam_role_policy" "nodes" {
  name   = "spotguard-checkpoints-and-events"
  role   = aws_iam_role.nodes.id
  policy = jsonencode({ Version = "2012-10-17", Statement = local.node_policy_statements })
}

resource "aws_iam_role_policy_attachment" "ssm" {
  count      = var.enable_ssm ? 1 : 0
  role       = aws_iam_role.nodes.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}
