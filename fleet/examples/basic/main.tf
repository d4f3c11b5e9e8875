# A spot training fleet in an existing VPC. Variables can come from
# `spotguard fleet render model_config.yaml > fleet.auto.tfvars.json`.

# The spotguard the nodes install: the one wheel `spotguard fleet package` wrote into dist/
# here, unless spotguard_wheel_path names another. None or several: the module says so.
locals {
  built_wheels         = sort(fileset(path.module, "dist/spotguard-*.whl"))
  spotguard_wheel_path = var.spotguard_wheel_path != null ? var.spotguard_wheel_path : (length(local.built_wheels) == 1 ? "${path.module}/${local.built_wheels[0]}" : null)
}

provider "aws" {
  region              = var.region
  allowed_account_ids = var.allowed_account_ids
}

module "fleet" {
  source = "../../modules/spot-training-fleet"

  name                                 = var.name
  vpc_id                               = var.vpc_id
  subnet_ids                           = var.subnet_ids
  instance_types                       = var.instance_types
  allowed_instance_types               = var.allowed_instance_types
  allow_gpu_count_change               = var.allow_gpu_count_change
  target_capacity                      = var.target_capacity
  nodes                                = var.nodes
  min_nodes                            = var.min_nodes
  processes_per_node                   = var.processes_per_node
  cluster_placement_group              = var.cluster_placement_group
  on_demand_base_capacity              = var.on_demand_base_capacity
  capacity_rebalance_termination_delay = var.capacity_rebalance_termination_delay
  spot_max_price                       = var.spot_max_price
  ami_id                               = var.ami_id
  root_volume_size_gb                  = var.root_volume_size_gb
  training_command                     = var.training_command
  training_python                      = var.training_python
  spotguard_version                    = var.spotguard_version
  spotguard_wheel_path                 = local.spotguard_wheel_path
  max_consecutive_failures             = var.max_consecutive_failures
  create_bucket                        = var.create_bucket
  bucket_name                          = var.bucket_name
  checkpoint_prefix                    = var.checkpoint_prefix
  terminate_instances_on_delete        = var.terminate_instances_on_delete
  tags                                 = var.tags
}
