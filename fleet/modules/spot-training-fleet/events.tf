# Fleet-level events: spot interruption warnings, rebalance recommendations and instance state
# changes, from EventBridge into an encrypted queue that only this rule may write to. A
# scheduler or dashboard consumes it; the nodes themselves learn of notices from IMDS.

resource "aws_sqs_queue" "events" {
  name                      = "${var.name}-spot-events"
  message_retention_seconds = var.event_retention_seconds
  sqs_managed_sse_enabled   = var.kms_key_arn == null ? true : null
  kms_master_key_id         = var.kms_key_arn
  tags                      = local.tags
}

resource "aws_cloudwatch_event_rule" "spot_events" {
  name        = "${var.name}-spot-events"
  description = "Spot interruption warnings, rebalance recommendations and instance state changes"
  event_pattern = jsonencode({
    source = ["aws.ec2"]
    detail-type = [
      "EC2 Spot Instance Interruption Warning",
      "EC2 Instance Rebalance Recommendation",
      "EC2 Instance State-change Notification",
    ]
  })
  tags = local.tags
}

resource "aws_cloudwatch_event_target" "queue" {
  rule      = aws_cloudwatch_event_rule.spot_events.name
  target_id = "sqs"
  arn       = aws_sqs_queue.events.arn
}

resource "aws_sqs_queue_policy" "events" {
  queue_url = aws_sqs_queue.events.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "OnlyTheSpotEventsRule"
        Effect    = "Allow"
        Principal = { Service = "events.amazonaws.com" }
        Action    = "sqs:SendMessage"
        Resource  = aws_sqs_queue.events.arn
        Condition = { ArnEquals = { "aws:SourceArn" = aws_cloudwatch_event_rule.spot_events.arn } }
      },
    ]
  })
}
