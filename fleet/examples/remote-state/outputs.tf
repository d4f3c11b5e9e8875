output "fleet_id" {
  description = "ID of the EC2 Fleet."
  value       = module.fleet.fleet_id
}

output "fis_experiment_template_id" {
  description = "ID of the FIS experiment template that sends real spot interruptions to the fleet."
  value       = module.fleet.fis_experiment_template_id
}
