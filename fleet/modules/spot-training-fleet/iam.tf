# The nodes' role: checkpoints under one prefix of one bucket, and optionally SSM. Nothing
# else: a training job needs no other AWS API to survive spot (the event queue is for a
# scheduler or dashboard; nothing on a node consumes it).

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
          # "prefix/" and below only: "runs/llm" alone would also match "runs/llm-7b".
          StringLike = { "s3:prefix" = ["${var.checkpoint_prefix}/", "${var.checkpoint_prefix}/*"] }
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
  name   = "spotguard-checkpoints"
  role   = aws_iam_role.nodes.id
  policy = jsonencode({ Version = "2012-10-17", Statement = local.node_policy_statements })
}

resource "aws_iam_role_policy_attachment" "ssm" {
  count      = var.enable_ssm ? 1 : 0
  role       = aws_iam_role.nodes.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

# A customer KMS key for the root volumes: EC2 Fleet launches through its service-linked role,
# which may use a customer key only when granted (AWS: "EC2 Fleet prerequisites", grant access
# to customer managed keys). A grant needs no change to the key policy; whoever applies needs
# kms:CreateGrant on the key. The key policy statements that a module cannot add are in the
# kms_key_policy_statements output.
resource "aws_kms_grant" "fleet_volumes" {
  count             = var.kms_key_arn != null && var.grant_kms_key_to_fleet_service_role ? 1 : 0
  name              = "${var.name}-ec2-fleet-volumes"
  key_id            = var.kms_key_arn
  grantee_principal = "arn:${local.partition}:iam::${local.account_id}:role/aws-service-role/ec2fleet.amazonaws.com/AWSServiceRoleForEC2Fleet"
  operations = [
    "Decrypt",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "ReEncryptFrom",
    "ReEncryptTo",
    "CreateGrant",
    "DescribeKey",
  ]

  depends_on = [aws_iam_service_linked_role.ec2_fleet]
}

locals {
  # Statements to add to the customer key's policy (see the module README, "Customer KMS key").
  kms_key_policy_statements = var.kms_key_arn == null ? null : [
    {
      # EventBridge encrypts what it delivers to an SSE-KMS queue with the queue's key; without
      # this statement the fleet's events are dropped without an error anywhere.
      Sid       = "SpotguardEventBridgeToEncryptedQueue${replace(title(replace(var.name, "-", " ")), " ", "")}"
      Effect    = "Allow"
      Principal = { Service = "events.amazonaws.com" }
      Action    = ["kms:Decrypt", "kms:GenerateDataKey"]
      Resource  = "*"
    },
    {
      # Only needed when grant_kms_key_to_fleet_service_role is false (else the grant does it).
      Sid       = "SpotguardEc2FleetVolumes"
      Effect    = "Allow"
      Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:role/aws-service-role/ec2fleet.amazonaws.com/AWSServiceRoleForEC2Fleet" }
      Action    = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
      Resource  = "*"
    },
    {
      Sid       = "SpotguardEc2FleetVolumeGrants"
      Effect    = "Allow"
      Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:role/aws-service-role/ec2fleet.amazonaws.com/AWSServiceRoleForEC2Fleet" }
      Action    = "kms:CreateGrant"
      Resource  = "*"
      Condition = { Bool = { "kms:GrantIsForAWSResource" = true } }
    },
  ]
}
