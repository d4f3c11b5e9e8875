# The operator's own spotguard on the nodes (DESIGN.md, "Fleet"): `spotguard fleet package`
# builds the wheel locally, Terraform uploads it into the checkpoint bucket under a
# content-addressed key, and the user data installs exactly that file, checking its SHA-256.
# spotguard is never installed by name from a package index: whoever registered the name
# there would get root on every node and the checkpoint credentials.

locals {
  wheel_from_path = var.spotguard_wheel_path != null
  wheel_name      = basename(local.wheel_from_path ? var.spotguard_wheel_path : coalesce(var.spotguard_wheel_s3_uri, "none.whl"))
  # Known at plan time: the key (and so the launch template) changes exactly when the code does.
  wheel_sha256 = local.wheel_from_path ? filesha256(var.spotguard_wheel_path) : coalesce(var.spotguard_wheel_sha256, "none")
  wheel_key    = "spotguard/wheels/${local.wheel_sha256}/${local.wheel_name}"
  # Through the uploaded object, so that what installs it follows the upload.
  wheel_uri = local.wheel_from_path ? "s3://${aws_s3_object.spotguard_wheel[0].bucket}/${aws_s3_object.spotguard_wheel[0].key}" : var.spotguard_wheel_s3_uri
}

resource "aws_s3_object" "spotguard_wheel" {
  #checkov:skip=CKV_AWS_186:KMS is optional (kms_key_arn, used here when given); the bucket encrypts with SSE-S3 otherwise
  count        = local.wheel_from_path ? 1 : 0
  bucket       = local.bucket_name
  key          = local.wheel_key
  source       = var.spotguard_wheel_path
  source_hash  = local.wheel_sha256
  content_type = "application/zip"
  kms_key_id   = var.kms_key_arn
  tags         = local.tags

  lifecycle {
    # A new wheel is a new key (a replacement): upload it first, switch the launch template
    # and the fleet to it, and only then delete the old one, which a node launched from the
    # old template version may still be downloading.
    create_before_destroy = true

    precondition {
      condition     = var.checkpoint_prefix != "spotguard" && !startswith(var.checkpoint_prefix, "spotguard/")
      error_message = "checkpoint_prefix must not be spotguard or lie under spotguard/: the nodes may write there, and that prefix holds the wheel they install."
    }
  }

  depends_on = [aws_s3_bucket.checkpoints, aws_s3_bucket_server_side_encryption_configuration.checkpoints]
}

# Read access to the uploaded wheels, in a policy of its own: the nodes' main policy must not
# depend on the upload. All of spotguard/wheels/, not the one key: while an apply replaces the
# wheel, a node booting from the previous launch template version still needs the previous
# wheel (each node installs only the file whose SHA-256 its user data names, so reading the
# others gives it nothing it would run).
resource "aws_iam_role_policy" "spotguard_wheel" {
  count = local.wheel_from_path ? 1 : 0
  name  = "spotguard-wheel"
  role  = aws_iam_role.nodes.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid      = "ReadTheSpotguardWheel"
        Effect   = "Allow"
        Action   = ["s3:GetObject"]
        Resource = "${local.bucket_arn}/spotguard/wheels/*"
      },
    ]
  })
}
