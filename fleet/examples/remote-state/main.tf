# The fleet of examples/basic with its state kept remotely and locked, so that a team and the
# scheduled drift check (drift-detection.yml) share one source of truth.

provider "aws" {
  region              = var.region
  allowed_account_ids = var.allowed_account_ids
}

module "fleet" {
  source = "../../modules/spot-training-fleet"

  name                  = var.name
  vpc_id                = var.vpc_id
  subnet_ids            = var.subnet_ids
  training_command      = var.training_command
  spotguard_wheel_path  = var.spotguard_wheel_path
  create_fis_experiment = true
  tags                  = { "managed-by" = "terraform", "state" = "remote" }
}
