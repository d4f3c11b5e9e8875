output "fleet_id" {
  description = "ID of the EC2 Fleet."
  value       = module.fleet.fleet_id
}

output "launch_template_id" {
  description = "ID of the launch template."
  value       = module.fleet.launch_template_id
}

output "checkpoint_uri" {
  description = "Where the nodes write checkpoints (SPOTGUARD_CHECKPOINT_URI)."
  value       = module.fleet.checkpoint_uri
}

output "bucket_name" {
  description = "Name of the checkpoint bucket."
  value       = module.fleet.bucket_name
}

output "event_queue_url" {
  description = "URL of the SQS queue with the fleet's spot events."
  value       = module.fleet.event_queue_url
}

output "event_rule_arn" {
  description = "ARN of the EventBridge rule that feeds the queue."
  value       = module.fleet.event_rule_arn
}

output "instance_role_name" {
  description = "Name of the nodes' IAM role."
  value       = module.fleet.instance_role_name
}

output "fleet_arn" {
  description = "ARN of the EC2 Fleet, which its events name (the event rule matches it)."
  value       = module.fleet.fleet_arn
}

output "status_uri" {
  description = "The job's status object: finished, failed or setup-failed, with the last error."
  value       = module.fleet.status_uri
}

output "rendezvous_endpoint" {
  description = "With nodes > 1: HOST:PORT of the rendezvous store the nodes' torchrun meets at; null otherwise."
  value       = module.fleet.rendezvous_endpoint
}

output "training_script" {
  description = "What each node's training service runs (the command, or the torchrun command that starts it)."
  value       = module.fleet.training_script
}

output "rendezvous_instance_id" {
  description = "With nodes > 1: ID of the on-demand instance running the rendezvous store; null otherwise."
  value       = module.fleet.rendezvous_instance_id
}

output "security_group_id" {
  description = "ID of the nodes' security group."
  value       = module.fleet.security_group_id
}

output "spotguard_wheel_uri" {
  description = "Where the nodes install spotguard from."
  value       = module.fleet.spotguard_wheel_uri
}
