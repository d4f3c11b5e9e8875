variable "region" {
  description = "AWS Region to deploy into."
  type        = string
  default     = "us-east-1"
}

variable "allowed_account_ids" {
  description = "Account IDs Terraform may touch; null allows any."
  type        = list(string)
  default     = null
}

variable "name" {
  description = "Name of the fleet."
  type        = string
}

variable "vpc_id" {
  description = "ID of the existing VPC."
  type        = string
}

variable "subnet_ids" {
  description = "Existing subnets, one per Availability Zone."
  type        = list(string)
}

variable "training_command" {
  description = "Command that starts (and resumes) training on each node."
  type        = string
}

variable "spotguard_wheel_path" {
  description = "The spotguard wheel the nodes install, as `spotguard fleet package` prints it (the drift check needs the same file: the plan hashes it)."
  type        = string
}
