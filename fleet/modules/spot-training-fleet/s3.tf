# The checkpoint bucket: private, encrypted, TLS only, with lifecycle rules for what the
# trainer hooks cannot clean up themselves (multipart uploads cut short, overwritten versions).
# No rule ever expires a current object: the newest checkpoint of a run paused for months is
# what its resume needs. The trainer hooks prune old checkpoints themselves.

resource "aws_s3_bucket" "checkpoints" {
  #checkov:skip=CKV_AWS_18:access logging needs a separate log bucket; the caller's account-wide choice
  #checkov:skip=CKV_AWS_144:cross-region replication doubles the cost of large checkpoints; opt in outside the module
  #checkov:skip=CKV2_AWS_62:no consumer for object notifications; fleet events go through EventBridge
  #checkov:skip=CKV_AWS_21:versioning is a variable (bucket_versioning): checkpoints are never overwritten in place, and versions of multi-GB files double the bill
  #checkov:skip=CKV_AWS_145:KMS is optional (kms_key_arn); SSE-S3 encrypts by default
  count         = var.create_bucket ? 1 : 0
  bucket        = local.bucket_name
  force_destroy = var.bucket_force_destroy
  tags          = local.tags
}

resource "aws_s3_bucket_public_access_block" "checkpoints" {
  count                   = var.create_bucket ? 1 : 0
  bucket                  = aws_s3_bucket.checkpoints[0].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "checkpoints" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "checkpoints" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == null ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = var.kms_key_arn != null
  }
}

resource "aws_s3_bucket_versioning" "checkpoints" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id
  versioning_configuration {
    status = var.bucket_versioning ? "Enabled" : "Suspended"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "checkpoints" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_days
    }
  }

  rule {
    id     = "expire-noncurrent-checkpoint-versions"
    status = "Enabled"
    filter {
      prefix = "${var.checkpoint_prefix}/"
    }
    # Only versions that are no longer current (overwritten or deleted, with versioning on).
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
  }
}

resource "aws_s3_bucket_policy" "checkpoints" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.checkpoints[0].id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "DenyInsecureTransport"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [local.bucket_arn, "${local.bucket_arn}/*"]
        Condition = { Bool = { "aws:SecureTransport" = "false" } }
      },
    ]
  })
  depends_on = [aws_s3_bucket_public_access_block.checkpoints]
}

# An existing bucket (create_bucket = false) must exist: a plan fails here, not a node at boot.
data "aws_s3_bucket" "existing" {
  count  = var.create_bucket ? 0 : 1
  bucket = local.bucket_name
}
