# A spot training fleet in an existing VPC. Variables can come from
# `spotguard fleet render model_config.yaml > fleet.auto.tfvars.json`.

provider "aws" {
  region              = var.region
  allowed_account_ids = var.allowed_account_ids
}

module "fleet" {
  source = "../../modules/spot-training-fleet"

  name                          = var.name
  vpc_id                        = var.vpc_id
  subnet_ids                    = var.subnet_ids
  instance_types                = var.instance_types
  target_capacity               = var.target_capacity
  on_demand_base_capacity       = var.on_demand_base_capacity
  spot_max_price                = var.spot_max_price
  ami_id                        = var.ami_id
  root_volume_size_gb           = var.root_volume_size_gb
  training_command              = var.training_command
  training_python               = var.training_python
  spotguard_version             = var.spotguard_version
  bucket_name                   = var.bucket_name
  checkpoint_prefix             = var.checkpoint_prefix
  checkpoint_expiration_days    = var.checkpoint_expiration_days
  terminate_instances_on_delete = var.terminate_instances_on_delete
  tags                          = var.tags
}
