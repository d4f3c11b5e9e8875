output "fleet_id" {
  description = "ID of the EC2 Fleet that keeps target_capacity (nodes) instances running."
  value       = aws_ec2_fleet.training.id
}

output "launch_template_id" {
  description = "ID of the launch template every node starts from."
  value       = aws_launch_template.nodes.id
}

output "launch_template_latest_version" {
  description = "Latest version of the launch template, the one the fleet uses."
  value       = aws_launch_template.nodes.latest_version
}

output "security_group_id" {
  description = "ID of the nodes' security group (inbound only from the fleet's nodes, outbound HTTPS, to the fleet's nodes and, with nodes > 1, to the rendezvous store's port in their subnet): add rules to it for anything else."
  value       = aws_security_group.nodes.id
}

output "instance_role_arn" {
  description = "ARN of the nodes' IAM role, to which you can attach policies for your data."
  value       = aws_iam_role.nodes.arn
}

output "instance_role_name" {
  description = "Name of the nodes' IAM role."
  value       = aws_iam_role.nodes.name
}

output "bucket_name" {
  description = "Name of the checkpoint bucket (created here or given)."
  value       = local.bucket_name
}

output "checkpoint_uri" {
  description = "Where the nodes write checkpoints: the value of SPOTGUARD_CHECKPOINT_URI on every node."
  value       = local.checkpoint_uri
}

output "event_queue_url" {
  description = "URL of the SQS queue receiving this fleet's EC2 Fleet events (errors, instance and state changes)."
  value       = aws_sqs_queue.events.id
}

output "event_queue_arn" {
  description = "ARN of that SQS queue."
  value       = aws_sqs_queue.events.arn
}

output "event_rule_arn" {
  description = "ARN of the EventBridge rule that feeds the queue."
  value       = aws_cloudwatch_event_rule.spot_events.arn
}

output "fleet_arn" {
  description = "ARN of the EC2 Fleet: the resources entry of its events, which the event rule matches."
  value       = aws_ec2_fleet.training.arn
}

output "kms_key_policy_statements" {
  description = "With kms_key_arn: the statements to add to that key's policy, as JSON (EventBridge encrypting into the queue; EC2 Fleet's service-linked role, needed only without the grant). Null without kms_key_arn."
  value       = local.kms_key_policy_statements == null ? null : jsonencode(local.kms_key_policy_statements)
}

output "fis_experiment_template_id" {
  description = "ID of the FIS experiment template that interrupts the fleet's spot instances, or null when create_fis_experiment is false."
  value       = try(aws_fis_experiment_template.spot_interruption[0].id, null)
}

output "user_data" {
  description = "The rendered user data script (for review; it holds no secrets)."
  value       = local.user_data
}

output "spotguard_wheel_uri" {
  description = "Where the nodes install spotguard from: the uploaded wheel (content-addressed by its SHA-256) or spotguard_wheel_s3_uri."
  value       = local.wheel_uri
}

output "status_uri" {
  description = "The job's status object: written when the job finishes, fails max_consecutive_failures times in a row, or a node's set-up fails, with the last error."
  value       = local.status_uri
}

output "rendezvous_endpoint" {
  description = "With nodes > 1: HOST:PORT of the rendezvous store every node's torchrun meets at (SPOTGUARD_RDZV_ENDPOINT on the nodes); null for a single-node job."
  value       = local.multi_node ? local.rendezvous_endpoint : null
}

output "rendezvous_instance_id" {
  description = "With nodes > 1: ID of the on-demand instance that runs the rendezvous store (job-end stops it when the job ends); null for a single-node job."
  value       = try(aws_instance.rendezvous[0].id, null)
}

output "training_script" {
  description = "What each node's training service runs: the training command, or with nodes > 1 the torchrun command that starts it (for review)."
  value       = local.training_script
}
