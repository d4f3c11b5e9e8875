variable "region" {
  description = "AWS Region to deploy into."
  type        = string
  default     = "us-east-1"
}

variable "allowed_account_ids" {
  description = "Account IDs Terraform may touch (a safety net against applying to the wrong account); null allows any."
  type        = list(string)
  default     = null
}

variable "name" {
  description = "Name of the fleet (see the module)."
  type        = string
}

variable "vpc_id" {
  description = "ID of the existing VPC."
  type        = string
}

variable "subnet_ids" {
  description = "Existing subnets, one per Availability Zone you want to use."
  type        = list(string)
}

variable "instance_types" {
  description = "GPU instance types to draw spot capacity from."
  type        = list(string)
  default     = ["g5.xlarge", "g5.2xlarge", "g6.xlarge", "g6.2xlarge"]
}

variable "allowed_instance_types" {
  description = "Instance types (patterns with *) the fleet may ever launch; null keeps the module's default, the GPU families the Deep Learning AMI supports."
  type        = list(string)
  default     = null
}

variable "allow_gpu_count_change" {
  description = "Whether instance types with different GPU counts may replace each other (only for a job that resumes at any world size)."
  type        = bool
  default     = false
}

variable "target_capacity" {
  description = "Number of instances to keep running: null or nodes runs the job, 0 pauses it. Set 0 after the job ended (it set its fleet to 0 itself), or the next plan starts it again."
  type        = number
  default     = null
}

variable "nodes" {
  description = "How many nodes the job runs on: 1, or more for one torchrun elastic job across them (give one subnet then)."
  type        = number
  default     = 1
}

variable "min_nodes" {
  description = "With nodes > 1: the fewest nodes the job runs on (torchrun --nnodes min_nodes:nodes); null means nodes."
  type        = number
  default     = null
}

variable "processes_per_node" {
  description = "With nodes > 1: training processes per node (torchrun --nproc-per-node): gpu or a number."
  type        = string
  default     = "gpu"
}

variable "cluster_placement_group" {
  description = "With nodes > 1: launch the nodes into a cluster placement group."
  type        = bool
  default     = false
}

variable "on_demand_base_capacity" {
  description = "How many of them are on-demand."
  type        = number
  default     = 0
}

variable "capacity_rebalance_termination_delay" {
  description = "Seconds a node told to rebalance keeps running after its replacement starts (120..7200); fixed when the fleet is created."
  type        = number
  default     = 300
}

variable "spot_max_price" {
  description = "Highest hourly spot price in USD as a string, or null for the on-demand price."
  type        = string
  default     = null
}

variable "ami_id" {
  description = "AMI to launch, or null for the newest Deep Learning AMI."
  type        = string
  default     = null
}

variable "root_volume_size_gb" {
  description = "Root volume size in GiB."
  type        = number
  default     = 200
}

variable "training_command" {
  description = "Command that starts (and resumes) training on each node."
  type        = string
}

variable "training_python" {
  description = "Interpreter the training command runs with; the trainer hooks are installed into its environment."
  type        = string
  default     = "/opt/pytorch/bin/python"
}

variable "spotguard_version" {
  description = "The version the spotguard wheel must be, or null for any."
  type        = string
  default     = null
}

variable "spotguard_wheel_path" {
  description = "The spotguard wheel the nodes install; null takes the one in dist/ that `spotguard fleet package` builds."
  type        = string
  default     = null
}

variable "max_consecutive_failures" {
  description = "Failures of the training command in a row that end the job (and the fleet)."
  type        = number
  default     = 3
}

variable "create_bucket" {
  description = "Create the checkpoint bucket; false uses the existing bucket named by bucket_name."
  type        = bool
  default     = true
}

variable "bucket_name" {
  description = "Checkpoint bucket name: the existing bucket with create_bucket = false, else the name for the new one (null derives one)."
  type        = string
  default     = null
}

variable "checkpoint_prefix" {
  description = "Key prefix for checkpoints in the bucket."
  type        = string
  default     = "checkpoints"
}

variable "terminate_instances_on_delete" {
  description = "Whether destroying the fleet terminates its instances."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
