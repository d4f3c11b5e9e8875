# This fleet's own events, from EventBridge into an encrypted queue that only this rule may
# write to: launch failures ("EC2 Fleet Error"), instances launched, interrupted and
# terminated, state changes. A scheduler or dashboard consumes it; the nodes themselves learn
# of notices from IMDS and have no access to the queue.
#
# EC2's instance-level events (aws.ec2: spot interruption warnings, rebalance
# recommendations, instance state changes) carry no tags or fleet ID, so a rule on them would
# catch every instance in the Region; the fleet's events (aws.ec2fleet) name the fleet in
# "resources". The rule exists only once the fleet does: events of the first seconds are not
# in the queue (a launch failure repeats with every retry; DescribeFleetHistory has them all).

resource "aws_sqs_queue" "events" {
  name                      = "${var.name}-spot-events"
  message_retention_seconds = var.event_retention_seconds
  sqs_managed_sse_enabled   = var.kms_key_arn == null ? true : null
  kms_master_key_id         = var.kms_key_arn
  tags                      = local.tags
}

resource "aws_cloudwatch_event_rule" "spot_events" {
  name        = "${var.name}-spot-events"
  description = "Events of the EC2 Fleet of ${var.name}: errors, instance changes, state changes"
  event_pattern = jsonencode({
    source    = ["aws.ec2fleet"]
    resources = [aws_ec2_fleet.training.arn]
    detail-type = [
      "EC2 Fleet Error",
      "EC2 Fleet Information",
      "EC2 Fleet Instance Change",
      "EC2 Fleet Spot Instance Request Change",
      "EC2 Fleet State Change",
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
